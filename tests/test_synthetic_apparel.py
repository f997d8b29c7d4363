"""The apparel world: the demo world's contract and knobs, other looks, unspaced titles that jieba must segment."""
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sicot.config import WORLDS, ConfigError, Data, load_params
from sicot.data import apparel, synthetic
from sicot.data.longtail import class_counts, imbalance
from sicot.data.manifest import load_manifest
from sicot.data.worlds import GENERATORS, generate
from sicot.text.tokenize import tokenize
from tests.test_synthetic import title_only_accuracy


def tiny(**overrides) -> Data:
    cfg = Data(world="apparel", skus=12, brands=3, categories=3, max_images=12, imbalance=6, val_per_class=1,
               test_per_class=2, image_size=32, holdout_skus=2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def titles(root: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    generate(tmp_path / "a", tiny())
    generate(tmp_path / "b", tiny())
    generate(tmp_path / "c", tiny(seed=1))
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) > 80 and a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    shared_images = [k for k in a.keys() & c.keys() if k.endswith(".png")]
    assert shared_images and sum(a[k] != c[k] for k in shared_images) > 0.9 * len(shared_images)


def test_world_is_a_valid_contract_dataset(tmp_path):
    stats = generate(tmp_path / "w", tiny())
    m = load_manifest(str(tmp_path / "w"))
    assert len(m.classes()) == 12 and len(m.catalog) == 14 and len(m.holdout) == 4
    assert stats["images"] == {"train": len(m.train), "val": 12, "test": 24, "holdout": 4, "catalog": 14}
    img = Image.open(tmp_path / "w" / m.train[0].image)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    assert all(r.image.startswith("images/catalog/") and r.title and len(r.tags) == 5 for r in m.catalog)
    holdout_skus = {r.sku for r in m.holdout}
    assert holdout_skus <= {r.sku for r in m.catalog} and not holdout_skus & set(m.classes())
    assert set(Counter(r.sku for r in m.test).values()) == {2}


@pytest.mark.parametrize("profile", ["exponential", "zipf"])
def test_generated_world_is_long_tailed_and_tail_shares_head_lines(tmp_path, profile):
    generate(tmp_path / "w", tiny(skus=48, brands=6, categories=4, max_images=40, imbalance=20, profile=profile,
                                  holdout_skus=0, val_per_class=0, test_per_class=1))
    m = load_manifest(str(tmp_path / "w"), verify_images=False)
    counts = class_counts(m.train)
    assert len(counts) == 48 and abs(imbalance(counts) - 20) <= 2
    brand = {r.sku: r.tags[2] for r in m.catalog}  # catalog tags: department, garment, brand, colour, pattern
    garment = {r.sku: r.tags[1] for r in m.catalog}
    ranked = list(counts)
    head, tail = ranked[:12], ranked[24:]
    head_brands, head_garments = {brand[s] for s in head}, {garment[s] for s in head}
    assert len(head_brands) >= 3
    assert sum(brand[s] in head_brands or garment[s] in head_garments for s in tail) >= 0.9 * len(tail)


def test_lines_share_a_silhouette_and_colour_words_share_a_look(tmp_path):
    """In the catalog pictures, variants of one line (brand x garment) have nearly the same outline, and
    SKUs whose titles name the same colour have nearly the same mean colour: what tail SKUs share with
    head SKUs."""
    generate(tmp_path / "w", tiny(skus=36, brands=4, categories=4, max_images=4, imbalance=4, holdout_skus=0,
                                  val_per_class=0, test_per_class=1))
    m = load_manifest(str(tmp_path / "w"), verify_images=False)
    pixels = {r.sku: np.asarray(Image.open(tmp_path / "w" / r.image), dtype=np.float32) for r in m.catalog}
    outline = {sku: (p.min(axis=2) < 245).astype(np.float32) for sku, p in pixels.items()}  # not white
    colour = {sku: (pixels[sku] * outline[sku][..., None]).sum((0, 1)) / outline[sku].sum() for sku in pixels}
    line = {r.sku: (r.tags[2], r.tags[1]) for r in m.catalog}
    colour_word = {r.sku: r.tags[3] for r in m.catalog}
    shape_gap, colour_gap = defaultdict(list), defaultdict(list)
    skus = sorted(pixels)
    for i, a in enumerate(skus):
        for b in skus[i + 1:]:
            shape_gap[line[a] == line[b]].append(np.abs(outline[a] - outline[b]).mean())
            colour_gap[colour_word[a] == colour_word[b]].append(np.abs(colour[a] - colour[b]).mean())
    assert shape_gap[True] and np.mean(shape_gap[True]) < 0.5 * np.mean(shape_gap[False])
    assert colour_gap[True] and np.mean(colour_gap[True]) < 0.6 * np.mean(colour_gap[False])


def test_titles_are_unspaced_chinese_and_jieba_recovers_the_product_words(tmp_path):
    generate(tmp_path / "w", tiny(skus=24, brands=4, categories=16, max_images=20, imbalance=4, holdout_skus=0,
                                  title_noise=0.0, empty_title_rate=0.0))
    catalog = {r["sku"]: r for r in titles(tmp_path / "w", "catalog")}
    records = titles(tmp_path / "w")
    assert not any(re.search(r"[\u4e00-\u9fff]\s+[\u4e00-\u9fff]", r["title"]) for r in records)
    glued = [re.search(r"[A-Za-z0-9][\u4e00-\u9fff]|[\u4e00-\u9fff][A-Za-z0-9]", r["title"]) for r in records]
    assert sum(map(bool, glued)) > 0.5 * len(records)  # Latin and digits mostly typed against the Chinese

    def found(word: str, tokens: list[str]) -> bool:
        parts = tokenize(word)
        return any(tokens[i:i + len(parts)] == parts for i in range(len(tokens)))

    recovered = defaultdict(list)
    for r in records:
        tokens = tokenize(r["title"])
        _, garment, latin, colour, pattern = catalog[r["sku"]]["tags"]
        garment_word = next(g.word for g in apparel.BASE_GARMENTS if g.tags[1] == garment)
        for role, word in (("garment", garment_word), ("colour", colour), ("pattern", pattern)):
            recovered[role].append(found(word, tokens))
        recovered["brand"].append(latin.lower() in tokens)
    rates = {role: sum(hits) / len(hits) for role, hits in recovered.items()}
    assert min(rates.values()) > 0.6, rates  # the brand also comes in Chinese only, so it is not always Latin
    assert rates["garment"] > 0.9 and rates["colour"] > 0.8, rates
    assert any(re.search(r"\d+(码|cm|英寸|双装)|\b(S|M|L|XL|XXL|3XL)\b", r["title"]) for r in records)


def _noise_share(root: Path) -> float:
    noise_tokens = {t for w in json.loads((root / "world.json").read_text())["noise_words"] for t in tokenize(w)}
    tokens = [t for r in titles(root) for t in tokenize(r["title"])]
    return sum(t in noise_tokens for t in tokens) / len(tokens)


def test_title_noise_keeps_its_meaning(tmp_path):
    share, accuracy = {}, {}
    for noise in (0.3, 0.9):
        root = tmp_path / str(noise)
        generate(root, tiny(skus=24, brands=4, categories=3, max_images=30, imbalance=5, test_per_class=8,
                            holdout_skus=0, title_noise=noise, empty_title_rate=0.0))
        share[noise], accuracy[noise] = _noise_share(root), title_only_accuracy(root, tokenize)
    assert 0.2 < share[0.3] < 0.45 and share[0.9] > 0.75, share
    assert accuracy[0.3] > 0.5 and accuracy[0.3] > accuracy[0.9] + 0.3, accuracy


@pytest.mark.parametrize("world, module", [("packaged", synthetic), ("apparel", apparel)])
def test_world_json_lists_the_noise_words(tmp_path, world, module):
    generate(tmp_path / "w", tiny(world=world, image_size=16))
    described = json.loads((tmp_path / "w" / "world.json").read_text(encoding="utf-8"))
    assert described["noise_words"] == sorted(set(module.PROMO_WORDS + module.IRRELEVANT_WORDS))
    assert described["params"]["world"] == world


def test_worlds_differ_in_vocabulary():
    words = {name: {g.word for g in m.BASE_GARMENTS} if m is apparel else {c.word for c in m.BASE_CATEGORIES}
             for name, m in (("apparel", apparel), ("packaged", synthetic))}
    assert not words["apparel"] & words["packaged"]
    assert not set(apparel.PROMO_WORDS + apparel.IRRELEVANT_WORDS) & {w for g in apparel.BASE_GARMENTS
                                                                   for w in (g.word, *g.descriptors)}


def test_every_configured_world_has_a_generator_and_bad_names_are_refused(tmp_path):
    assert tuple(GENERATORS) == WORLDS
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  world: shoes\n")
    with pytest.raises(ConfigError, match=r"data\.world: 'shoes' is not one of packaged, apparel"):
        load_params(params)
    with pytest.raises(ValueError, match=r"data\.world: 'shoes'"):
        generate(tmp_path / "w", tiny(world="shoes"))
    assert not (tmp_path / "w").exists()


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data.skus"):
        generate(tmp_path / "w", tiny(skus=0))
    with pytest.raises(ValueError, match="variants per product line"):
        generate(tmp_path / "w", tiny(skus=2000, brands=1, categories=1))
    assert not (tmp_path / "w").exists()
