"""Image bytes in, RGB pixels out: the one decoder that validation, training and serving share.

Every mode a seller's upload can arrive in (grayscale, palette, RGBA, 16-bit, CMYK, EXIF-rotated) ends
as 8-bit RGB, and every way it can be broken ends as an `ImageError` with a reason a person can act on.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """Bytes that are not a usable image; the message says why."""


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large to decode safely: {exc}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error...
        raise ImageError(f"not a recognised image format ({type(exc).__name__}: {exc})") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer and float single-channel modes scaled to 0..255 (PIL's own convert clips them)."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = a.astype(np.float32) / 257.0  # 65535 -> 255 exactly
    elif img.mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        out = a.astype(np.float32) * 255.0
    elif img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:
        out = a.astype(np.float32) / 257.0  # 32-bit container holding 16-bit samples (TIFF, PNG)
    else:  # arbitrary range: stretch what is there
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        out = (a.astype(np.float32) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the header only; nothing is decoded."""
    return _open(data).size


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Fully decode `data` to an 8-bit RGB image.

    `max_pixels` is checked against the size in the header before any pixel is decoded, so a small
    file that expands to gigabytes (a decompression bomb) is refused cheaply.
    """
    img = _open(data)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason or isinstance(exc, (EOFError, SyntaxError)):
            raise ImageError(f"image file is truncated or corrupt ({reason})") from None
        raise ImageError(f"image cannot be decoded ({type(exc).__name__}: {reason})") from None


def to_uint8(img: Image.Image, size: int) -> np.ndarray:
    """The image resized to size x size, as a HxWx3 uint8 array (what datasets cache)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels):
    """uint8 tensor [..., 3, H, W] -> float tensor normalised with ImageNet mean/std."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def to_tensor(img: Image.Image, size: int):
    """FloatTensor[3, size, size]: resized and normalised the way every model here expects."""
    import torch

    return normalize(torch.from_numpy(to_uint8(img, size).copy()).permute(2, 0, 1))
