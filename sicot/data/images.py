"""Image bytes in, RGB pixels out: the one decoder that validation, training and serving share.

Every mode a seller's upload can arrive in (grayscale, palette, RGBA, 16-bit, CMYK, EXIF-rotated) ends
as 8-bit RGB, and every way it can be broken ends as an `ImageError` with a reason a person can act on.
"""
from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """Bytes that are not a usable image; the message says why."""


class FormatNotAccepted(ImageError):
    """An image in a format outside the allow-list it was opened with; its parser never ran."""


def _open(data: bytes, formats: Sequence[str] | None = None) -> Image.Image:
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large to decode safely: {_reason(exc)}") from None
    except UnidentifiedImageError:  # its text is only the repr of the file object
        raise _unidentified(data, formats) from None
    except Exception as exc:  # PIL raises SyntaxError, struct.error... from a damaged header
        raise ImageError(f"not a recognised image format ({type(exc).__name__}: {_reason(exc)})") from None


def _unidentified(data: bytes, formats: Sequence[str] | None) -> ImageError:
    found = _sniffed_format(data)
    if found and formats is not None and found not in formats:
        return FormatNotAccepted(f"{found} is not one of the accepted formats {', '.join(formats)}")
    return ImageError(f"not a recognised image format{f' (a damaged {found} header)' if found else ''}")


def _reason(exc: Exception) -> str:
    """The exception's text without object reprs (`<_io.BytesIO object at 0x...>`): say why, not where."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__


def _sniffed_format(data: bytes) -> str | None:
    """The Pillow format whose signature `data` starts with, or None; compares leading bytes only, so
    no format's parser runs."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept and accept(data[:16]):
                return name
        except Exception:  # some signature checks need more bytes than a tiny input has
            continue
    return None


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
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_image(data: bytes, formats: Sequence[str] | None = None) -> Image.Image:
    """The image with only its header read (format, size, mode): what limits are checked against before
    any pixel is decoded. `formats` (Pillow format names) is an allow-list: other parsers never run."""
    img = _open(data, formats)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    return img


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the header only; nothing is decoded."""
    return _open(data).size


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Fully decode `data` to an 8-bit RGB image.

    `max_pixels` is checked against the size in the header before any pixel is decoded, so a small
    file that expands to gigabytes (a decompression bomb) is refused cheaply.
    """
    return decode_opened(_open_within(data, max_pixels))


def _open_within(data: bytes, max_pixels: int | None) -> Image.Image:
    img = open_image(data)
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return img


def decode_pixels(data: bytes, *, max_pixels: int | None = None):
    """`decode_image` as a uint8 tensor [3, H, W] (channels-last in memory, the layout torch's uint8
    resize kernels are fastest on).

    JPEG and 8-bit PNG in RGB or gray without transparency (what product photos are) go straight from
    torchvision's libjpeg-turbo / libpng decoders into the tensor, pixel-identical to Pillow's. Every other
    mode (CMYK, palette, 16-bit, alpha...) and every file torchvision refuses (truncated, damaged) take
    `decode_image`, so the result and the error's reason stay the same.
    """
    import torch

    img = _open_within(data, max_pixels)
    if img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") and "transparency" not in img.info:
        pixels = _torchvision_decode(data, img.format)
        if pixels is not None:
            return pixels
    return torch.from_numpy(np.array(decode_opened(img))).permute(2, 0, 1)


def _torchvision_decode(data: bytes, fmt: str):
    """uint8 [3, H, W] from torchvision's decoder of `fmt`, or None when it refuses the file (Pillow then
    decodes it or says why it cannot) or returns more than 8 bits (a 16-bit RGB PNG)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    decode = decode_jpeg if fmt == "JPEG" else decode_png
    try:
        pixels = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                        apply_exif_orientation=True)
    except RuntimeError:
        return None
    return pixels if pixels.dtype == torch.uint8 else None


def decode_opened(img: Image.Image, min_size: int | None = None) -> Image.Image:
    """An image from `open_image`, decoded to 8-bit RGB.

    With `min_size`, a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale that keeps both sides
    at least `min_size` pixels (libjpeg scales while decoding), so a photo far larger than needed never
    exists at full size; other formats decode whole.
    """
    if min_size:
        img.draft(None, (min_size, min_size))
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        reason = _reason(exc)
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
