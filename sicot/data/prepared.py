"""The prepared dataset: what `prepare_data` writes and every later step reads.

It is a contract dataset (docs/architecture.md#dataset-contract) whose train/val/test/holdout images live in
WebDataset shards (`sicot.data.shards`) and whose catalog images stay files, one per product, as the
service hands them out: `<split>.jsonl`, `catalog.jsonl`, `labels.json`, `shards/index.json`,
`shards/<split>-NNNNNN.tar`, and the catalog's images. A record's `image` stays the image's name in the
dataset it came from; a split's records are in the order of its shards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TextIO

from sicot import storage
from sicot.data.manifest import CATALOG, DatasetError, Manifest, Problem, Record, _under, load_manifest
from sicot.data.shards import INDEX, Shard, ShardError, ShardWriter, check_index, write_index


def stored_name(manifest: Manifest, record: Record) -> str:
    """An image's name in the prepared dataset: its own relative path (also for an s3:// image under the
    dataset's own prefix), or `images/s3/<bucket>/<key>` for one under another allowed prefix."""
    if not storage.is_s3(record.image):
        return PurePosixPath(record.image.replace("\\", "/")).as_posix()
    if _under(record.image, manifest.root):
        return record.image[len(manifest.root.rstrip("/")) + 1:]
    return "images/s3/" + record.image[len("s3://"):]


def _place(src: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_s3(src):
        storage.local_copy(src, dest)
        return
    try:
        os.link(src, dest)  # same filesystem: no bytes copied
    except OSError:
        shutil.copy2(src, dest)


def _read_all(uris: list[str]) -> Iterator[bytes]:
    """Each URI's bytes, in order: local files one after another, S3 objects 16 at a time, 256 ahead."""
    if not any(map(storage.is_s3, uris)):
        yield from map(storage.read_bytes, uris)
        return
    with ThreadPoolExecutor(max_workers=16) as pool:
        for start in range(0, len(uris), 256):
            yield from pool.map(storage.read_bytes, uris[start:start + 256])


def write_prepared(manifest: Manifest, out_dir: str | Path, shard_images: int = 1000, shard_mb: float = 100,
                   seed: int = 0) -> None:
    """Write `manifest` as the prepared dataset in the local directory `out_dir`.

    The training split is written in an order shuffled by `seed`, so every shard (and every run of one) is
    a sample of all classes and a stream that reads a few shards at a time still mixes them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[Shard]] = {}
    for kind, records in manifest.splits().items():
        # records are written as they go: a split's lines held and joined would be ~0.7 KB a record
        with open(out / f"{kind}.jsonl", "w", encoding="utf-8") as lines:
            if kind == CATALOG:
                _write_catalog(manifest, records, out, lines)
                continue
            if kind == "train":
                records = list(records)
                random.Random(seed).shuffle(records)
            writer = ShardWriter(out, kind, shard_images, int(shard_mb * 2 ** 20))
            for record, data in zip(records, _read_all([manifest.image_uri(r) for r in records])):
                record = dataclasses.replace(record, image=stored_name(manifest, record))
                writer.add(record, data)
                lines.write(record.to_json() + "\n")
            shards[kind] = writer.close()
    write_index(out, shards)
    (out / "labels.json").write_text(json.dumps({"classes": manifest.classes()}, ensure_ascii=False, indent=1) + "\n",
                                     encoding="utf-8")


def _write_catalog(manifest: Manifest, records: Iterable[Record], out: Path, lines: TextIO) -> None:
    """Catalog images become files of the prepared dataset (hard-linked when possible), s3:// ones too."""
    placed = set()
    for record in records:
        if record.image:
            rel = stored_name(manifest, record)
            dest = out / rel
            if not dest.resolve().is_relative_to(out.resolve()):  # load_manifest refuses such paths
                raise DatasetError(manifest.root, [Problem("catalog.jsonl", 0, f"image {record.image!r} "
                                                           "would be written outside the dataset")])
            if rel not in placed:
                _place(manifest.image_uri(record), dest)
                placed.add(rel)
            record = dataclasses.replace(record, image=rel)
        lines.write(record.to_json() + "\n")


def load_prepared(root: str) -> Manifest:
    """The prepared dataset at `root` (a local path, an s3:// prefix or a DVC version), its shard index
    checked against its records. Images are not opened: `prepare_data` checked every one."""
    manifest = load_manifest(root, check_images=False)
    uri = storage.join(root, INDEX)
    try:
        raw = json.loads(storage.read_text(uri))
        shards = {split: [Shard(**s) for s in listed] for split, listed in raw["splits"].items()}
    except FileNotFoundError:
        raise ShardError(f"{uri}: not found; {root} is not a prepared dataset (or was prepared by an older "
                         "version): run prepare_data") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ShardError(f"{uri}: not a shard index ({exc}); re-run prepare_data") from None
    check_index(shards, {k: len(v) for k, v in manifest.splits().items() if k != CATALOG}, uri)
    return dataclasses.replace(manifest, shards=shards)
