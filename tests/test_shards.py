"""The prepared dataset's WebDataset shards and the stream that trains and evaluates from them."""
import io
import json
import os
import tarfile
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from sicot import storage
from sicot.data.dataset import ProductImages, collate
from sicot.data.manifest import load_manifest
from sicot.data.prepared import load_prepared, write_prepared
from sicot.data.shards import ShardError, split_images
from sicot.data.stream import ShardStream, rank_pieces
from tests.test_manifest import LONG_TITLE, SKUS, make_dataset

PER_CLASS = (13, 9, 7)  # 29 training images


@pytest.fixture
def source(tmp_path):
    return make_dataset(tmp_path / "ds", per_class=PER_CLASS)


@pytest.fixture
def prepared(source, tmp_path):
    out = tmp_path / "prepared"
    write_prepared(load_manifest(str(source)), out, shard_images=4)
    return load_prepared(str(out))


def stream(manifest, split="train", **kw) -> ShardStream:
    index = {sku: i for i, sku in enumerate(manifest.classes())}
    images = ProductImages(index, 8, augment=kw.pop("augment", False))
    return ShardStream(images, manifest.root, manifest.shards[split], kw.pop("batch_size", 4), **kw)


# --- writing ------------------------------------------------------------------------------------------

def test_shards_hold_every_image_once_with_its_record(source, prepared):
    original = load_manifest(str(source))
    out = prepared.root
    assert sorted(os.listdir(out)) == ["catalog.jsonl", "images", "labels.json", "shards", "test.jsonl",
                                       "train.jsonl", "val.jsonl"]
    assert json.loads(storage.read_text(storage.join(out, "labels.json"))) == {"classes": SKUS}
    assert [s.images for s in prepared.shards["train"]] == [4] * 7 + [1]
    # the training split is shuffled once, so any shard mixes the classes; val and test keep their order
    assert prepared.train != original.train and sorted(prepared.train, key=str) == sorted(original.train, key=str)
    assert (prepared.val, prepared.test, prepared.catalog) == (original.val, original.test, original.catalog)
    assert LONG_TITLE in storage.read_text(storage.join(out, "train.jsonl"))  # no \u escapes
    images = list(split_images(out, prepared.shards["train"]))
    assert [i for i, _, _ in images] == list(range(29)) and [r for _, r, _ in images] == prepared.train
    assert all(data == (source / r.image).read_bytes() for _, r, data in images)
    with tarfile.open(os.path.join(out, prepared.shards["train"][1].name)) as tar:  # the WebDataset layout
        names = tar.getnames()
        assert names[:2] == ["000000004.png", "000000004.json"] or names[:2] == ["000000004.jpg", "000000004.json"]
        assert json.loads(tar.extractfile(names[1]).read())["sku"] == prepared.train[4].sku
    # catalog images stay files, hard-linked; the splits' images are only in the shards
    cat = prepared.catalog[0].image
    assert os.stat(source / cat).st_ino == os.stat(os.path.join(out, cat)).st_ino
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["cat"]


def test_the_same_dataset_gives_the_same_shard_bytes(source, tmp_path):
    manifest = load_manifest(str(source))
    for name in ("a", "b"):
        write_prepared(manifest, tmp_path / name, shard_images=5)
    for shard in load_prepared(str(tmp_path / "a")).shards["train"]:
        assert (tmp_path / "a" / shard.name).read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_a_shard_closes_at_its_size_limit(source, tmp_path):
    write_prepared(load_manifest(str(source)), tmp_path / "p", shard_images=1000, shard_mb=1500 / 2 ** 20)
    shards = load_prepared(str(tmp_path / "p")).shards["train"]
    largest = max(len(d) for _, _, d in split_images(str(tmp_path / "p"), shards))
    assert len(shards) > 1 and all(s.images >= 1 for s in shards)
    assert sum(s.images for s in shards) == 29 and largest < 1500


# --- the epoch's plan -------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[4, 4, 4, 4, 4, 4, 4, 1], [5], [3, 1, 7, 2]])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_ranks_get_equal_runs_covering_every_image(sizes, ranks):
    order = list(reversed(range(len(sizes))))
    runs = [rank_pieces(sizes, order, r, ranks) for r in range(ranks)]
    lengths = {sum(hi - lo for _, lo, hi in run) for run in runs}
    total = sum(sizes)
    assert lengths == {-(-total // ranks)}
    seen = Counter((s, i) for run in runs for s, lo, hi in run for i in range(lo, hi))
    assert set(seen) == {(s, i) for s, n in enumerate(sizes) for i in range(n)}  # every image
    assert sum(seen.values()) - total < ranks  # only the padding repeats


def test_workers_split_a_rank_into_whole_batches(prepared):
    s = stream(prepared, shuffle=True, drop_last=True, rank=1, ranks=2)  # 15 images, 3 batches of 4 kept
    assert len(s) == 12
    def images(pieces):
        return [(shard, i) for shard, lo, hi in pieces for i in range(lo, hi)]

    for workers in (1, 2, 3, 5):
        parts = [images(s.plan(0, w, workers)) for w in range(workers)]
        assert all(len(part) % 4 == 0 for part in parts)
        assert [x for part in parts for x in part] == images(s.plan(0))  # the rank's run, cut in whole batches


# --- streaming ----------------------------------------------------------------------------------------

def epochs(s: ShardStream, workers: int, count: int = 2) -> list[dict]:
    loader = DataLoader(s, batch_size=4, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0)
    batches = []
    for epoch in range(count):
        s.set_epoch(epoch)
        batches.append(list(loader))
    return batches


def test_an_epoch_is_reproducible_and_every_image_is_seen(prepared):
    first = epochs(stream(prepared, shuffle=True, drop_last=True, augment=True, seed=3), workers=0)
    again = epochs(stream(prepared, shuffle=True, drop_last=True, augment=True, seed=3), workers=0)
    assert all(torch.equal(a[k], b[k]) for ea, eb in zip(first, again) for a, b in zip(ea, eb) for k in a)
    assert [len(e) for e in first] == [7, 7]  # 29 images: 7 full batches, the ragged end dropped
    labels = [Counter(torch.cat([b["label"] for b in e]).tolist()) for e in first]
    assert labels[0] != labels[1] or not torch.equal(first[0][0]["image"], first[1][0]["image"])
    # a resumed run starting at epoch 1 repeats epoch 1 exactly
    resumed = stream(prepared, shuffle=True, drop_last=True, augment=True, seed=3)
    resumed.set_epoch(1)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first[1], DataLoader(
        resumed, batch_size=4, collate_fn=collate), strict=True))


def test_worker_processes_stream_the_same_images_and_repeat_their_order(prepared):
    alone = epochs(stream(prepared, shuffle=True, drop_last=True, seed=1), workers=0)
    two = epochs(stream(prepared, shuffle=True, drop_last=True, seed=1), workers=2)
    again = epochs(stream(prepared, shuffle=True, drop_last=True, seed=1), workers=2)
    assert all(torch.equal(a["image"], b["image"]) for ea, eb in zip(two, again) for a, b in zip(ea, eb, strict=True))
    for e0, e2 in zip(alone, two):  # the same number of batches; persistent workers see the new epoch
        assert len(e0) == len(e2) == 7
    assert not all(torch.equal(a["label"], b["label"]) for a, b in zip(two[0], two[1]))


def test_evaluation_streams_every_image_once_in_order(prepared):
    batches = list(DataLoader(stream(prepared, "test", batch_size=2), batch_size=2, collate_fn=collate))
    index = {sku: i for i, sku in enumerate(prepared.classes())}
    assert torch.cat([b["label"] for b in batches]).tolist() == [index[r.sku] for r in prepared.test]


def test_each_rank_reads_only_its_own_shards(prepared, monkeypatch):
    opened = []
    real = storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda uri: opened.append(os.path.basename(uri)) or real(uri))
    for rank in range(2):
        list(stream(prepared, shuffle=True, drop_last=True, rank=rank, ranks=2))
    assert len(opened) <= len(prepared.shards["train"]) + 1  # one shard may straddle the two ranks


def test_the_shuffle_buffer_bounds_what_a_worker_holds(prepared, monkeypatch):
    from sicot.data import stream as shards

    held = []
    real = shards._shuffled

    def watch(items, size, rng):
        pulled = 0

        def counting():
            nonlocal pulled
            for item in items:
                pulled += 1
                yield item

        for out, item in enumerate(real(counting(), size, rng)):
            held.append(pulled - out)
            yield item

    monkeypatch.setattr(shards, "_shuffled", watch)
    list(stream(prepared, shuffle=True, drop_last=True, buffer=5))
    assert max(held) == 5


# --- bad shards ---------------------------------------------------------------------------------------

def test_a_damaged_shard_is_named(prepared):
    shard = os.path.join(prepared.root, prepared.shards["train"][2].name)
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:700])
    with pytest.raises(ShardError, match=r"train-000002\.tar: .*re-run prepare_data"):
        list(split_images(prepared.root, prepared.shards["train"]))


def test_a_shard_holding_other_images_is_named(prepared):
    first, second = (os.path.join(prepared.root, s.name) for s in prepared.shards["train"][:2])
    os.replace(second, first)
    with pytest.raises(ShardError, match=r"train-000000\.tar: member '000000004\.\w+' where image 0's image belongs"):
        list(split_images(prepared.root, prepared.shards["train"]))


def test_a_shard_with_a_broken_record_is_named(prepared):
    shard = os.path.join(prepared.root, prepared.shards["train"][0].name)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b'{"image": "x.png"}' if member.name == "000000001.json" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar: member '000000001\.json' is not a record \(KeyError"):
        list(split_images(prepared.root, prepared.shards["train"]))


def test_an_index_that_disagrees_with_the_records_is_named(prepared):
    index = os.path.join(prepared.root, "shards", "index.json")
    raw = json.loads(open(index).read())
    raw["splits"]["train"][-1]["images"] = 2
    open(index, "w").write(json.dumps(raw))
    with pytest.raises(ShardError, match=r"index\.json: the train shards hold 30 images but train\.jsonl has 29"):
        load_prepared(prepared.root)
    open(index, "w").write("{not json")
    with pytest.raises(ShardError, match=r"index\.json: not a shard index"):
        load_prepared(prepared.root)
    os.remove(index)
    with pytest.raises(ShardError, match=r"index\.json: not found; .* run prepare_data"):
        load_prepared(prepared.root)
