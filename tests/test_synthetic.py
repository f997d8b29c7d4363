"""The demo product world: deterministic, long-tailed, balanced evaluation, a real title-noise knob."""
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sicot.config import Data
from sicot.data.longtail import class_counts, imbalance
from sicot.data.manifest import load_manifest
from sicot.data.synthetic import generate
from sicot.data.worldgen import train_counts


def tiny(**overrides) -> Data:
    cfg = Data(skus=12, brands=3, categories=2, max_images=12, imbalance=6, val_per_class=1, test_per_class=2,
               image_size=16, holdout_skus=2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    generate(tmp_path / "a", tiny())
    generate(tmp_path / "b", tiny())
    generate(tmp_path / "c", tiny(seed=1))
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) > 100 and a.keys() == b.keys() and a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    shared_images = [k for k in a.keys() & c.keys() if k.endswith(".png")]
    assert shared_images and sum(a[k] != c[k] for k in shared_images) > 0.9 * len(shared_images)


def test_the_bytes_do_not_depend_on_how_many_processes_render_them(tmp_path, monkeypatch):
    from sicot.data import worldgen

    monkeypatch.setattr(worldgen, "_BLOCK", 3)  # 5 blocks of SKUs
    monkeypatch.setattr(worldgen.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    generate(tmp_path / "three", tiny(skus=14, holdout_skus=1))
    monkeypatch.setattr(worldgen.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    generate(tmp_path / "one", tiny(skus=14, holdout_skus=1))
    assert files(tmp_path / "three") == files(tmp_path / "one")


def test_two_worlds_generated_at_once_in_one_process_are_each_their_own(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from sicot.data import worldgen

    monkeypatch.setattr(worldgen, "_BLOCK", 3)
    monkeypatch.setattr(worldgen.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with ThreadPoolExecutor(2) as pool:  # as a flow runs two tasks
        list(pool.map(lambda seed: generate(tmp_path / f"together{seed}", tiny(seed=seed)), (0, 1)))
    generate(tmp_path / "alone0", tiny(seed=0))
    generate(tmp_path / "alone1", tiny(seed=1))
    assert files(tmp_path / "together0") == files(tmp_path / "alone0")
    assert files(tmp_path / "together1") == files(tmp_path / "alone1")


def test_a_failing_render_leaves_no_world_behind(tmp_path, monkeypatch):
    from sicot.data import worldgen

    monkeypatch.setattr(worldgen, "_BLOCK", 3)
    monkeypatch.setattr(worldgen, "save_png", lambda img, path: (_ for _ in ()).throw(OSError(f"{path}: disk full")))
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "w", tiny())
    assert list(tmp_path.iterdir()) == []


def test_regenerating_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "raw"
    generate(out, tiny(skus=16))
    stale = out / "stale.txt"
    stale.write_text("from an earlier world")
    generate(out, tiny())
    assert not stale.exists() and not (out / "images" / "SKU00015").exists()


def test_world_is_a_valid_contract_dataset(tmp_path):
    stats = generate(tmp_path / "w", tiny())
    m = load_manifest(str(tmp_path / "w"))
    assert len(m.classes()) == 12 and len(m.catalog) == 14 and len(m.holdout) == 4
    assert stats["images"] == {"train": len(m.train), "val": 12, "test": 24, "holdout": 4, "catalog": 14}
    img = Image.open(tmp_path / "w" / m.train[0].image)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (16, 16)
    catalog = {r.sku: r for r in m.catalog}
    assert all(r.image.startswith("images/catalog/") and r.title and r.tags for r in m.catalog)
    holdout_skus = {r.sku for r in m.holdout}
    assert holdout_skus <= set(catalog) and not holdout_skus & set(m.classes())


def test_val_and_test_are_class_balanced(tmp_path):
    generate(tmp_path / "w", tiny(val_per_class=2, test_per_class=3))
    m = load_manifest(str(tmp_path / "w"), verify_images=False)
    assert set(Counter(r.sku for r in m.val).values()) == {2}
    assert set(Counter(r.sku for r in m.test).values()) == {3}
    assert {r.sku for r in m.test} == set(m.classes())


@pytest.mark.parametrize("profile", ["exponential", "zipf"])
@pytest.mark.parametrize("classes, max_images, requested",
                         [(120, 100, 100), (50, 200, 50), (300, 500, 100), (7, 30, 10)])
def test_long_tail_profile_hits_the_requested_imbalance(profile, classes, max_images, requested):
    counts = train_counts(classes, max_images, requested, profile)
    assert len(counts) == classes and counts == sorted(counts, reverse=True) and counts[0] == max_images
    assert abs(counts[0] / counts[-1] - requested) <= 0.1 * requested


def test_profiles_differ_in_shape():
    exp, zipf = train_counts(100, 100, 100, "exponential"), train_counts(100, 100, 100, "zipf")
    assert sum(zipf) < sum(exp)  # zipf drops fast, then a long flat tail
    assert zipf[1] < exp[1] and zipf[80] < exp[80] * 3


@pytest.mark.parametrize("profile", ["exponential", "zipf"])
def test_generated_world_measures_the_requested_imbalance(tmp_path, profile):
    generate(tmp_path / "w", tiny(skus=30, brands=4, categories=3, max_images=40, imbalance=20, profile=profile,
                                  holdout_skus=0, val_per_class=0, test_per_class=1))
    counts = class_counts(load_manifest(str(tmp_path / "w"), verify_images=False).train)
    assert len(counts) == 30 and abs(imbalance(counts) - 20) <= 2


def test_head_classes_are_spread_over_brands_and_tail_shares_their_looks(tmp_path):
    generate(tmp_path / "w", tiny(skus=48, brands=6, categories=4, max_images=40, imbalance=20, holdout_skus=0,
                                  val_per_class=0, test_per_class=1))
    m = load_manifest(str(tmp_path / "w"), verify_images=False)
    counts = class_counts(m.train)
    brand = {r.sku: r.tags[2] for r in m.catalog}  # catalog tags: category tags, brand, variant
    category = {r.sku: r.tags[1] for r in m.catalog}
    ranked = list(counts)
    head, tail = ranked[:12], ranked[24:]
    assert len({brand[s] for s in head}) >= 3
    head_brands, head_categories = {brand[s] for s in head}, {category[s] for s in head}
    shared = [s for s in tail if brand[s] in head_brands or category[s] in head_categories]
    assert len(shared) >= 0.9 * len(tail)


def _tokens(title: str) -> list[str]:
    """Latin words and numbers, plus Chinese character bigrams: enough for a word-count classifier."""
    out = re.findall(r"[A-Za-z0-9.\-]+", title)
    for run in re.findall(r"[\u4e00-\u9fff]+", title):
        out += [run[i:i + 2] for i in range(len(run) - 1)] or [run]
    return out


def title_only_accuracy(root: Path, tokens=_tokens) -> float:
    """Cosine to each SKU's word-count centroid of its training titles."""
    m = load_manifest(str(root), verify_images=False)
    centroids = defaultdict(Counter)
    for r in m.train:
        centroids[r.sku].update(tokens(r.title))
    norms = {sku: math.sqrt(sum(v * v for v in c.values())) or 1.0 for sku, c in centroids.items()}
    hits = 0
    for r in m.test:
        q = Counter(tokens(r.title))
        best = max(sorted(centroids), key=lambda s: sum(n * centroids[s][w] for w, n in q.items()) / norms[s])
        hits += best == r.sku
    return hits / len(m.test)


def test_title_noise_is_a_real_knob(tmp_path):
    accuracy = {}
    for noise in (0.2, 0.9):
        generate(tmp_path / str(noise), tiny(skus=24, brands=4, categories=3, max_images=30, imbalance=5,
                                             test_per_class=8, holdout_skus=0, title_noise=noise))
        accuracy[noise] = title_only_accuracy(tmp_path / str(noise))
    assert accuracy[0.2] > 0.6 and accuracy[0.2] > accuracy[0.9] + 0.35, accuracy


def test_titles_mix_chinese_and_latin_with_an_empty_share(tmp_path):
    generate(tmp_path / "w", tiny(skus=20, brands=4, categories=3, max_images=40, imbalance=4, holdout_skus=0,
                                  empty_title_rate=0.3, title_noise=0.5))
    titles = [json.loads(line)["title"] for line in (tmp_path / "w" / "train.jsonl").read_text().splitlines()]
    empty = sum(not t for t in titles) / len(titles)
    assert 0.2 < empty < 0.4
    filled = [t for t in titles if t]
    assert all(re.search(r"[\u4e00-\u9fff]", t) or re.search(r"[A-Za-z]", t) for t in filled)
    assert sum(bool(re.search(r"[A-Za-z]{3,}", t)) for t in filled) > 0.5 * len(filled)
    promo = ("包邮", "新款", "正品", "折扣", "热卖", "free shipping", "特价", "促销")
    assert sum(any(p in t for p in promo) for t in filled) > 0.2 * len(filled)


def test_skus_of_a_product_line_look_alike(tmp_path):
    """Variants of one line differ less in their catalog pictures than SKUs of different lines."""
    generate(tmp_path / "w", tiny(skus=36, brands=4, categories=3, max_images=4, imbalance=4, holdout_skus=0,
                                  val_per_class=0, test_per_class=1, image_size=32))
    m = load_manifest(str(tmp_path / "w"), verify_images=False)
    pixels = {r.sku: np.asarray(Image.open(tmp_path / "w" / r.image), dtype=np.float32) for r in m.catalog}
    line = {r.sku: (r.tags[2], r.tags[1]) for r in m.catalog}
    same, other = [], []
    skus = sorted(pixels)
    for i, a in enumerate(skus):
        for b in skus[i + 1:]:
            (same if line[a] == line[b] else other).append(np.abs(pixels[a] - pixels[b]).mean())
    assert same and np.mean(same) < 0.7 * np.mean(other)


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data.skus"):
        generate(tmp_path / "w", tiny(skus=0))
    with pytest.raises(ValueError, match="variants per product line"):
        generate(tmp_path / "w", tiny(skus=5000, brands=1, categories=1))
    assert not (tmp_path / "w").exists()
