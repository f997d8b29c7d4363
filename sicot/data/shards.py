"""A split's images as WebDataset shards, and the stream that trains and evaluates from them.

A shard is a POSIX tar of `<key>.<ext>` (an image's bytes as the dataset held them) and `<key>.json` (its
record), key = the image's position in its split, zero-padded: the WebDataset layout, so `webdataset`, `tar`
or any tar reader can open it. A shard closes at `data.shard_images` images or `data.shard_mb` MB. Reading
is sequential, one shard at a time: an object store serves a 100 MB shard at full bandwidth where a
million small GETs would be latency-bound, and DVC versions a thousand files, not a million.

`ShardStream` plans each epoch from the shard sizes alone, before reading a byte: shards in an order drawn
from (seed, epoch), cut into one equal contiguous run of images per rank (every rank takes the same number
of steps), each rank's run cut into whole batches per DataLoader worker, a bounded shuffle buffer per
worker. So a rank reads only its shards, a worker only its own part, and the order of an epoch depends on
(seed, epoch, ranks, workers) only: a resumed run repeats it exactly.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sicot import storage
from sicot.data.manifest import Record

FOLDER = "shards"
INDEX = "shards/index.json"


class ShardError(ValueError):
    """A shard or shard index that does not hold what the prepared dataset says it does."""


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the prepared dataset, e.g. shards/train-000003.tar
    first: int  # position in the split of its first image
    images: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


class ShardWriter:
    """Writes one split's images, in order, into `<out>/shards/<split>-NNNNNN.tar`.

    Members carry no owner or time, so the same images give the same bytes and DVC the same version."""

    def __init__(self, out: Path, split: str, max_images: int, max_bytes: int):
        self.folder = out / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.max_images, self.max_bytes = split, max_images, max_bytes
        self.shards: list[Shard] = []
        self.tar: tarfile.TarFile | None = None
        self.count = self.size = self.written = 0

    def add(self, record, data: bytes) -> None:
        """Append `record` (a manifest Record, as the prepared dataset names it) and its image's bytes."""
        if self.tar is not None and (self.count >= self.max_images or self.size + len(data) > self.max_bytes):
            self._close_shard()
        if self.tar is None:
            self.path = self.folder / f"{self.split}-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(self.path, "w", format=tarfile.PAX_FORMAT)
        key = f"{self.written:09d}"
        suffix = PurePosixPath(record.image).suffix.lower().lstrip(".")
        self._member(f"{key}.{suffix if suffix.isalnum() else 'img'}", data)
        self._member(f"{key}.json", record.to_json().encode("utf-8"))
        self.count += 1
        self.size += len(data)
        self.written += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self.tar.addfile(info, io.BytesIO(data))

    def _close_shard(self) -> None:
        self.tar.close()
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.shards.append(Shard(f"{FOLDER}/{self.path.name}", self.written - self.count, self.count,
                                 self.path.stat().st_size, digest))
        self.tar, self.count, self.size = None, 0, 0

    def close(self) -> list[Shard]:
        if self.tar is not None:
            self._close_shard()
        return self.shards


def write_index(out: Path, shards: dict[str, list[Shard]]) -> None:
    """`<out>/shards/index.json`: each split's shards, in order."""
    (out / INDEX).parent.mkdir(parents=True, exist_ok=True)
    listed = {split: [s.to_dict() for s in split_shards] for split, split_shards in shards.items()}
    (out / INDEX).write_text(json.dumps({"format": "webdataset", "splits": listed}, indent=1) + "\n", encoding="utf-8")


def check_index(shards: dict[str, list[Shard]], counts: dict[str, int], where: str) -> None:
    """Each split's shards must hold exactly its records, in order."""
    for split, n in counts.items():
        position = 0
        for shard in shards.get(split, []):
            if shard.first != position or shard.images <= 0:
                raise ShardError(f"{where}: {shard.name} starts at image {shard.first}, expected {position}; "
                                 "re-run prepare_data")
            position += shard.images
        if position != n:
            raise ShardError(f"{where}: the {split} shards hold {position} images but {split}.jsonl has {n} "
                             "records; re-run prepare_data")


# --- the epoch's plan ----------------------------------------------------------------------------------

Piece = tuple[int, int, int]  # (shard number, first image, end image) within the shard


def rank_pieces(sizes: list[int], order: list[int], rank: int, ranks: int) -> list[Piece]:
    """Rank `rank`'s run of ceil(total / ranks) images over the shards taken in `order`; the last ranks
    wrap around to the first images so every rank gets the same number (as DistributedSampler pads)."""
    total = sum(sizes)
    per_rank = math.ceil(total / ranks)
    start, stop = rank * per_rank, (rank + 1) * per_rank
    pieces, offset = [], 0
    while start < stop:
        for shard in order:
            lo, hi = max(start, offset), min(stop, offset + sizes[shard])
            if lo < hi:
                pieces.append((shard, lo - offset, hi - offset))
            offset += sizes[shard]
        start = max(start, offset)  # past the end: go round again from the first shard
    return pieces


def take(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    """The images [start, stop) of the run that `pieces` make, as pieces."""
    out, offset = [], 0
    for shard, lo, hi in pieces:
        a, b = max(lo, lo + start - offset), min(hi, lo + stop - offset)
        if a < b:
            out.append((shard, a, b))
        offset += hi - lo
    return out


class ShardStream(IterableDataset):
    """A split's items (`ProductImages.item`: pixels, label, title tokens) streamed from its shards.

    Training (`shuffle=True`, `drop_last=True`): per epoch, shards in a seeded order, this rank's equal
    run, whole batches of it per worker, shuffled through `buffer` images; an image's augmentation seed
    depends on (seed, epoch, position) only. Evaluation: the shards in order, the ragged last batch kept.
    `set_epoch` reaches persistent DataLoader workers through shared memory.
    """

    def __init__(self, images, root: str, shards: list[Shard], batch_size: int, *, rank: int = 0,
                 ranks: int = 1, shuffle: bool = False, drop_last: bool = False, seed: int = 0, buffer: int = 0):
        self.images, self.root, self.shards = images, root, list(shards)
        self.batch_size, self.rank, self.ranks = batch_size, rank, ranks
        self.shuffle, self.seed, self.buffer = shuffle, seed, buffer
        per_rank = math.ceil(sum(s.images for s in self.shards) / ranks)
        # BatchNorm cannot train on a last batch of one image: drop the ragged end when there is a full batch.
        self.length = per_rank - per_rank % batch_size if drop_last and per_rank >= batch_size else per_rank
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.length

    def plan(self, epoch: int, worker: int = 0, workers: int = 1) -> list[Piece]:
        """The pieces of shards that `worker` of `workers` reads in `epoch`, in reading order."""
        sizes = [s.images for s in self.shards]
        order = list(range(len(sizes)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(sizes)).tolist()
        mine = rank_pieces(sizes, order, self.rank, self.ranks) if sizes else []
        batches = math.ceil(self.length / self.batch_size)
        first, last = worker * batches // workers, (worker + 1) * batches // workers
        return take(mine, first * self.batch_size, min(last * self.batch_size, self.length))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch)
        samples = read_pieces(self.root, self.shards, self.plan(epoch, worker, workers))
        if not self.shuffle:
            for position, record, data in samples:
                yield self.images.item(position, record, data)
            return
        samples = _shuffled(samples, self.buffer, random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}"))
        total = sum(s.images for s in self.shards)
        seeds = np.random.default_rng([self.seed, epoch]).integers(2 ** 63, size=total)  # 8 bytes an image
        for position, record, data in samples:
            yield self.images.item(position, record, data, int(seeds[position]))


def read_pieces(root: str, shards: list[Shard], pieces: list[Piece]) -> Iterator[tuple[int, Record, bytes]]:
    """(position in the split, record, image bytes) of each piece's images, reading each shard front to
    back: an image member, then its record."""
    for number, lo, hi in pieces:
        shard = shards[number]
        uri = storage.join(root, shard.name)
        position, image, record_next = shard.first, None, False
        try:
            with storage.open_read(uri) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    if position >= shard.first + hi:
                        break
                    key, _, ext = member.name.partition(".")
                    if key != f"{position:09d}" or not member.isfile() or (ext == "json") != record_next:
                        raise ShardError(f"{uri}: member {member.name!r} where image {position}'s "
                                         f"{'record' if record_next else 'image'} belongs; re-run prepare_data")
                    wanted = position >= shard.first + lo
                    if not record_next:
                        image = tar.extractfile(member).read() if wanted else None
                    else:
                        if wanted:
                            yield position, _record(tar.extractfile(member).read(), uri, member.name), image
                        position += 1
                    record_next = not record_next
        except (tarfile.TarError, EOFError) as exc:
            raise ShardError(f"{uri}: unreadable shard ({exc}); re-run prepare_data") from None
        if position < shard.first + hi:
            raise ShardError(f"{uri}: holds {position - shard.first} images, the index says {shard.images}; "
                             "re-run prepare_data")


def _record(raw: bytes, uri: str, name: str) -> Record:
    try:
        obj = json.loads(raw)
        return Record(image=obj["image"], sku=obj["sku"], title=obj["title"], tags=tuple(obj["tags"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise ShardError(f"{uri}: member {name!r} is not a record ({exc!r}); re-run prepare_data") from None


def split_images(root: str, shards: list[Shard]) -> Iterator[tuple[int, Record, bytes]]:
    """Every image of a split, in order: (position, record, bytes)."""
    return read_pieces(root, shards, [(i, 0, s.images) for i, s in enumerate(shards)])


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """`items` in a random order drawn through a buffer of `size`: memory bounded, order reproducible."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= max(size, 1):
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
