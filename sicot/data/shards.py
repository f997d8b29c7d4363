"""A split's images as WebDataset shards: writing, indexing and reading them (`sicot.data.stream` trains
and evaluates from them).

A shard is a POSIX tar of `<key>.<ext>` (an image's bytes as the dataset held them) and `<key>.json` (its
record), key = the image's position in its split, zero-padded: the WebDataset layout, so `webdataset`, `tar`
or any tar reader can open it. A shard closes at `data.shard_images` images or `data.shard_mb` MB. Reading
is sequential, one shard at a time: an object store serves a 100 MB shard at full bandwidth where a
million small GETs would be latency-bound, and DVC versions a thousand files, not a million.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

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


Piece = tuple[int, int, int]  # (shard number, first image, end image) within the shard


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
        return Record(image=obj["image"], sku=sys.intern(obj["sku"]), title=obj["title"],
                      tags=tuple(map(sys.intern, obj["tags"])))
    except (ValueError, TypeError, KeyError) as exc:
        raise ShardError(f"{uri}: member {name!r} is not a record ({exc!r}); re-run prepare_data") from None


def split_images(root: str, shards: list[Shard]) -> Iterator[tuple[int, Record, bytes]]:
    """Every image of a split, in order: (position, record, bytes)."""
    return read_pieces(root, shards, [(i, 0, s.images) for i, s in enumerate(shards)])
