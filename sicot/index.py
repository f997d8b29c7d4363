"""The product index: the catalog facts and image embeddings that recognition and retrieval serve.

Layout under a root (a local folder or `s3://bucket/prefix`); every byte goes through `sicot.storage`:

    index/CURRENT                          {"version": V, "history": [V, older...]}: what readers load
    index/<V>/manifest.json                written once every shard is complete; checksums of all files
    index/<V>/shards/<k>/skus.jsonl        one line per SKU: sku, title, tags, image, class_index
    index/<V>/shards/<k>/embeddings.npy    float32, L2-normalised; row i belongs to line i
    index/<V>/shards/<k>/shard.json        written last: marks the shard complete

A version is immutable and named from the model version, the catalog and the shard count, so
re-running a build is idempotent: complete shards are skipped. Shards are built independently (one
Kubernetes Job index each); `publish` then checks them, writes the manifest and moves CURRENT with a
compare-and-swap. Readers go CURRENT → manifest → shards, so a killed build or publish never shows.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from sicot import storage

SKU_FILE = "skus.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
SHARD_MARKER = "shard.json"
MANIFEST = "manifest.json"


class IndexStoreError(RuntimeError):
    """A missing, incomplete or corrupted index, or catalog input the index cannot hold."""


class PublishConflict(IndexStoreError):
    """CURRENT moved between our read and our switch: another publisher won; nothing was overwritten."""


# ---- naming -------------------------------------------------------------------------------------

# What `version_id` makes: a name that is one path segment and can never be empty, `.` or `..`.
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_version_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _VERSION_NAME.fullmatch(name):
        raise IndexStoreError(f"{where}: {name!r} is not an index version name (letters, digits, '.', '_', '-'; "
                              "starting with a letter or digit)")
    return name


def index_uri(root: str) -> str:
    return storage.join(root, "index")


def version_uri(root: str, version: str) -> str:
    return storage.join(root, "index", version)


def shard_uri(version_dir: str, shard_id: int) -> str:
    return storage.join(version_dir, "shards", str(shard_id))


def shard_of(sku: str, num_shards: int) -> int:
    """Stable across processes and machines (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.sha256(sku.encode("utf-8")).digest()[:8], "big") % num_shards


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- catalog ------------------------------------------------------------------------------------

def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def catalog_entry(record: Any, position: int) -> dict:
    """The SKU facts of one catalog record (a catalog.jsonl dict or an object with those attributes)."""
    where = f"catalog record {position}"
    sku = _field(record, "sku")
    if not isinstance(sku, str) or not sku:
        raise IndexStoreError(f"{where}: 'sku' must be a non-empty string, got {sku!r}")
    title, tags, image = _field(record, "title"), _field(record, "tags"), _field(record, "image")
    title = "" if title is None else title
    tags = [] if tags is None else tags
    if not isinstance(title, str):
        raise IndexStoreError(f"{where} (sku {sku}): 'title' must be a string, got {type(title).__name__}")
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise IndexStoreError(f"{where} (sku {sku}): 'tags' must be a list of strings")
    if not isinstance(image, str) or not image:
        raise IndexStoreError(f"{where} (sku {sku}): 'image' must be a non-empty string")
    return {"sku": sku, "title": title, "tags": list(tags), "image": image}


def _entries(records: Iterable[Any]) -> list[tuple[dict, Any]]:
    """(facts, original record) for every record, sorted by SKU so order in the catalog does not matter."""
    out, seen = [], {}
    for position, record in enumerate(records, start=1):
        entry = catalog_entry(record, position)
        if entry["sku"] in seen:
            raise IndexStoreError(f"catalog record {position}: sku {entry['sku']} repeats record {seen[entry['sku']]}")
        seen[entry["sku"]] = position
        out.append((entry, record))
    return sorted(out, key=lambda pair: pair[0]["sku"])


def catalog_checksum(records: Iterable[Any]) -> str:
    canonical = [json.dumps(entry, sort_keys=True, ensure_ascii=False) for entry, _ in _entries(records)]
    return _sha256("\n".join(canonical).encode("utf-8"))


def version_id(model_version: str, records: Iterable[Any], num_shards: int) -> str:
    """Deterministic version name: the same model, catalog and shard count always give the same one."""
    digest = _sha256(f"{model_version}\n{num_shards}\n{catalog_checksum(records)}".encode())[:16]
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", model_version).strip("-.")[:40]
    return f"{label}-{digest}" if label else digest


# ---- building ------------------------------------------------------------------------------------

def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def build_shard(catalog_records: Iterable[Any], shard_id: int, num_shards: int,
                embed: Callable[[list[bytes]], np.ndarray], read_image: Callable[[Any], bytes],
                class_index: Mapping[str, int], out_uri: str, batch_size: int = 128) -> dict:
    """Write shard `shard_id` of `num_shards` under `out_uri` (= `version_uri(root, version)`).

    `embed` maps a batch of image bytes to an (n, d) array; `read_image` gets a catalog record and
    returns its image bytes. SKUs that `class_index` lacks (new arrivals) get class_index -1 and are
    found by `ProductIndex.nearest`. A shard already complete is skipped, so re-runs are cheap.
    Returns the shard's marker (id, count, dim, file checksums) plus `skipped`.
    """
    if not 0 <= shard_id < num_shards:
        raise IndexStoreError(f"shard {shard_id} is outside 0..{num_shards - 1}")
    if batch_size < 1:
        raise IndexStoreError(f"batch_size must be >= 1, got {batch_size}")
    base = shard_uri(out_uri, shard_id)
    marker_uri = storage.join(base, SHARD_MARKER)
    if storage.exists(marker_uri):
        marker = json.loads(storage.read_text(marker_uri))
        if marker.get("num_shards") != num_shards:
            raise IndexStoreError(f"{marker_uri}: built for {marker.get('num_shards')} shards, not {num_shards}")
        return {**marker, "skipped": True}

    mine = [(e, r) for e, r in _entries(catalog_records) if shard_of(e["sku"], num_shards) == shard_id]
    batches = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        vectors = np.asarray(embed([read_image(record) for _, record in chunk]))
        if vectors.ndim != 2 or vectors.shape[0] != len(chunk) or vectors.shape[1] == 0:
            raise IndexStoreError(f"embed returned shape {vectors.shape} for a batch of {len(chunk)} images "
                                  f"(first sku {chunk[0][0]['sku']}); expected ({len(chunk)}, dim)")
        if not np.isfinite(vectors).all():
            raise IndexStoreError(f"embed returned non-finite values in the batch starting at sku {chunk[0][0]['sku']}")
        batches.append(vectors)
    embeddings = _normalise(np.concatenate(batches)) if batches else np.zeros((0, 0), np.float32)

    rows = []
    for entry, _ in mine:
        cls = class_index.get(entry["sku"], -1)
        if not isinstance(cls, (int, np.integer)) or isinstance(cls, bool):
            raise IndexStoreError(f"class_index[{entry['sku']!r}] must be an int, got {cls!r}")
        rows.append(json.dumps({**entry, "class_index": int(cls)}, ensure_ascii=False))
    sku_bytes = ("\n".join(rows) + "\n").encode("utf-8") if rows else b""
    npy_bytes = _npy_bytes(embeddings)

    storage.write_bytes(storage.join(base, SKU_FILE), sku_bytes)
    storage.write_bytes(storage.join(base, EMBEDDINGS_FILE), npy_bytes)
    marker = {"shard": shard_id, "num_shards": num_shards, "count": len(mine), "dim": int(embeddings.shape[1]),
              "files": {SKU_FILE: _sha256(sku_bytes), EMBEDDINGS_FILE: _sha256(npy_bytes)}}
    storage.write_text(marker_uri, json.dumps(marker, indent=1))  # last: the shard is complete
    return {**marker, "skipped": False}


# ---- publishing ----------------------------------------------------------------------------------

_READ_NOW = object()


def read_current(root: str) -> tuple[dict | None, str | None]:
    """The CURRENT pointer (None when nothing is published yet) and its token for a compare-and-swap."""
    uri = storage.join(index_uri(root), "CURRENT")
    data, token = storage.read_versioned(uri)
    if data is None:
        return None, None
    try:
        pointer = json.loads(data)
        if not isinstance(pointer.get("version"), str) or not isinstance(pointer.get("history"), list):
            raise ValueError("needs a string 'version' and a list 'history'")
    except (ValueError, AttributeError) as exc:
        raise IndexStoreError(f"{uri}: not a valid index pointer: {exc}") from None
    check_version_name(pointer["version"], f"{uri}: 'version'")
    return pointer, token


def _verified_shards(vdir: str, num_shards: int) -> list[dict]:
    """Every shard's marker, after checking that its files exist and match their checksums."""
    shards, missing = [], []
    for k in range(num_shards):
        base = shard_uri(vdir, k)
        marker_uri = storage.join(base, SHARD_MARKER)
        if not storage.exists(marker_uri):
            missing.append(k)
            continue
        marker = json.loads(storage.read_text(marker_uri))
        if marker.get("num_shards") != num_shards:
            raise IndexStoreError(f"{marker_uri}: built for {marker.get('num_shards')} shards, not {num_shards}")
        for name, digest in marker["files"].items():
            try:
                actual = _sha256(storage.read_bytes(storage.join(base, name)))
            except FileNotFoundError:
                raise IndexStoreError(f"{storage.join(base, name)}: missing from complete shard {k}") from None
            if actual != digest:
                raise IndexStoreError(f"{storage.join(base, name)}: checksum mismatch in shard {k} "
                                      f"(marker {digest[:12]}…, file {actual[:12]}…); delete {base} and rebuild it")
        shards.append(marker)
    if missing:
        raise IndexStoreError(f"{vdir}: shards {missing} of {num_shards} are not built (or not complete)")
    dims = {m["dim"] for m in shards if m["count"]}
    if len(dims) > 1:
        raise IndexStoreError(f"{vdir}: shards disagree on the embedding size: {sorted(dims)}")
    return shards


def _ensure_manifest(vdir: str, version: str, shards: list[dict], model_uri: str) -> dict:
    """Write the manifest once; a version that already has one keeps it (versions are immutable)."""
    uri = storage.join(vdir, MANIFEST)
    dims = {m["dim"] for m in shards if m["count"]}
    manifest = {
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_uri": model_uri,
        "num_shards": len(shards),
        "dim": dims.pop() if dims else 0,
        "shards": [{"id": m["shard"], "count": m["count"],
                    "files": {name: {"path": f"shards/{m['shard']}/{name}", "sha256": digest}
                              for name, digest in m["files"].items()}} for m in shards],
        "totals": {"skus": sum(m["count"] for m in shards)},
    }
    if storage.swap(uri, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"), expected=None):
        return manifest
    existing = json.loads(storage.read_text(uri))
    if existing["shards"] != manifest["shards"]:
        raise IndexStoreError(f"{uri}: version {version} is already published with other contents; "
                              f"versions are immutable (delete {vdir} to rebuild it)")
    return existing


def publish(root: str, version: str, num_shards: int, keep_versions: int = 3, *, model_uri: str = "",
            expected: str | None | object = _READ_NOW, gc_grace_s: float = 24 * 3600) -> dict:
    """Check every shard of `version`, write its manifest and switch CURRENT to it, atomically.

    The switch is a compare-and-swap against the CURRENT read at the start (or `expected`, a token
    from `read_current` taken earlier, e.g. before the shards were built). If another publisher moved
    CURRENT meanwhile, `PublishConflict` is raised and nothing is overwritten. Only after a successful
    switch are published versions beyond the newest `keep_versions` deleted, and versions no pointer
    names (a losing publisher's, an abandoned build's) once nothing in them changed for `gc_grace_s`
    (long enough that a build still running elsewhere is never touched).
    """
    if keep_versions < 1:
        raise IndexStoreError(f"keep_versions must be >= 1, got {keep_versions}")
    if num_shards < 1:
        raise IndexStoreError(f"num_shards must be >= 1, got {num_shards}")
    check_version_name(version, "version to publish")
    pointer_uri = storage.join(index_uri(root), "CURRENT")
    current, token = read_current(root)
    # Names from the pointer become paths to delete: a damaged one must stop the publish, not steer it.
    for position, name in enumerate(current["history"] if current else []):
        check_version_name(name, f"{pointer_uri}: 'history'[{position}]")
    if expected is not _READ_NOW and token != expected:
        raise PublishConflict(f"{pointer_uri}: moved to {current and current['version']} since it was read; "
                              f"{version} was not published")
    vdir = version_uri(root, version)
    shards = _verified_shards(vdir, num_shards)
    if not sum(m["count"] for m in shards):
        raise IndexStoreError(f"{vdir}: the index holds no SKU; an empty index is never published")
    manifest = _ensure_manifest(vdir, version, shards, model_uri)
    previous = current["version"] if current else None
    result = {"version": version, "uri": vdir, "previous": previous, "skus": manifest["totals"]["skus"],
              "switched": False, "pruned": []}
    if previous == version:
        return result

    history = [version] + [v for v in (current["history"] if current else []) if v != version]
    kept, dropped = history[:keep_versions], history[keep_versions:]
    pointer = {"version": version, "history": kept,
               "published": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if not storage.swap(pointer_uri, json.dumps(pointer, indent=1).encode("utf-8"), token):
        now, _ = read_current(root)
        raise PublishConflict(f"{pointer_uri}: another publisher moved it from {previous} to "
                              f"{now and now['version']} while {version} was being published; not overwritten. "
                              f"Re-run to publish {version} on top of it.")
    for old in dropped:
        storage.delete_tree(version_uri(root, old))
    return {**result, "switched": True, "pruned": dropped, "collected": _collect_unreferenced(root, kept, gc_grace_s)}


def _collect_unreferenced(root: str, referenced: list[str], grace_s: float) -> list[str]:
    """Delete stored versions that CURRENT does not name and that nobody wrote to for `grace_s`."""
    now, collected = datetime.now(timezone.utc).timestamp(), []
    for name in stored_versions(root):
        if name in referenced or not _VERSION_NAME.fullmatch(name):
            continue
        changed = storage.newest_change(version_uri(root, name))
        if changed is None or now - changed >= grace_s:
            storage.delete_tree(version_uri(root, name))
            collected.append(name)
    return collected


# ---- reading -------------------------------------------------------------------------------------

@dataclass
class ProductIndex:
    """One published index version in memory: SKU facts by class and embeddings for retrieval."""
    version: str
    manifest: dict
    skus: list[dict]
    embeddings: np.ndarray
    _by_class: dict[int, int] = field(init=False, repr=False)
    _search: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_class = {}
        for i, row in enumerate(self.skus):
            cls = row["class_index"]
            if cls >= 0 and self._by_class.setdefault(cls, i) != i:
                raise IndexStoreError(f"index {self.version}: class {cls} maps to both "
                                      f"{self.skus[self._by_class[cls]]['sku']} and {row['sku']}")

    def __len__(self) -> int:
        return len(self.skus)

    def lookup(self, class_idx: int) -> dict:
        """sku, title, tags and image of the SKU the classifier calls `class_idx`."""
        try:
            row = self.skus[self._by_class[int(class_idx)]]
        except KeyError:
            raise KeyError(f"class {class_idx} has no SKU in index version {self.version}") from None
        return {k: row[k] for k in ("sku", "title", "tags", "image")}

    def new_arrivals(self) -> ProductIndex:
        """The catalog SKUs the classifier has no class for (class_index -1), as an index of their own,
        so that `nearest` on it retrieves new arrivals only."""
        rows = [i for i, row in enumerate(self.skus) if row["class_index"] < 0]
        return ProductIndex(version=self.version, manifest=self.manifest, skus=[self.skus[i] for i in rows],
                            embeddings=self.embeddings[rows])

    def nearest(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and row numbers in `skus` of the `k` nearest SKUs for each query row."""
        queries = np.asarray(embeddings, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries have {queries.shape[1]} dimensions, index {self.version} has "
                             f"{self.embeddings.shape[1]}")
        if self._search is None:
            import faiss  # exact inner product search; on unit vectors that is cosine similarity

            self._search = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._search.add(np.ascontiguousarray(self.embeddings))
        scores, rows = self._search.search(np.ascontiguousarray(_normalise(queries)), k)
        return scores, rows.astype(np.int64)


def load_version(root: str, version: str) -> ProductIndex:
    """Read and verify one version: every file must match the manifest's checksum."""
    vdir = version_uri(root, version)
    try:
        manifest = json.loads(storage.read_text(storage.join(vdir, MANIFEST)))
    except FileNotFoundError:
        raise IndexStoreError(f"{storage.join(vdir, MANIFEST)}: missing: version {version} is not published") from None
    skus, blocks = [], []
    for shard in manifest["shards"]:
        data = {}
        for name, meta in shard["files"].items():
            uri = storage.join(vdir, meta["path"])
            try:
                data[name] = storage.read_bytes(uri)
            except FileNotFoundError:
                raise IndexStoreError(f"{uri}: missing (shard {shard['id']} of index version {version})") from None
            if _sha256(data[name]) != meta["sha256"]:
                raise IndexStoreError(f"{uri}: checksum mismatch (shard {shard['id']} of index version {version})")
        rows = [json.loads(line) for line in data[SKU_FILE].decode("utf-8").splitlines() if line]
        vectors = np.load(io.BytesIO(data[EMBEDDINGS_FILE]), allow_pickle=False)
        if len(rows) != shard["count"] or vectors.shape[0] != len(rows):
            raise IndexStoreError(f"{vdir}/shards/{shard['id']}: {len(rows)} SKUs, {vectors.shape[0]} embeddings, "
                                  f"manifest says {shard['count']}")
        skus += rows
        if rows:
            blocks.append(vectors)
    embeddings = np.concatenate(blocks) if blocks else np.zeros((0, manifest["dim"]), np.float32)
    return ProductIndex(version=version, manifest=manifest, skus=skus, embeddings=embeddings)


def load_current(root: str, attempts: int = 3) -> ProductIndex:
    """The published index. If a newer publish prunes the version mid-read, follow CURRENT again."""
    pointer = _current_or_error(root)
    for _ in range(attempts - 1):
        try:
            return load_version(root, pointer["version"])
        except IndexStoreError:
            latest = _current_or_error(root)
            if latest["version"] == pointer["version"]:
                raise
            pointer = latest
    return load_version(root, pointer["version"])


def _current_or_error(root: str) -> dict:
    pointer, _ = read_current(root)
    if pointer is None:
        raise IndexStoreError(f"{storage.join(index_uri(root), 'CURRENT')}: no index is published under {root}")
    return pointer


def stored_versions(root: str) -> list[str]:
    """Version directories present under the root (published or not), for operators and tests."""
    return [name for name in storage.list_children(index_uri(root)) if not name.startswith(".") and name != "CURRENT"]


def build_all(catalog_records: Sequence[Any], num_shards: int, embed: Callable[[list[bytes]], np.ndarray],
              read_image: Callable[[Any], bytes], class_index: Mapping[str, int], out_uri: str,
              batch_size: int = 128) -> list[dict]:
    """Every shard in this process (a single-machine publish; on Kubernetes each Job index builds one)."""
    return [build_shard(catalog_records, k, num_shards, embed, read_image, class_index, out_uri, batch_size)
            for k in range(num_shards)]
