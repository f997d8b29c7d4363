"""URIs in, bytes and files out: local paths and `s3://bucket/key` behind one small API.

A directory versioned by DVC is read in place, from DVC's cache or remote (local or S3), by naming its
`.dir` object: `<cache or remote>/files/md5/ab/cdef….dir/train.jsonl` is `train.jsonl` of exactly that
version. The `.dir` object lists every file's path and md5, and each file is stored under its md5; such
a tree is immutable, so writing into one is an error.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 PUT is atomic by
nature. `swap` is a compare-and-swap (S3 conditional writes `If-None-Match: *` / `If-Match: <etag>`,
a file lock locally), so two concurrent writers of a pointer such as `index/CURRENT` cannot both win.
The S3 endpoint and credentials come from boto3's usual sources (`AWS_ENDPOINT_URL`, `AWS_*` keys).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class StorageError(OSError):
    pass


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


# <odb>/files/md5/<2 hex>/<30 hex>.dir[/<path inside the tree>]: DVC 3's layout of caches and remotes.
_DVC_TREE = re.compile(r"^(?P<odb>.*)/files/md5/(?P<head>[0-9a-f]{2})/(?P<tail>[0-9a-f]{30})\.dir(?:/(?P<rel>.*))?$")


def dvc_tree(uri: str) -> tuple[str, str] | None:
    """(URI of the `.dir` object, path inside it) for a URI in a DVC-versioned directory, else None."""
    match = _DVC_TREE.match(str(uri).rstrip("/"))
    if not match:
        return None
    tree = f"{match['odb']}/files/md5/{match['head']}/{match['tail']}.dir"
    return tree, match["rel"] or ""


def dvc_tree_uri(odb: str, md5: str) -> str:
    """The URI of directory version `md5` (`<32 hex>.dir`) in the DVC cache or remote `odb`."""
    return f"{str(odb).rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


def is_dvc_tree(uri: str) -> bool:
    return dvc_tree(uri) is not None


@functools.lru_cache(maxsize=64)
def _dvc_listing(tree: str) -> dict[str, str]:
    """relpath -> md5 of every file in the tree (read once: a version never changes)."""
    try:
        entries = json.loads(read_bytes(tree))
        return {entry["relpath"]: entry["md5"] for entry in entries}
    except FileNotFoundError:
        raise FileNotFoundError(f"{tree}: no such DVC directory version (pushed to this cache or remote?)") from None
    except (ValueError, TypeError, KeyError):
        raise StorageError(f"{tree}: not a DVC directory listing") from None


def _dvc_object(uri: str) -> str:
    """The stored object behind a file in a DVC tree."""
    tree, rel = dvc_tree(uri)
    odb = tree[: tree.index("/files/md5/")]
    try:
        md5 = _dvc_listing(tree)[rel]
    except KeyError:
        raise FileNotFoundError(f"{uri}: no file {rel!r} in DVC directory version {tree}") from None
    return dvc_tree_uri(odb, md5)


def _refuse_dvc_write(uri: str) -> None:
    if is_dvc_tree(uri):
        raise StorageError(f"{uri}: inside a DVC-versioned directory, which is immutable")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in S3 URI")
    return bucket, key


def bucket_of(uri: str) -> str:
    return _split(uri)[0]


@functools.cache
def s3():
    import boto3  # lazy: boto3 costs import time and is only needed for s3:// URIs

    # A fresh session, not boto3's default one: that caches the credentials it first found, so
    # `s3.cache_clear()` after the environment changes would otherwise keep signing with the old keys.
    return boto3.session.Session().client("s3")


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound")


def read_bytes(uri: str) -> bytes:
    if (tree := dvc_tree(uri)) and tree[1]:
        return read_bytes(_dvc_object(uri))
    if is_s3(uri):
        bucket, key = _split(uri)
        try:
            return s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(uri) from None
            raise
    return Path(uri).read_bytes()


def open_read(uri: str) -> contextlib.AbstractContextManager[BinaryIO]:
    """`uri` as a binary stream to read front to back (an S3 object's body as it downloads), for `with`."""
    if (tree := dvc_tree(uri)) and tree[1]:
        return open_read(_dvc_object(uri))
    if is_s3(uri):
        bucket, key = _split(uri)
        try:
            return contextlib.closing(s3().get_object(Bucket=bucket, Key=key)["Body"])
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(uri) from None
            raise
    return open(uri, "rb")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def exists(uri: str) -> bool:
    if tree := dvc_tree(uri):
        tree_uri, rel = tree
        return rel == "" and exists(tree_uri) or rel in _dvc_listing(tree_uri)
    if is_s3(uri):
        bucket, key = _split(uri)
        try:
            s3().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise
    return Path(uri).exists()


def write_bytes(uri: str, data: bytes) -> None:
    """Write all of `data` or nothing: readers never see a partial file."""
    _refuse_dvc_write(uri)
    if is_s3(uri):
        bucket, key = _split(uri)
        s3().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_keys(prefix: str) -> list[str]:
    """Every object (file) under `prefix`, as full URIs, sorted."""
    if tree := dvc_tree(prefix):
        tree_uri, rel = tree
        under = rel.rstrip("/") + "/" if rel else ""
        return sorted(f"{tree_uri}/{path}" for path in _dvc_listing(tree_uri) if path.startswith(under))
    if is_s3(prefix):
        bucket, key = _split(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out = []
        for page in s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        return sorted(out)
    root = Path(prefix)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def list_children(prefix: str) -> list[str]:
    """Names directly under `prefix` (one level), sorted."""
    if tree := dvc_tree(prefix):
        tree_uri, rel = tree
        under = rel.rstrip("/") + "/" if rel else ""
        return sorted({path[len(under):].split("/")[0] for path in _dvc_listing(tree_uri) if path.startswith(under)})
    if is_s3(prefix):
        bucket, key = _split(prefix)
        key = key.rstrip("/") + "/" if key else ""
        names = set()
        for page in s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            names |= {p["Prefix"][len(key):].strip("/") for p in page.get("CommonPrefixes", [])}
            names |= {o["Key"][len(key):] for o in page.get("Contents", [])}
        return sorted(names)
    root = Path(prefix)
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def newest_change(prefix: str) -> float | None:
    """When anything under `prefix` was last written (seconds since the epoch); None when it is empty."""
    if is_s3(prefix):
        bucket, key = _split(prefix)
        key = key.rstrip("/") + "/" if key else ""
        times = [obj["LastModified"].timestamp()
                 for page in s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
                 for obj in page.get("Contents", [])]
        return max(times, default=None)
    root = Path(prefix)
    return max((p.stat().st_mtime for p in root.rglob("*") if p.is_file()), default=None) if root.is_dir() else None


def delete(uri: str) -> None:
    """Remove one object or file; a missing one is not an error."""
    _refuse_dvc_write(uri)
    if is_s3(uri):
        bucket, key = _split(uri)
        s3().delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(uri)


def delete_tree(prefix: str) -> None:
    _refuse_dvc_write(prefix)
    if is_s3(prefix):
        keys = [_split(u)[1] for u in list_keys(prefix)]
        bucket = _split(prefix)[0]
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start:start + 1000]]
            errors = s3().delete_objects(Bucket=bucket, Delete={"Objects": chunk}).get("Errors", [])
            if errors:  # a batch delete reports failures per key instead of raising
                first = errors[0]
                raise StorageError(f"s3://{bucket}/{first['Key']}: delete failed: {first.get('Message', first)}")
        return
    shutil.rmtree(prefix, ignore_errors=True)


def etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The object and a token for `swap` (None, None when it does not exist)."""
    if is_s3(uri):
        bucket, key = _split(uri)
        try:
            obj = s3().get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return None, None
            raise
        return obj["Body"].read(), obj["ETag"]
    try:
        data = Path(uri).read_bytes()
    except FileNotFoundError:
        return None, None
    return data, etag(data)


@contextlib.contextmanager
def _local_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def swap(uri: str, data: bytes, expected: str | None) -> bool:
    """Write `data` only if the object still matches `expected` (a token from `read_versioned`;
    None = must not exist). Returns False, writing nothing, when another writer got there first."""
    _refuse_dvc_write(uri)
    if is_s3(uri):
        bucket, key = _split(uri)
        check_conditional_writes(bucket)
        return _conditional_put(bucket, key, data, expected)
    path = Path(uri)
    with _local_lock(path):
        if read_versioned(uri)[1] != expected:
            return False
        write_bytes(uri, data)
        return True


def _conditional_put(bucket: str, key: str, data: bytes, expected: str | None) -> bool:
    cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        s3().put_object(Bucket=bucket, Key=key, Body=data, **cond)
        return True
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        raise


_conditional_ok: set[str] = set()


def check_conditional_writes(bucket: str) -> None:
    """Refuse a store that ignores `If-None-Match` / `If-Match`: there `swap` would silently become
    last-writer-wins and two publishers (or promoters) could both win. Probed once per bucket and process
    with a throw-away object."""
    if bucket in _conditional_ok:
        return
    key = f".sicot-conditional-write-probe/{uuid.uuid4().hex}"
    try:
        _conditional_put(bucket, key, b"first", None)
        create_refused = not _conditional_put(bucket, key, b"second", None)
        stale_refused = not _conditional_put(bucket, key, b"third", '"00000000000000000000000000000000"')
    finally:
        s3().delete_object(Bucket=bucket, Key=key)
    if not (create_refused and stale_refused):
        ignored = "If-None-Match" if not create_refused else "If-Match"
        raise StorageError(f"s3://{bucket}: the S3 store ignores conditional writes ({ignored}); compare-and-swap "
                           "(index CURRENT, promotion lease) cannot be made safe on it. Use a store that honours "
                           "them (AWS S3, SeaweedFS, MinIO, Ceph RGW recent releases)")
    _conditional_ok.add(bucket)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on a directory itself (flock works on directories): no lock file left beside
    the outputs."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _recover_swap(path: Path) -> None:
    """Finish what a crash between `atomic_dir`'s two renames left: the previous output waits under its
    `.old-` name while `path` is missing. Call with the directory's lock held."""
    olds = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        os.replace(olds.pop(), path)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a local directory under a temporary sibling name; it replaces `path` only on success.

    A step killed halfway leaves the previous output (or nothing) in place, never a half output; one
    killed between the two renames of the swap is repaired by the next `atomic_dir` on the same path.
    """
    if is_s3(str(path)):
        raise StorageError(f"{path}: atomic_dir builds a local directory; write objects to S3 one by one")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(path.parent):
        _recover_swap(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        with _dir_lock(path.parent):
            _recover_swap(path)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_copy(uri: str, dest: str | Path) -> Path:
    """Fetch `uri` into the local file `dest` (a no-op copy for local paths), atomically."""
    dest = Path(dest)
    if not is_s3(uri) and Path(uri).resolve() == dest.resolve():
        return dest
    write_bytes(str(dest), read_bytes(uri))
    return dest
