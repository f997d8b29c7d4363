"""The stream that trains and evaluates from a split's shards (`sicot.data.shards`).

`ShardStream` plans each epoch from the shard sizes alone, before reading a byte: shards in an order drawn
from (seed, epoch), cut into one equal contiguous run of images per rank (every rank takes the same number
of steps), each rank's run cut into whole batches per DataLoader worker, a bounded shuffle buffer per
worker. So a rank reads only its shards, a worker only its own part, and the order of an epoch depends on
(seed, epoch, ranks, workers) only: a resumed run repeats it exactly.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sicot.data.shards import Piece, Shard, read_pieces


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
