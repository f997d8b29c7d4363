"""The product index: building shards, publishing with an atomic pointer, reading and retrieval."""
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sicot import index, storage

REPO = Path(__file__).resolve().parents[1]
DIM = 8


def make_catalog(n: int = 12, tag: str = "") -> list[dict]:
    return [{"sku": f"SKU{i:03d}", "title": f"品牌{i} 精华液 {tag}".strip(), "tags": ["护肤"] if i % 2 else [],
             "image": f"images/{i:03d}.jpg"} for i in range(n)]


def read_image(record) -> bytes:
    return record["image"].encode()


def fake_embed(images: list[bytes]) -> np.ndarray:
    """Deterministic stand-in for the model: a vector seeded by the image bytes."""
    return np.stack([np.random.default_rng(list(img)).normal(size=DIM) for img in images]).astype(np.float32)


def class_index_for(catalog, known: int) -> dict:
    """The first `known` SKUs are classes the classifier knows; the rest are new arrivals."""
    return {rec["sku"]: i for i, rec in enumerate(catalog[:known])}


def build_version(root, catalog, model="model-1", shards=3, known=8, embed=fake_embed):
    version = index.version_id(model, catalog, shards)
    index.build_all(catalog, shards, embed, read_image, class_index_for(catalog, known),
                    index.version_uri(root, version), batch_size=4)
    return version


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/products"


def test_publish_and_load(root):
    catalog = make_catalog()
    version = build_version(root, catalog)
    result = index.publish(root, version, 3, keep_versions=2, model_uri="models:/sicot/1")
    assert result["switched"] and result["previous"] is None and result["skus"] == len(catalog)

    loaded = index.load_current(root)
    assert loaded.version == version and len(loaded) == len(catalog)
    assert loaded.manifest["model_uri"] == "models:/sicot/1"
    assert sum(s["count"] for s in loaded.manifest["shards"]) == len(catalog)
    assert loaded.lookup(3) == {"sku": "SKU003", "title": "品牌3 精华液", "tags": ["护肤"],
                                "image": "images/003.jpg"}
    with pytest.raises(KeyError, match="class 9"):
        loaded.lookup(9)  # SKU009 is a new arrival: in the catalog, unknown to the classifier
    arrivals = [row for row in loaded.skus if row["class_index"] == -1]
    assert sorted(r["sku"] for r in arrivals) == ["SKU008", "SKU009", "SKU010", "SKU011"]

    assert loaded.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings, axis=1), 1.0, rtol=1e-5)
    queries = fake_embed([read_image(catalog[10]), read_image(catalog[2])]) * 5.0  # scale must not matter
    scores, rows = loaded.nearest(queries, k=3)
    assert [loaded.skus[r[0]]["sku"] for r in rows] == ["SKU010", "SKU002"]
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    assert scores.shape == rows.shape == (2, 3) and (np.diff(scores, axis=1) <= 1e-6).all()


def test_shards_split_by_stable_hash(tmp_path):
    catalog = make_catalog(40)
    version = build_version(str(tmp_path), catalog, shards=4)
    seen = []
    for k in range(4):
        lines = (tmp_path / "index" / version / "shards" / str(k) / "skus.jsonl").read_text().splitlines()
        skus = [json.loads(line)["sku"] for line in lines]
        assert skus == sorted(skus) and all(index.shard_of(s, 4) == k for s in skus)
        seen += skus
    assert sorted(seen) == [r["sku"] for r in catalog]
    # fixed forever (sha256-based, unlike Python's per-process salted hash()): a shard's pods and a later
    # re-run must agree on where each SKU lives
    assert [index.shard_of(f"SKU{i:03d}", 4) for i in range(8)] == [1, 2, 1, 0, 0, 0, 3, 2]


def test_version_is_deterministic_and_rerun_is_idempotent(tmp_path):
    root, catalog = str(tmp_path), make_catalog()
    version = build_version(root, catalog)
    assert version == index.version_id("model-1", list(reversed(catalog)), 3)  # catalog order does not matter
    assert version != index.version_id("model-2", catalog, 3)
    assert version != index.version_id("model-1", make_catalog(tag="新款"), 3)
    assert version.startswith("model-1-")
    first = index.publish(root, version, 3)
    manifest = (tmp_path / "index" / version / "manifest.json").read_text()

    calls = []
    again = index.build_all(catalog, 3, lambda imgs: calls.append(imgs) or fake_embed(imgs), read_image,
                            class_index_for(catalog, 8), index.version_uri(root, version))
    assert calls == [] and all(s["skipped"] for s in again)
    second = index.publish(root, version, 3)
    assert first["switched"] and not second["switched"] and second["previous"] == version
    assert (tmp_path / "index" / version / "manifest.json").read_text() == manifest


@pytest.mark.parametrize("kill_at", ["shard", "switch"])
def test_killed_publish_leaves_current_and_rerun_succeeds(tmp_path, kill_at):
    root = str(tmp_path)
    v1 = build_version(root, make_catalog(), model="model-1")
    index.publish(root, v1, 3)
    catalog2 = make_catalog(tag="新款")
    # A separate process builds the next version and is SIGKILLed: in the middle of its third shard,
    # or after every shard and the manifest are written, just before the pointer switch.
    script = f"""
import os, signal
from sicot import index, storage
from tests.test_index import make_catalog, fake_embed, read_image, class_index_for
catalog = make_catalog(tag="新款")
version = index.version_id("model-2", catalog, 3)
shard1_done = index.shard_uri(index.version_uri({root!r}, version), 1) + "/shard.json"
def embed(images):
    if {kill_at == "shard"!r} and storage.exists(shard1_done):
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_embed(images)
real_swap = storage.swap
def swap(uri, *args, **kwargs):
    if uri.endswith("CURRENT"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_swap(uri, *args, **kwargs)
if {kill_at == "switch"!r}:
    storage.swap = swap
index.build_all(catalog, 3, embed, read_image, class_index_for(catalog, 8), index.version_uri({root!r}, version), 4)
index.publish({root!r}, version, 3)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    v2 = index.version_id("model-2", catalog2, 3)
    vdir = tmp_path / "index" / v2
    assert (vdir / "shards" / "1" / "shard.json").exists()
    assert (vdir / "manifest.json").exists() == (kill_at == "switch")
    assert index.read_current(root)[0]["version"] == v1
    assert index.load_current(root).version == v1

    calls = []
    built = index.build_all(catalog2, 3, lambda imgs: calls.append(imgs) or fake_embed(imgs), read_image,
                            class_index_for(catalog2, 8), index.version_uri(root, v2), 4)
    assert [s["skipped"] for s in built] == [True, True, kill_at == "switch"]
    assert index.publish(root, v2, 3)["switched"]
    assert index.load_current(root).version == v2


def test_concurrent_publishers_one_switch_wins(root):
    versions = [build_version(root, make_catalog(), model=f"model-{i}") for i in range(2)]
    index.publish(root, versions[0], 3)
    _, token = index.read_current(root)
    rivals = [build_version(root, make_catalog(), model=f"rival-{i}") for i in range(4)]
    outcomes, barrier = {}, threading.Barrier(len(rivals))

    def publish(version):
        barrier.wait()
        try:
            outcomes[version] = index.publish(root, version, 3, keep_versions=10, expected=token)["switched"]
        except index.PublishConflict as exc:
            outcomes[version] = exc

    threads = [threading.Thread(target=publish, args=(v,)) for v in rivals]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [v for v, outcome in outcomes.items() if outcome is True]
    assert len(winners) == 1
    losers = [str(o) for v, o in outcomes.items() if v not in winners]
    assert all("not overwritten" in o or "not published" in o for o in losers)
    assert index.load_current(root).version == winners[0]
    # a publisher holding a stale token is refused too, and the losers' builds are left intact
    with pytest.raises(index.PublishConflict):
        index.publish(root, versions[1], 3, expected=token)
    assert set(rivals) <= set(index.stored_versions(root))


def test_pruning_happens_only_after_the_switch(tmp_path, monkeypatch):
    root = str(tmp_path)
    versions = [build_version(root, make_catalog(), model=f"model-{i}") for i in range(4)]
    current_at_delete = []
    real_delete = storage.delete_tree
    monkeypatch.setattr(storage, "delete_tree",
                        lambda uri: current_at_delete.append((uri, index.read_current(root)[0]["version"]))
                        or real_delete(uri))
    for v in versions[:3]:
        index.publish(root, v, 3, keep_versions=2)
    assert current_at_delete == [(index.version_uri(root, versions[0]), versions[2])]
    assert index.read_current(root)[0]["history"] == [versions[2], versions[1]]
    assert versions[0] not in index.stored_versions(root)

    # a rival moves CURRENT while this publish checks its shards: the switch fails and nothing is deleted
    real_manifest = index._ensure_manifest

    def rival_switches_meanwhile(*args):
        storage.write_text(storage.join(root, "index", "CURRENT"),
                           json.dumps({"version": versions[1], "history": [versions[1], versions[2]]}))
        return real_manifest(*args)

    monkeypatch.setattr(index, "_ensure_manifest", rival_switches_meanwhile)
    with pytest.raises(index.PublishConflict, match=f"moved it from {versions[2]} to {versions[1]}"):
        index.publish(root, versions[3], 3, keep_versions=1)
    assert set(versions[1:]) <= set(index.stored_versions(root)) and len(current_at_delete) == 1
    monkeypatch.setattr(index, "_ensure_manifest", real_manifest)
    assert index.publish(root, versions[3], 3, keep_versions=1)["pruned"] == [versions[1], versions[2]]
    assert index.stored_versions(root) == [versions[3]]


def test_checksum_mismatch_names_the_shard(tmp_path):
    root = str(tmp_path)
    version = build_version(root, make_catalog())
    index.publish(root, version, 3)
    npy = tmp_path / "index" / version / "shards" / "1" / "embeddings.npy"
    npy.write_bytes(npy.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    with pytest.raises(index.IndexStoreError, match=r"shards/1/embeddings.npy: checksum mismatch \(shard 1"):
        index.load_current(root)


def test_publish_refuses_incomplete_or_corrupt_shards(tmp_path):
    root, catalog = str(tmp_path), make_catalog()
    version = index.version_id("model-1", catalog, 3)
    vdir = index.version_uri(root, version)
    index.build_shard(catalog, 0, 3, fake_embed, read_image, {}, vdir)
    with pytest.raises(index.IndexStoreError, match=r"shards \[1, 2\] of 3 are not built"):
        index.publish(root, version, 3)
    for k in (1, 2):
        index.build_shard(catalog, k, 3, fake_embed, read_image, {}, vdir)
    (tmp_path / "index" / version / "shards" / "2" / "skus.jsonl").write_text("tampered\n")
    with pytest.raises(index.IndexStoreError, match=r"shards/2/skus.jsonl: checksum mismatch in shard 2"):
        index.publish(root, version, 3)
    assert index.read_current(root) == (None, None)
    with pytest.raises(index.IndexStoreError, match="no index is published"):
        index.load_current(root)


def test_bad_catalog_and_embeddings_are_named(tmp_path):
    vdir = str(tmp_path / "v")
    catalog = make_catalog(3) + [dict(make_catalog(2)[1])]
    with pytest.raises(index.IndexStoreError, match="catalog record 4: sku SKU001 repeats record 2"):
        index.build_shard(catalog, 0, 1, fake_embed, read_image, {}, vdir)
    with pytest.raises(index.IndexStoreError, match="catalog record 2 .sku SKU001.: 'tags' must be a list"):
        index.build_shard([make_catalog(1)[0], {**make_catalog(2)[1], "tags": "护肤"}], 0, 1, fake_embed,
                          read_image, {}, vdir)
    with pytest.raises(index.IndexStoreError, match=r"embed returned shape \(1, 8\) for a batch of 3 images"):
        index.build_shard(make_catalog(3), 0, 1, lambda imgs: fake_embed(imgs[:1]), read_image, {}, vdir)
    assert not Path(vdir, "shards", "0", "shard.json").exists()


def test_reader_follows_current_when_its_version_is_pruned_mid_read(tmp_path, monkeypatch):
    root = str(tmp_path)
    v0, v1 = [build_version(root, make_catalog(), model=f"model-{i}") for i in range(2)]
    index.publish(root, v0, 3)
    stale = index.read_current(root)
    index.publish(root, v1, 3, keep_versions=1)  # a reader that saw v0 now finds it deleted
    real_read = index.read_current
    reads = iter([stale])
    monkeypatch.setattr(index, "read_current", lambda r: next(reads, None) or real_read(r))
    assert index.load_current(root).version == v1
    with pytest.raises(index.IndexStoreError, match=f"{v0}/manifest.json: missing"):
        index.load_version(root, v0)


@pytest.mark.parametrize("bad_entry", ["", "..", ".", "../../etc", "a/b", 7])
def test_a_damaged_history_deletes_nothing(tmp_path, bad_entry):
    root = str(tmp_path)
    v1, v2 = (build_version(root, make_catalog(), model=f"model-{i}") for i in range(2))
    index.publish(root, v1, 3)
    pointer = storage.join(root, "index", "CURRENT")
    storage.write_text(pointer, json.dumps({"version": v1, "history": [v1, bad_entry]}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(index.IndexStoreError, match=r"CURRENT: 'history'\[1\]: .* is not an index version name"):
        index.publish(root, v2, 3, keep_versions=1)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert index.load_current(root).version == v1


def test_an_empty_index_is_never_published(tmp_path):
    root = str(tmp_path)
    version = build_version(root, make_catalog())
    index.publish(root, version, 3)
    empty = index.version_id("model-2", [], 1)
    index.build_all([], 1, fake_embed, read_image, {}, index.version_uri(root, empty))
    with pytest.raises(index.IndexStoreError, match="holds no SKU"):
        index.publish(root, empty, 1)
    with pytest.raises(index.IndexStoreError, match="num_shards must be >= 1"):
        index.publish(root, version, 0)
    assert index.load_current(root).version == version


def test_unreferenced_versions_are_collected_once_idle(tmp_path):
    root = str(tmp_path)
    published, loser, building = (build_version(root, make_catalog(), model=m) for m in ("a", "b", "c"))
    index.publish(root, published, 3)
    with pytest.raises(index.PublishConflict):
        index.publish(root, loser, 3, expected="stale-token")  # the losing publisher's version stays behind
    assert loser in index.stored_versions(root)

    fresh = build_version(root, make_catalog(), model="d")
    result = index.publish(root, fresh, 3)  # default grace: a build that may still be running is kept
    assert result["collected"] == [] and {loser, building} <= set(index.stored_versions(root))
    newest = build_version(root, make_catalog(), model="e")
    result = index.publish(root, newest, 3, keep_versions=2, gc_grace_s=0)
    assert sorted(result["collected"]) == sorted([loser, building]) and result["pruned"] == [published]
    assert sorted(index.stored_versions(root)) == sorted([fresh, newest])
