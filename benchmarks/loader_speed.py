"""Training images/s of the data loader on one CPU core, against torchvision's own decode + crop.

    python -m benchmarks.loader_speed                    # 320 px JPEGs -> 224 px, 256 images, 7 rounds
    python -m benchmarks.loader_speed --source 800 --images 128

Both pipelines read the same JPEGs from a temporary directory, one thread, no worker processes, and end
in the same batch (normalised float [B,3,224,224]):
- `ShardStream` (as training reads it): the JPEGs in WebDataset shards of 100 images, read front to back
  through a shuffle buffer, decode (torchvision, Pillow fallback), random resized crop (70-100% of the area)
  to 224² and flip, collate; its cache is off (`cached`: every decoded image in memory, so only reading
  the shards, crop, flip and collate remain);
- reference: one file per image, `torchvision.io.decode_jpeg` + `transforms.v2.RandomResizedCrop(224)`
  (same area and aspect range) + `RandomHorizontalFlip`, stacked and normalised by the same function.
Rounds alternate between the pipelines so both see the same machine load; reported: each pipeline's best
round, and the median over rounds of its rate over the reference's in the same round.
Benchmarks measure, they assert nothing.
"""
from __future__ import annotations

import argparse
import io
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from sicot.data.dataset import CROP_AREA, CROP_LOG_RATIO, ProductImages, collate, normalize_batch
from sicot.data.manifest import Record
from sicot.data.shards import ShardWriter
from sicot.data.stream import ShardStream

SIZE = 224


def write_photos(directory: Path, count: int, side: int) -> list[Record]:
    """`count` photo-like JPEGs (smooth colour fields with detail, quality 90), one product each."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
        detail = rng.normal(0, 8, (side, side, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + detail, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        (directory / f"{i}.jpg").write_bytes(buffer.getvalue())
        records.append(Record(image=f"{i}.jpg", sku=f"SKU-{i}", title="", tags=()))
    return records


class TorchvisionReference(Dataset):
    """What a torchvision user writes: decode_jpeg, RandomResizedCrop, RandomHorizontalFlip."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        ratio = tuple(math.exp(r) for r in CROP_LOG_RATIO)
        self.transform = v2.Compose([v2.RandomResizedCrop(SIZE, scale=CROP_AREA, ratio=ratio, antialias=True),
                                     v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        data = torch.frombuffer(bytearray(self.paths[index].read_bytes()), dtype=torch.uint8)
        return self.transform(decode_jpeg(data, mode=ImageReadMode.RGB))


def reference_collate(batch: list[torch.Tensor]) -> torch.Tensor:
    return normalize_batch(torch.stack([x.permute(1, 2, 0) for x in batch]))


def images_per_s(loader: DataLoader) -> float:
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["label"]) if isinstance(batch, dict) else len(batch)
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="JPEGs per round (default: 256)")
    p.add_argument("--source", type=int, default=320, help="side of the square JPEGs in pixels (default: 320)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--rounds", type=int, default=7, help="rounds per pipeline (default: 7)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = write_photos(root, args.images, args.source)
        index = {r.sku: i for i, r in enumerate(records)}
        writer = ShardWriter(root, "train", 100, 2 ** 30)
        for r in records:
            writer.add(r, (root / r.image).read_bytes())
        shards = writer.close()

        def ours(cache_bytes: int) -> DataLoader:
            images = ProductImages(index, SIZE, augment=True, cache_bytes=cache_bytes)
            stream = ShardStream(images, tmp, shards, args.batch, shuffle=True, drop_last=True, buffer=1000)
            return DataLoader(stream, batch_size=args.batch, collate_fn=collate)

        cached = ours(cache_bytes=len(records) * 3 * args.source ** 2)
        images_per_s(cached)  # fills the cache
        loaders = {"ShardStream": ours(cache_bytes=0),
                   "torchvision reference": DataLoader(TorchvisionReference([root / r.image for r in records]),
                                                       batch_size=args.batch, shuffle=True,
                                                       collate_fn=reference_collate),
                   "ShardStream, cached": cached}
        rates = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(images_per_s(loader))
    reference = rates["torchvision reference"]
    print(f"{args.images} JPEGs of {args.source}x{args.source} -> {SIZE}x{SIZE}, batch {args.batch}, 1 thread, "
          f"{args.rounds} rounds")
    print("| pipeline | images/s per core (best round) | / reference (median of rounds) |\n|---|---:|---:|")
    for name, rate in rates.items():
        ratio = statistics.median(r / ref for r, ref in zip(rate, reference))
        print(f"| {name} | {max(rate):.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
