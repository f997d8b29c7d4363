"""Where a recognizer's classifier W [C, d] lives on disk, and reading it back a block of rows at a time.

A model trained with a class-sharded classifier stays sharded: rank r of N writes its own rows to
`model-classifier-<r>-of-<N>.pt` beside model.pt (no rank ever gathers W), and model.pt lists the
shards with their row ranges, the sha256 of each file (so model.pt's own digest pins all of W) and an
export id that every shard repeats: a shard left by another export (a run killed between writing its
shards and model.pt) is refused by name.

Reading maps each file (`torch.load(mmap=True)`) only for the block of rows being scored and unmaps it
afterwards, so a process holds one block of W at a time, whatever C is. Files on S3 are first copied
to a local temporary directory, which lives as long as the `ClassifierRows` that reads them.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from tempfile import TemporaryDirectory

import torch

from sicot import storage
from sicot.torchfile import TorchFileError, load_mapped

SHARD_FORMAT = "sicot.classifier-shard/1"


class ClassifierFileError(TorchFileError):
    """A classifier shard or shard list that does not make up W; a damaged file is a TorchFileError."""


def shard_name(rank: int, world_size: int) -> str:
    return f"model-classifier-{rank}-of-{world_size}.pt"


def sibling(model_uri: str, name: str) -> str:
    """The file `name` in model.pt's directory (local or S3)."""
    return storage.join(model_uri.rsplit("/", 1)[0], name) if "/" in model_uri else name


def save_shard(model_uri: str, rows: torch.Tensor, start: int, rank: int, world_size: int, export: str) -> dict:
    """Write this rank's rows [start, start + len(rows)) of W beside model.pt; returns its model.pt entry."""
    name = shard_name(rank, world_size)
    stop = start + rows.shape[0]
    buffer = io.BytesIO()
    torch.save({"format": SHARD_FORMAT, "export": export, "rank": rank, "world_size": world_size,
                "rows": [start, stop], "weight": rows.detach().float().cpu().contiguous()}, buffer)
    data = buffer.getvalue()
    storage.write_bytes(sibling(model_uri, name), data)
    return {"file": name, "rows": [start, stop], "sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class RowFile:
    """Rows [start, stop) of W, stored in the torch file `path` (local) at `key` of its dict."""
    path: str
    start: int
    stop: int
    key: tuple[str, ...] = ("weight",)


def _rows_in(blob: dict, key: tuple[str, ...]) -> torch.Tensor:
    for part in key:
        blob = blob[part]
    return blob


class ClassifierRows:
    """W [C, d] stored in one or more files, read whole (`load`) or a block at a time (`blocks`)."""

    def __init__(self, files: list[RowFile], dim: int, downloads: TemporaryDirectory | None = None):
        self.files, self.dim = files, dim
        self.num_classes = files[-1].stop if files else 0
        self._downloads = downloads  # keeps copied S3 files alive while they are read

    @property
    def nbytes(self) -> int:
        return self.num_classes * self.dim * 4

    def blocks(self, max_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first class index, rows [<= max_rows, d]) over all of W in order; each file is mapped for one
        block only, so at most that block is resident."""
        for f in self.files:
            for lo in range(0, f.stop - f.start, max_rows):
                rows = _rows_in(load_mapped(f.path, "classifier file"), f.key)[lo:lo + max_rows]
                yield f.start + lo, rows
                del rows

    def load(self) -> torch.Tensor:
        """All of W in memory."""
        return torch.cat([_rows_in(load_mapped(f.path, "classifier file"), f.key) for f in self.files])


def local_path(uri: str, downloads: TemporaryDirectory | None) -> tuple[str, TemporaryDirectory | None]:
    """A local path for `uri`, copying an S3 object into `downloads` (created on first use)."""
    if not storage.is_s3(uri):
        return uri, downloads
    downloads = downloads or TemporaryDirectory(prefix="sicot-model-")
    return str(storage.local_copy(uri, os.path.join(downloads.name, uri.rsplit("/", 1)[-1]))), downloads


def sharded_rows(model_uri: str, layout: dict, num_classes: int, dim: int) -> ClassifierRows:
    """The shards model.pt's `classifier` entry lists, checked: together they hold each of the
    `num_classes` rows exactly once, each file is the shard of this export it claims to be."""
    shards, world, export = layout["shards"], layout["world_size"], layout["export"]
    if len(shards) != world:
        raise ClassifierFileError(f"{model_uri}: lists {len(shards)} classifier shard(s) for {world} ranks")
    expected = 0
    for entry in sorted(shards, key=lambda e: tuple(e["rows"])):
        start, stop = entry["rows"]
        if start != expected:
            problem = "overlap" if start < expected else "leave a gap"
            raise ClassifierFileError(f"{model_uri}: classifier shard {entry['file']} starts at row {start} but the "
                                      f"rows before it end at {expected}: the shards {problem}")
        expected = stop
    if expected != num_classes:
        raise ClassifierFileError(f"{model_uri}: the classifier shards end at row {expected}, the model has "
                                  f"{num_classes} classes")
    files, downloads = [], None
    for entry in sorted(shards, key=lambda e: tuple(e["rows"])):
        uri = sibling(model_uri, entry["file"])
        if not storage.exists(uri):
            raise ClassifierFileError(f"{uri}: classifier shard missing ({model_uri} names it)")
        path, downloads = local_path(uri, downloads)
        _check_shard(uri, load_mapped(path, "classifier shard", uri), entry, world, export, dim)
        files.append(RowFile(path, *entry["rows"]))
    return ClassifierRows(files, dim, downloads)


def _check_shard(uri: str, blob, entry: dict, world: int, export: str, dim: int) -> None:
    if not isinstance(blob, dict) or blob.get("format") != SHARD_FORMAT:
        found = blob.get("format", "no format tag") if isinstance(blob, dict) else type(blob).__name__
        raise ClassifierFileError(f"{uri}: not a sicot classifier shard (format {found!r})")
    if blob["world_size"] != world:
        raise ClassifierFileError(f"{uri}: a shard of {blob['world_size']} ranks, the model lists {world}")
    if blob["export"] != export:
        raise ClassifierFileError(f"{uri}: written by another export ({blob['export']}) than model.pt names "
                                  f"({export}); an export was interrupted: export the model again")
    start, stop = entry["rows"]
    if list(blob["rows"]) != [start, stop] or tuple(blob["weight"].shape) != (stop - start, dim):
        raise ClassifierFileError(f"{uri}: holds rows {blob['rows']} of shape {tuple(blob['weight'].shape)}, "
                                  f"model.pt expects rows [{start}, {stop}) of {dim} features")
