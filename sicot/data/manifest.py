"""The dataset contract: read a dataset directory (local or `s3://`), validate every record, write it back.

A dataset is `train.jsonl`, `val.jsonl`, `test.jsonl` and `catalog.jsonl` (plus an optional
`holdout.jsonl` of new-arrival images whose SKUs are only in the catalog) next to the images they name.
Each bad record becomes a `Problem` naming file, line and reason; `on_bad_record="error"` raises them all
at once, `"skip"` drops them and keeps the list in `Manifest.dropped`. Nothing is dropped silently.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sicot import storage
from sicot.config import ON_BAD_RECORD
from sicot.data.images import ImageError, decode_image

SPLITS = ("train", "val", "test")
CATALOG = "catalog"
HOLDOUT = "holdout"


@dataclass(frozen=True, slots=True)
class Record:
    """One photo (or catalog entry). A million of them are held at once by the steps that list a split,
    so no per-instance dict, and a product's `sku` and tag strings are interned: shared by its records
    (~300 bytes a record instead of ~580)."""
    image: str
    sku: str
    title: str
    tags: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"image": self.image, "sku": self.sku, "title": self.title, "tags": list(self.tags)},
                          ensure_ascii=False)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 for a problem with the whole file
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line else f"{self.file}: {self.reason}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason}


class DatasetError(ValueError):
    """A dataset that breaks the contract; `.problems` holds every problem found, not just the first."""

    def __init__(self, root: str, problems: list[Problem]):
        self.root = root
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"dataset {root}: {len(self.problems)} problem(s):\n{lines}")


@dataclass
class Manifest:
    root: str
    train: list[Record]
    val: list[Record]
    test: list[Record]
    catalog: list[Record]
    dropped: list[Problem] = field(default_factory=list)
    holdout: list[Record] = field(default_factory=list)
    shards: dict = field(default_factory=dict)  # split -> [sicot.data.shards.Shard] of a prepared dataset

    def classes(self) -> list[str]:
        """Sorted unique training SKUs; a class's index is its position here."""
        return sorted({r.sku for r in self.train})

    def image_uri(self, record: Record) -> str:
        return record.image if storage.is_s3(record.image) else storage.join(self.root, record.image)

    def splits(self) -> dict[str, list[Record]]:
        out = {"train": self.train, "val": self.val, "test": self.test, "catalog": self.catalog}
        if self.holdout:
            out["holdout"] = self.holdout
        return out


def _type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                         int: "number", float: "number"}.get(type(value), type(value).__name__)


def _s3_key_problem(uri: str) -> str | None:
    """Why the key of an s3:// image URI is unsafe to use as a path, or None."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        return f"image URI {uri!r} names no object"
    parts = key.split("/")
    if "\\" in key or any(part in ("", ".", "..") for part in parts):
        return f"image URI {uri!r}: empty, '.' or '..' segments are not allowed in an object key"
    return None


def _under(uri: str, prefix: str) -> bool:
    return uri.startswith(prefix.rstrip("/") + "/")


def _check_path(image: str, root: str, image_prefixes: tuple[str, ...]) -> str | None:
    """Why `image` may not be read as part of the dataset at `root`, or None when it may.

    A relative path must stay inside the dataset directory; an s3:// URI must lie under the dataset's own
    prefix or one of `image_prefixes` (`data.image_prefixes`), so a record cannot make the pipeline read
    another bucket with its credentials."""
    if storage.is_s3(image):
        if why := _s3_key_problem(image):
            return why
        allowed = ((root,) if storage.is_s3(root) else ()) + image_prefixes
        if not any(_under(image, prefix) for prefix in allowed):
            where = ", ".join(allowed) if allowed else "none: this dataset is local"
            return (f"image URI {image!r} is outside the dataset's own prefix and data.image_prefixes "
                    f"(allowed: {where})")
        return None
    if "://" in image:
        return f"image {image!r}: only paths inside the dataset and s3:// URIs are supported"
    if image.startswith(("/", "\\")) or (len(image) > 1 and image[1] == ":"):
        return f"image {image!r} is an absolute path; it must be relative to the dataset directory"
    if ".." in PurePosixPath(image.replace("\\", "/")).parts:
        return f"image {image!r} escapes the dataset directory"
    return None


def _parse_line(raw: bytes, kind: str, root: str, image_prefixes: tuple[str, ...]) -> tuple[Record | None, str | None]:
    """One jsonl line -> (record, None) or (None, reason). `kind` is a split name or `catalog`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_type_name(obj)}"
    if "sku" not in obj:
        return None, "missing field 'sku'"
    sku = obj["sku"]
    if not isinstance(sku, str):
        return None, f"field 'sku' must be a string, got {_type_name(sku)}"
    if not sku.strip():
        return None, "field 'sku' is empty"
    title = obj.get("title", "")
    if not isinstance(title, str):
        return None, f"field 'title' must be a string, got {_type_name(title)}"
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return None, "field 'tags' must be a list of strings"
    image = obj.get("image", "" if kind == CATALOG else None)
    if image is None and "image" not in obj:
        return None, "missing field 'image'"
    if not isinstance(image, str):
        return None, f"field 'image' must be a string, got {_type_name(image)}"
    if not image and kind != CATALOG:
        return None, "field 'image' is empty"
    if image and (why := _check_path(image, root, image_prefixes)):
        return None, why
    return Record(image=image, sku=sys.intern(sku), title=title, tags=tuple(map(sys.intern, tags))), None


def _read_jsonl(root: str, name: str, kind: str, required: bool, image_prefixes: tuple[str, ...]):
    """[(line number, record)] and problems of one file; None for the records when the file is missing."""
    try:
        data = storage.read_bytes(storage.join(root, name))
    except FileNotFoundError:
        return None, ([Problem(name, 0, "file not found (required by the dataset contract)")] if required else [])
    rows, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        record, reason = _parse_line(raw.rstrip(b"\r"), kind, root, image_prefixes)
        if reason:
            problems.append(Problem(name, number, reason))
        else:
            rows.append((number, record))
    return rows, problems


class _ImageChecker:
    """Checks each distinct image once (exists, non-empty, decodes fully), in a thread pool."""

    def __init__(self, root: str, verify: bool):
        self.root, self.verify = root, verify
        self.local_root = None if storage.is_s3(root) or storage.is_dvc_tree(root) else os.path.realpath(root)
        self.real_dirs: dict[str, str] = {}

    def uri(self, image: str) -> str:
        return image if storage.is_s3(image) else storage.join(self.root, image)

    def check(self, image: str) -> str | None:
        uri = self.uri(image)
        if self.local_root is not None and not storage.is_s3(image):
            problem = self.check_local(uri, image)
            if problem is not None or not self.verify:
                return problem
        elif not self.verify:
            return None if storage.exists(uri) else f"image not found: {image}"
        try:
            decode_image(storage.read_bytes(uri))
        except FileNotFoundError:
            return f"image not found: {image}"
        except ImageError as exc:
            return f"image {image}: {exc}"
        return None

    def check_local(self, path: str, image: str) -> str | None:
        """Inside the dataset directory once links are followed, a regular file, not empty. One lstat
        per image and one realpath per folder: at a million photos, a full resolve (an lstat per path
        component) and a thread-pool hand-off per image were most of the time of loading a dataset."""
        try:
            info = os.lstat(path)
        except OSError:
            info = None
        if info is not None and stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(path)
        else:
            folder = os.path.dirname(path)
            if (real_folder := self.real_dirs.get(folder)) is None:
                real_folder = self.real_dirs[folder] = os.path.realpath(folder)
            real = os.path.join(real_folder, os.path.basename(path))
        if real != self.local_root and not real.startswith(self.local_root.rstrip(os.sep) + os.sep):
            return f"image {image!r} escapes the dataset directory (through a link)"
        try:
            info = os.stat(real)
        except OSError:
            return f"image not found: {image}"
        if not stat.S_ISREG(info.st_mode):
            return f"image not found: {image}"
        return f"image file is empty: {image}" if info.st_size == 0 else None

    def problems(self, images: set[str]) -> dict[str, str]:
        """The images that fail their check, each with its problem (the good ones are most: not listed)."""
        ordered = sorted(images)
        if self.local_root is not None and not self.verify and not any(map(storage.is_s3, ordered)):
            # a stat or two per image: handing each to a thread pool would cost more than the check
            checked = zip(ordered, map(self.check, ordered))
            return {image: problem for image, problem in checked if problem}
        workers, found = min(16, 2 * (os.cpu_count() or 1)), {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # a block at a time: map() holds a future (~1 KB) per item it was given until the end
            for start in range(0, len(ordered), 4096):
                block = ordered[start:start + 4096]
                found.update((image, problem) for image, problem in zip(block, pool.map(self.check, block)) if problem)
        return found


def load_manifest(root: str, on_bad_record: str = "error", verify_images: bool = True,
                  image_prefixes: Iterable[str] = (), check_images: bool = True) -> Manifest:
    """Read and validate the dataset at `root`; s3:// images may also lie under `image_prefixes`.
    Each image is decoded (`verify_images`), only looked for, or not looked at (not `check_images`).

    Raises DatasetError listing every problem (mode "error"), or only the ones that cannot be skipped
    (a missing file, a split left without records) in mode "skip".
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    root = str(root)
    image_prefixes = tuple(image_prefixes)
    if bad_prefix := next((p for p in image_prefixes if not storage.is_s3(p) or _s3_key_problem(p + "/x")), None):
        raise ValueError(f"data.image_prefixes: {bad_prefix!r} is not an s3://bucket[/prefix] URI")
    if not storage.is_s3(root) and not storage.is_dvc_tree(root) and not Path(root).is_dir():
        raise DatasetError(root, [Problem(root, 0, "dataset directory not found")])
    fatal: list[Problem] = []
    bad: list[Problem] = []
    files: dict[str, list] = {}
    for kind in (*SPLITS, CATALOG, HOLDOUT):
        rows, problems = _read_jsonl(root, f"{kind}.jsonl", kind, kind != HOLDOUT, image_prefixes)
        if rows is None:
            fatal += problems
        else:
            files[kind] = rows
            bad += problems

    verdict = _ImageChecker(root, verify_images).problems(
        {r.image for rows in files.values() for _, r in rows if r.image}) if check_images else {}
    kept: dict[str, list[Record]] = {}
    first_seen: dict[tuple[str, str], str] = {}
    catalog_skus: dict[str, int] = {}
    for kind, rows in files.items():
        kept[kind] = []
        name = f"{kind}.jsonl"
        for number, record in rows:
            reason = verdict.get(record.image) if record.image else None
            if reason is None and kind == CATALOG:
                if record.sku in catalog_skus:
                    first = catalog_skus[record.sku]
                    reason = f"duplicate catalog entry for sku {record.sku!r} (first at line {first})"
                else:
                    catalog_skus[record.sku] = number
            elif reason is None:
                key = (record.image, record.sku)
                if key in first_seen:
                    reason = f"duplicate of {first_seen[key]} (same image and sku)"
                else:
                    first_seen[key] = f"{name}:{number}"
            if reason:
                bad.append(Problem(name, number, reason))
            else:
                kept[kind].append((number, record))

    train_skus = {r.sku for _, r in kept.get("train", [])}
    for kind in ("val", "test"):
        still = []
        for number, record in kept.get(kind, []):
            if record.sku in train_skus:
                still.append((number, record))
            else:
                reason = f"sku {record.sku!r} has no training images in train.jsonl"
                bad.append(Problem(f"{kind}.jsonl", number, reason))
        kept[kind] = still
    still = []
    for number, record in kept.get(HOLDOUT, []):
        if record.sku in catalog_skus:
            still.append((number, record))
        else:
            bad.append(Problem("holdout.jsonl", number, f"sku {record.sku!r} is not in catalog.jsonl"))
    kept[HOLDOUT] = still

    # train and catalog must hold records; val and test may be empty files, but not emptied by skipping
    for kind in (*SPLITS, CATALOG):
        if kind in files and not kept[kind]:
            had = len(files[kind]) + sum(p.file == f"{kind}.jsonl" for p in bad)
            if had:
                fatal.append(Problem(f"{kind}.jsonl", 0, "has no valid records"))
            elif kind in ("train", CATALOG):
                fatal.append(Problem(f"{kind}.jsonl", 0, "has no records"))
    bad.sort(key=lambda p: ((*SPLITS, CATALOG, HOLDOUT).index(p.file.removesuffix(".jsonl")), p.line))
    if fatal or (bad and on_bad_record == "error"):
        raise DatasetError(root, fatal + bad)
    records = {k: [r for _, r in v] for k, v in kept.items()}
    return Manifest(root=root, train=records["train"], val=records["val"], test=records["test"],
                    catalog=records[CATALOG], dropped=bad, holdout=records.get(HOLDOUT, []))
