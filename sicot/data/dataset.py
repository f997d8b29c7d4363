"""What a photo and its record become for the model (pixels, class label, encoded title); `collate` makes batches."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from sicot.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageError, decode_pixels
from sicot.data.manifest import Record

# Random resized crop of the augmentation: share of the image's area and aspect ratio (width / height).
CROP_AREA = (0.7, 1.0)
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
IMAGENET_MEAN_CHW = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
IMAGENET_STD_CHW = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class ProductImages:
    """What one photo becomes: `{"pixels": uint8 [3,S,S], "label": int, "tokens": LongTensor[L]}`, from
    its record and its image's bytes; `collate` turns a list of them into the model's batch. It holds
    nothing per record (a stream hands each record in with its bytes), so a worker's memory does not grow
    with the dataset.

    With `augment`, the seed alone decides the crop and flip, whichever process loads the image; without a
    seed they draw from torch's global generator. Decoded images are kept in memory at their stored size
    (one resize to S x S per read, the crop's) while `cache_bytes` lasts, shared out over the DataLoader's
    workers; the others are decoded each time they are read. Cached or not, an item's pixels are the same.
    """

    def __init__(self, class_index: dict[str, int], image_size: int,
                 encode_title: Callable[[str], list[int]] | None = None, augment: bool = False,
                 cache_bytes: int = 0):
        self.class_index = class_index
        self.image_size = image_size
        self.encode_title = encode_title
        self.augment = augment
        self.cache_bytes = cache_bytes
        self.cache: dict[int, torch.Tensor] = {}
        self.cached_bytes = 0

    def item(self, key: int, record: Record, data: bytes, seed: int | None = None) -> dict:
        """The item of `record`, whose image is `data`; `key` names the image in the cache."""
        if (label := self.class_index.get(record.sku)) is None:
            raise ValueError(f"{record.image}: SKU {record.sku!r} is not one of the model's classes")
        ids = self.encode_title(record.title) if self.encode_title is not None and record.title else []
        return {"pixels": self.pixels(key, record, data, seed), "label": label,
                "tokens": torch.as_tensor(ids, dtype=torch.long)}

    def decoded(self, key: int, record: Record, data: bytes) -> torch.Tensor:
        """uint8 [3, H, W]: the image as stored, from the cache or decoded (and cached when it fits)."""
        if (cached := self.cache.get(key)) is not None:
            return cached
        try:
            out = decode_pixels(data)
        except ImageError as exc:
            raise ImageError(f"{record.image}: {exc}") from None
        if self.cached_bytes + out.nbytes <= self._cache_budget():
            self.cache[key] = out
            self.cached_bytes += out.nbytes
        return out

    def _cache_budget(self) -> int:
        worker = get_worker_info()  # each worker process holds its own cache
        return self.cache_bytes // (worker.num_workers if worker is not None else 1)

    def pixels(self, key: int, record: Record, data: bytes, seed: int | None = None) -> torch.Tensor:
        """uint8 [3, S, S]: the whole image, or with `augment` a random crop of it and a flip, resized to
        S x S (bilinear, antialiased: the resize serving applies)."""
        x = self.decoded(key, record, data)
        height, width = x.shape[1:]
        top, left, h, w, flip = self._crop(height, width, seed) if self.augment else (0, 0, height, width, False)
        size = self.image_size
        out = x[:, top:top + h, left:left + w]
        if (h, w) != (size, size):
            # torch's uint8 resize runs on channels-last pixels: handing it a dense channels-last crop
            # (a 3 x h x w copy) spares it repacking the input and the output, twice as fast.
            crop = out.unsqueeze(0).contiguous(memory_format=torch.channels_last)
            out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True).squeeze(0)
        return out.flip(-1) if flip else out

    @staticmethod
    def _crop(height: int, width: int, seed: int | None) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip): CROP_AREA of the image's area at an aspect in CROP_LOG_RATIO, both
        measured on the S x S square the image is resized to, and a horizontal flip half of the time."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        area, log_ratio, u, v, flip = torch.rand(5, generator=generator).tolist()
        scale = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * area
        ratio = math.exp(CROP_LOG_RATIO[0] + (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]) * log_ratio)
        h = min(height, max(1, round(height * math.sqrt(scale / ratio))))
        w = min(width, max(1, round(width * math.sqrt(scale * ratio))))
        return int(u * (height - h + 1)), int(v * (width - w + 1)), h, w, flip < 0.5


def normalize_batch(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> `images.normalize`'s float [B,3,H,W], bit for bit: one converting copy into the
    model's layout, then in place."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(255.0).sub_(IMAGENET_MEAN_CHW).div_(IMAGENET_STD_CHW)


def collate(batch: list[dict]) -> dict:
    """The model's batch: images normalised to float [B,3,S,S], labels, and token ids padded with 0 to the
    longest title (at least 1 column)."""
    tokens = [item["tokens"] for item in batch]
    width = max([1, *(len(t) for t in tokens)])
    padded = torch.zeros(len(batch), width, dtype=torch.long)
    for i, t in enumerate(tokens):
        padded[i, :len(t)] = t
    # Items are channels-last in memory (decoders and resize keep it): stacking them as H x W x 3 is a copy.
    return {"image": normalize_batch(torch.stack([item["pixels"].permute(1, 2, 0) for item in batch])),
            "label": torch.tensor([item["label"] for item in batch], dtype=torch.long),
            "tokens": padded}
