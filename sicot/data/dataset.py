"""The torch Dataset over contract records: normalised image, class label, encoded title."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sicot import storage
from sicot.data.images import ImageError, decode_image, normalize, to_uint8


class ProductDataset(Dataset):
    """Items are `{"image": FloatTensor[3,S,S], "label": int, "tokens": LongTensor[L]}`.

    `cache=True` keeps each decoded image as uint8 [3,S,S] after its first use (the demo world is
    small); augmentation works on the cached pixels, so it costs no decoding. Augmentation draws from
    `generator` when given, else from torch's global generator (reproducible under torch.manual_seed,
    and different in each DataLoader worker).
    """

    def __init__(self, root: str, records: Sequence, class_index: dict[str, int], image_size: int,
                 encode_title: Callable[[str], list[int]] | None = None, augment: bool = False,
                 cache: bool = True, generator: torch.Generator | None = None):
        unknown = sorted({r.sku for r in records} - set(class_index))
        if unknown:
            raise ValueError(f"{len(unknown)} SKU(s) not in the class index, e.g. {unknown[:3]}")
        self.root = str(root)
        self.records = list(records)
        self.labels = [class_index[r.sku] for r in self.records]
        self.image_size = image_size
        self.encode_title = encode_title
        self.augment = augment
        self.generator = generator
        self.cache: list[torch.Tensor | None] | None = [None] * len(self.records) if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def _uri(self, record) -> str:
        return record.image if storage.is_s3(record.image) else storage.join(self.root, record.image)

    def pixels(self, index: int) -> torch.Tensor:
        """uint8 [3, S, S] of record `index`, decoded once when caching."""
        if self.cache is not None and self.cache[index] is not None:
            return self.cache[index]
        uri = self._uri(self.records[index])
        try:
            img = decode_image(storage.read_bytes(uri))
        except ImageError as exc:
            raise ImageError(f"{uri}: {exc}") from None
        out = torch.from_numpy(np.array(to_uint8(img, self.image_size))).permute(2, 0, 1).contiguous()
        if self.cache is not None:
            self.cache[index] = out
        return out

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop (70-100% of the area, aspect 3/4-4/3) and a horizontal flip."""
        size = self.image_size
        area, log_ratio, pos, flip = self._rand(1).item(), self._rand(1).item(), self._rand(2), self._rand(1).item()
        scale = 0.7 + 0.3 * area
        ratio = float(np.exp(np.log(3 / 4) + (np.log(4 / 3) - np.log(3 / 4)) * log_ratio))
        w = min(size, max(1, round(size * (scale * ratio) ** 0.5)))
        h = min(size, max(1, round(size * (scale / ratio) ** 0.5)))
        top, left = int(pos[0] * (size - h + 1)), int(pos[1] * (size - w + 1))
        crop = x[:, top:top + h, left:left + w].float().unsqueeze(0)
        out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False).squeeze(0)
        if flip < 0.5:
            out = out.flip(-1)
        return out.round().clamp(0, 255)

    def __getitem__(self, index: int) -> dict:
        x = self.pixels(index)
        if self.augment:
            x = self._augment(x)
        record = self.records[index]
        ids = self.encode_title(record.title) if self.encode_title is not None and record.title else []
        return {"image": normalize(x), "label": self.labels[index], "tokens": torch.as_tensor(ids, dtype=torch.long)}


def collate(batch: list[dict]) -> dict:
    """Stack images and labels; pad token ids with 0 to the longest title (at least 1 column)."""
    tokens = [item["tokens"] for item in batch]
    width = max([1, *(len(t) for t in tokens)])
    padded = torch.zeros(len(batch), width, dtype=torch.long)
    for i, t in enumerate(tokens):
        padded[i, :len(t)] = t
    return {"image": torch.stack([item["image"] for item in batch]),
            "label": torch.tensor([item["label"] for item in batch], dtype=torch.long),
            "tokens": padded}
