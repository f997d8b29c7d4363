"""Image decoding (every upload mode, every broken file) and the torch Dataset over contract records."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sicot.data import images
from sicot.data.dataset import ProductDataset, collate
from sicot.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageError, decode_image, to_tensor
from sicot.data.manifest import load_manifest
from tests.test_manifest import make_dataset


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- decoding -------------------------------------------------------------------------------------

def test_grayscale_becomes_rgb():
    out = decode_image(encode(Image.new("L", (5, 4), 77)))
    assert out.mode == "RGB" and out.size == (5, 4) and out.getpixel((0, 0)) == (77, 77, 77)


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((1, 1), (0, 0, 255, 255))
    img.putpixel((2, 2), (0, 0, 0, 128))
    out = decode_image(encode(img))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not the hidden red
    assert out.getpixel((1, 1)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((2, 2)))


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert decode_image(encode(pal)).getpixel((0, 0)) == (10, 200, 30)
    assert decode_image(encode(pal, transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    gray_alpha = Image.new("LA", (2, 2), (0, 0))
    assert decode_image(encode(gray_alpha)).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_is_scaled_not_clipped(fmt):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = np.asarray(decode_image(data))[0, :, 0]
    assert out.tolist() == [0, 1, 128, 255]


def test_32bit_integer_image_holding_16bit_samples():
    data = encode(Image.fromarray(np.array([[0, 65535]], dtype=np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.asarray(decode_image(data))[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), fmt)  # pure red ink
    r, g, b = decode_image(data).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (6, 3), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    assert decode_image(encode(img, "JPEG", exif=exif)).size == (3, 6)


@pytest.mark.parametrize("data, reason", [
    (b"", "image is empty"),
    (b"\x89PNG but not really", "not a recognised image format"),
    (b"<html>404</html>", "not a recognised image format"),
])
def test_unusable_bytes_get_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused(fmt):
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) * 2 // 3])


def test_max_pixels_is_checked_from_the_header_before_decoding(monkeypatch):
    data = encode(Image.new("RGB", (3000, 2000), (9, 9, 9)))  # compresses to a few kB
    assert len(data) < 100_000
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    with pytest.raises(ImageError, match=r"3000x2000 = 6000000 pixels, over the limit of 1000000"):
        decode_image(data, max_pixels=1_000_000)
    assert loads == []
    assert images.image_size(data) == (3000, 2000)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_even_without_a_limit():
    with pytest.raises(ImageError, match="too large"):
        decode_image(_png_header_only(40_000, 40_000))
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(_png_header_only(5000, 5000), max_pixels=16_000_000)


def test_to_tensor_resizes_and_normalises():
    x = to_tensor(Image.new("RGB", (10, 7), (255, 255, 255)), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x[:, 0, 0], torch.tensor(expected))


# --- the Dataset ----------------------------------------------------------------------------------

@pytest.fixture
def manifest(tmp_path):
    return load_manifest(str(make_dataset(tmp_path / "ds")))


def index_of(manifest):
    return {sku: i for i, sku in enumerate(manifest.classes())}


def encode_title(title: str) -> list[int]:
    return [len(word) for word in title.split()][:5]


def test_items_have_image_label_tokens(manifest):
    ds = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16, encode_title=encode_title)
    assert len(ds) == 9
    item = ds[3]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"] == 0 and item["tokens"].dtype == torch.long and len(item["tokens"]) == 5
    assert ds[1]["tokens"].shape == (0,)  # empty title
    assert ProductDataset(manifest.root, manifest.train, index_of(manifest), 16)[3]["tokens"].shape == (0,)
    assert [ds[i]["label"] for i in range(len(ds))] == [0] * 4 + [1] * 3 + [2] * 2


def test_collate_pads_tokens_with_zero(manifest):
    ds = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16, encode_title=encode_title)
    batch = collate([ds[1], ds[3], ds[4]])
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["label"].tolist() == [0, 0, 1]
    assert batch["tokens"].shape == (3, 5) and batch["tokens"][0].tolist() == [0] * 5
    plain = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16)
    assert collate([plain[0], plain[1]])["tokens"].shape == (2, 1)


def test_images_are_decoded_once_when_cached(manifest, monkeypatch):
    from sicot.data import dataset as module

    calls = []
    real = module.decode_image
    monkeypatch.setattr(module, "decode_image", lambda data: calls.append(1) or real(data))
    ds = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16)
    first = ds[0]["image"]
    assert torch.equal(ds[0]["image"], first) and len(calls) == 1
    uncached = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16, cache=False)
    uncached[0], uncached[0]
    assert len(calls) == 3


def test_augmentation_is_reproducible_under_a_seed(manifest):
    ds = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16, augment=True)
    # a gradient image, so crops and flips change pixels
    ramp = torch.arange(16 * 16, dtype=torch.float32).view(1, 16, 16).expand(3, 16, 16)
    ds.cache[0] = ramp.clamp(0, 255).to(torch.uint8)
    torch.manual_seed(5)
    a = [ds[0]["image"] for _ in range(4)]
    torch.manual_seed(5)
    b = [ds[0]["image"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])
    assert a[0].shape == (3, 16, 16)
    own = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16, augment=True,
                         generator=torch.Generator().manual_seed(3))
    own.cache[0] = ds.cache[0]
    torch.manual_seed(5)
    assert not all(torch.equal(own[0]["image"], x) for x in a)


def test_unknown_sku_and_broken_image_are_named(manifest, tmp_path):
    with pytest.raises(ValueError, match="not in the class index"):
        ProductDataset(manifest.root, manifest.train, {"SKU-A": 0}, 16)
    (tmp_path / "ds" / manifest.train[0].image).write_bytes(b"garbage")
    ds = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16)
    with pytest.raises(ImageError, match="train_SKU-A_0.png: not a recognised image format"):
        ds[0]


def test_works_in_a_dataloader(manifest):
    ds = ProductDataset(manifest.root, manifest.train, index_of(manifest), 16, encode_title=encode_title, augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == 9 and batches[0]["tokens"].shape[1] >= 1
