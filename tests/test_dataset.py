"""Image decoding (every upload mode, every broken file) and the torch Dataset over contract records."""
import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sicot.data import images
from sicot.data.dataset import ProductImages, collate
from sicot.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageError, decode_image, normalize, to_tensor
from sicot.data.manifest import Record, load_manifest
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


# --- decoding to tensors (torchvision, Pillow where torchvision cannot) -------------------------------

def photo(width: int = 40, height: int = 30) -> Image.Image:
    """Smooth colours with detail: what a JPEG encoder and a resize are exercised by."""
    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    return Image.fromarray(np.clip(np.asarray(coarse) + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8))


def pil_pixels(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)


@pytest.fixture
def pillow_decodes(monkeypatch):
    """The list of images that took the Pillow path."""
    taken, real = [], images.decode_opened
    monkeypatch.setattr(images, "decode_opened", lambda img: taken.append(img.mode) or real(img))
    return taken


@pytest.mark.parametrize("data", [
    encode(photo(), "JPEG", quality=90),
    encode(photo(), "JPEG", quality=75, subsampling=2),
    encode(photo().convert("L"), "JPEG"),
    encode(photo()),
    encode(photo().convert("L")),
], ids=["jpeg-444", "jpeg-420", "jpeg-gray", "png", "png-gray"])
def test_torchvision_decodes_jpeg_and_png_to_pillows_pixels(data, pillow_decodes):
    # Equal, not merely close: PNG is lossless, and both libraries decode JPEG with libjpeg-turbo at its
    # defaults (integer IDCT, fancy upsampling), which are exact integer arithmetic.
    pixels = images.decode_pixels(data)
    assert pillow_decodes == []
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, pil_pixels(data))


def test_exif_rotation_is_applied_by_torchvision_as_by_pillow(pillow_decodes):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    data = encode(photo(6 * 8, 3 * 8), "JPEG", exif=exif)
    pixels = images.decode_pixels(data)
    assert pillow_decodes == [] and pixels.shape == (3, 48, 24) and torch.equal(pixels, pil_pixels(data))


def _palette_with_transparency() -> bytes:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return encode(pal, transparency=1)


@pytest.mark.parametrize("data, mode", [
    (encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), "CMYK"),
    (encode(Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))), "I;16"),
    (encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))), "RGBA"),
    (_palette_with_transparency(), "P"),
    (encode(photo(), "TIFF"), "RGB"),
], ids=["cmyk-jpeg", "16bit-png", "rgba-png", "palette-png", "tiff"])
def test_other_modes_take_pillows_path(data, mode, pillow_decodes):
    pixels = images.decode_pixels(data)
    assert pillow_decodes == [mode]
    assert torch.equal(pixels, pil_pixels(data))


def test_a_16bit_rgb_png_is_scaled_like_pillows():
    rgb16 = struct.pack(">3H", 0, 32896, 65535) * 4
    header = struct.pack(">IIBBBBB", 2, 2, 16, 2, 0, 0, 0)  # 2x2, 16-bit RGB

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + rgb16[row * 12:(row + 1) * 12] for row in range(2))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    pixels = images.decode_pixels(data)  # torchvision returns uint16 here: Pillow's path decides
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, pil_pixels(data))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_damaged_file_gets_pillows_reason(fmt):
    data = encode(photo(48, 48), fmt)
    with pytest.raises(ImageError, match="truncated"):
        images.decode_pixels(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match="over the limit"):
        images.decode_pixels(data, max_pixels=100)


# --- the Dataset ----------------------------------------------------------------------------------

@pytest.fixture
def manifest(tmp_path):
    return load_manifest(str(make_dataset(tmp_path / "ds")))


def index_of(manifest):
    return {sku: i for i, sku in enumerate(manifest.classes())}


def encode_title(title: str) -> list[int]:
    return [len(word) for word in title.split()][:5]


class Items:
    """`ProductImages` over the training records, each read from its file: `ds[i]` or `ds[i, seed]`."""

    def __init__(self, manifest, size: int = 16, records=None, class_index=None, **kw):
        self.root, self.records = Path(manifest.root), manifest.train if records is None else records
        self.images = ProductImages(index_of(manifest) if class_index is None else class_index, size, **kw)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[i]
        return self.images.item(i, record, (self.root / record.image).read_bytes(), seed)


def test_items_have_pixels_label_tokens(manifest):
    ds = Items(manifest, encode_title=encode_title)
    assert len(ds) == 9
    item = ds[3]
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.uint8
    assert item["label"] == 0 and item["tokens"].dtype == torch.long and len(item["tokens"]) == 5
    assert ds[1]["tokens"].shape == (0,)  # empty title
    assert Items(manifest)[3]["tokens"].shape == (0,)
    assert [ds[i]["label"] for i in range(len(ds))] == [0] * 4 + [1] * 3 + [2] * 2


def test_pixels_are_resized_as_serving_resizes_them(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode(photo(40, 30), "JPEG"))
    record = Record(image="a.jpg", sku="A", title="", tags=())
    for size in (16, 24, 64):
        pixels = ProductImages({"A": 0}, size).item(0, record, (tmp_path / "a.jpg").read_bytes())["pixels"]
        served = torch.from_numpy(images.to_uint8(decode_image((tmp_path / "a.jpg").read_bytes()), size).copy())
        # torch's uint8 antialiased bilinear kernel is Pillow's algorithm; they round differently in the
        # last bit, so a pixel may differ by one level.
        assert (pixels.int() - served.permute(2, 0, 1).int()).abs().max() <= 1


def test_collate_normalises_and_pads_tokens_with_zero(manifest):
    ds = Items(manifest, encode_title=encode_title)
    batch = collate([ds[1], ds[3], ds[4]])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].is_contiguous()
    assert torch.equal(batch["image"][1], normalize(ds[3]["pixels"]))
    assert batch["label"].tolist() == [0, 0, 1]
    assert batch["tokens"].shape == (3, 5) and batch["tokens"][0].tolist() == [0] * 5
    plain = Items(manifest)
    assert collate([plain[0], plain[1]])["tokens"].shape == (2, 1)


def test_images_are_decoded_once_when_cached(manifest, monkeypatch):
    from sicot.data import dataset as module

    calls = []
    real = module.decode_pixels
    monkeypatch.setattr(module, "decode_pixels", lambda data: calls.append(1) or real(data))
    ds = Items(manifest, cache_bytes=2 ** 20)
    first = ds[0]["pixels"]
    assert torch.equal(ds[0]["pixels"], first) and len(calls) == 1
    uncached = Items(manifest)  # evaluation's default
    uncached[0], uncached[0]
    assert len(calls) == 3 and uncached.images.cache == {}


def test_a_small_cache_budget_keeps_only_what_fits(manifest, monkeypatch):
    from sicot.data import dataset as module

    one_image = 3 * 8 * 8  # the test images are 8x8
    ds = Items(manifest, augment=True, cache_bytes=2 * one_image + one_image // 2)
    uncached = Items(manifest, augment=True)
    for _ in range(2):
        for i in range(len(ds)):
            assert torch.equal(ds[i, 7 + i]["pixels"], uncached[i, 7 + i]["pixels"])  # cached or not
    assert sorted(ds.images.cache) == [0, 1] and ds.images.cached_bytes == 2 * one_image
    # Each DataLoader worker holds its own share of the budget.
    monkeypatch.setattr(module, "get_worker_info", lambda: SimpleNamespace(num_workers=2))
    shared = Items(manifest, cache_bytes=2 * one_image)
    [shared[i] for i in range(len(shared))]
    assert sorted(shared.images.cache) == [0]


def ramp_dataset(manifest, **kw) -> Items:
    """The dataset with image 0 replaced by a gradient (cached), so crops and flips change pixels."""
    ds = Items(manifest, augment=True, **kw)
    ramp = torch.arange(24).view(24, 1) + 10 * torch.arange(24).view(1, 24)  # 0..253
    ds.images.cache[0] = ramp.to(torch.uint8).expand(3, 24, 24)
    return ds


def test_augmentation_is_decided_by_the_seed(manifest):
    ds = ramp_dataset(manifest)
    a = [ds[0, seed]["pixels"] for seed in range(4)]
    assert all(torch.equal(x, ds[0, seed]["pixels"]) for seed, x in enumerate(a))
    assert not all(torch.equal(a[0], x) for x in a[1:])
    assert a[0].shape == (3, 16, 16) and a[0].dtype == torch.uint8
    torch.manual_seed(5)  # no seed: torch's global generator draws
    b = [ds[0]["pixels"] for _ in range(4)]
    torch.manual_seed(5)
    assert all(torch.equal(x, ds[0]["pixels"]) for x in b)
    plain = Items(manifest)
    plain.images.cache[0] = ds.images.cache[0]
    assert torch.equal(plain[0]["pixels"], plain[0, 1]["pixels"])  # no augmentation: the seed is unused


def test_unknown_sku_and_broken_image_are_named(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"train_SKU-B_0\.png: SKU 'SKU-B' is not one of the model's classes"):
        Items(manifest, class_index={"SKU-A": 0})[4]
    (tmp_path / "ds" / manifest.train[0].image).write_bytes(b"garbage")
    ds = Items(manifest)
    with pytest.raises(ImageError, match="train_SKU-A_0.png: not a recognised image format"):
        ds[0]
    jpeg = tmp_path / "ds" / manifest.train[1].image
    assert jpeg.suffix == ".jpg"
    whole = encode(photo(48, 48), "JPEG")
    jpeg.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(ImageError, match="train_SKU-A_1.jpg: image file is truncated"):
        ds[1]
