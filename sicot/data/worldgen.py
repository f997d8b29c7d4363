"""What every generated product world shares: the long tail, the streaming writer, the camera, the title noise.

A world module (sicot.data.synthetic, sicot.data.apparel) builds its SKUs from one seeded Generator and
says how each SKU is photographed and titled (a `World`); `write_world` does the rest the same way for
every world: it splits SKUs into trained and catalog-only ones, gives the trained ones long-tailed image
counts, and renders and writes them a block of SKUs at a time on every CPU (so 100k+ SKUs fit in memory
and take minutes on a many-core machine) under `storage.atomic_dir`. Each SKU's photos and titles come
from a Generator seeded by (seed, 1, SKU index), so the same seed gives the same bytes in every file.
"""
from __future__ import annotations

import colorsys
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sicot import storage

log = logging.getLogger(__name__)


# --- the long tail --------------------------------------------------------------------------------

def train_counts(n_classes: int, max_images: int, imbalance: float, profile: str) -> list[int]:
    """Training images per class, largest first, following an exponential or Zipf long tail.

    Both ends are exact integers (max_images and the nearest achievable max_images / imbalance), so the
    measured max/min ratio matches the request up to that one rounding.
    """
    if n_classes <= 0:
        return []
    if max_images < 1 or imbalance < 1:
        raise ValueError(f"need max_images >= 1 and imbalance >= 1, got {max_images} and {imbalance}")
    target = max_images / imbalance
    candidates = {max(1, math.floor(target)), max(1, math.ceil(target))}
    n_min = min(candidates, key=lambda m: abs(max_images / m - imbalance))
    if max_images / n_min < 0.9 * imbalance:
        log.warning("data.max_images=%d cannot give an imbalance of %g (the smallest class keeps 1 image): "
                    "measured imbalance will be %g", max_images, imbalance, max_images / n_min)
    if n_classes == 1:
        return [max_images]
    ratio = max_images / n_min
    ranks = np.arange(n_classes, dtype=np.float64)
    if profile == "exponential":
        counts = max_images * ratio ** (-ranks / (n_classes - 1))
    elif profile == "zipf":
        counts = max_images / (ranks + 1) ** (math.log(ratio) / math.log(n_classes))
    else:
        raise ValueError(f"profile must be exponential or zipf, got {profile!r}")
    out = np.maximum(1, np.rint(counts)).astype(int).tolist()
    out[0], out[-1] = max_images, n_min
    return out


def assign_ids(skus: list, rng: np.random.Generator, total: int) -> list:
    """SKUs in a random order, named SKU00000...: ids carry no trace of brand or category."""
    order = rng.permutation(len(skus))
    width = max(5, len(str(total - 1)))
    return [skus[j].named(f"SKU{i:0{width}d}") for i, j in enumerate(order.tolist())]


# --- drawing --------------------------------------------------------------------------------------

MARKS = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon", "chevron", "bars",
         "crescent", "dots"]


def extend_kinds(bases: Sequence, modifiers: Sequence[str], n: int, vary: Callable[[Any, int], Any]) -> list:
    """n product kinds: the base kinds, then each base again per round under a modifier word ("男士",
    "旅行装", ...), reshaped by `vary(kind, round)` so the new kind looks and reads differently."""
    out = []
    for i in range(n):
        base = bases[i % len(bases)]
        round_ = i // len(bases)
        if round_ == 0:
            out.append(base)
            continue
        modifier = modifiers[(round_ - 1) % len(modifiers)]
        suffix = "" if round_ <= len(modifiers) else str(round_ // len(modifiers) + 1)
        out.append(vary(replace(base, word=f"{modifier}{suffix}{base.word}"), round_))
    return out


def product_lines(total: int, n_brands: int, n_kinds: int, rng: np.random.Generator, variants_per_line: int = 3):
    """(brand, kind, variants) of each product line, a brand x kind pair, so `total` SKUs come in lines of a
    few variants each; the lines are drawn before the caller draws its variants."""
    pairs = n_brands * n_kinds
    n_lines = min(pairs, max(1, math.ceil(total / variants_per_line)))
    lines = rng.choice(pairs, size=n_lines, replace=False)
    sizes = [total // n_lines + (i < total % n_lines) for i in range(n_lines)]
    for pair, n_variants in zip(lines.tolist(), sizes):
        yield *divmod(pair, n_kinds), n_variants


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def draw_mark(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """A brand mark (one of MARKS) of radius r centred on (cx, cy)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif kind == "star":
        draw.regular_polygon((cx, cy, r), 5, fill=fill)
        draw.regular_polygon((cx, cy, r * 0.9), 5, rotation=36, fill=fill)
    elif kind == "cross":
        w = r * 0.35
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(r * 0.4)))
    elif kind == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=fill)
    elif kind == "chevron":
        draw.line([(cx - r, cy - 0.5 * r), (cx, cy + 0.5 * r), (cx + r, cy - 0.5 * r)], fill=fill,
                  width=max(1, int(r * 0.45)))
    elif kind == "bars":
        for k in (-1, 0, 1):
            draw.rectangle((cx + k * 0.7 * r - 0.22 * r, cy - r, cx + k * 0.7 * r + 0.22 * r, cy + r), fill=fill)
    elif kind == "crescent":
        draw.pieslice(box, 90, 270, fill=fill)
        draw.ellipse((cx - 0.5 * r, cy - 0.75 * r, cx + 0.5 * r, cy + 0.75 * r), fill=fill)
    else:  # dots
        for dx, dy in ((-0.5, -0.5), (0.5, -0.5), (0, 0.5)):
            x, y = cx + dx * r, cy + dy * r
            draw.ellipse((x - 0.4 * r, y - 0.4 * r, x + 0.4 * r, y + 0.4 * r), fill=fill)


def camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a phone camera adds to a staged scene: sometimes blur, uneven light, a colour cast, sensor noise."""
    size = img.width
    if rng.random() < 0.35:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0)) * size / 64))
    pixels = np.asarray(img, dtype=np.float32)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0, 0.4) * (np.cos(theta) * ramp[None, :] + np.sin(theta) * ramp[:, None])
    gain = rng.uniform(0.7, 1.2) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    pixels = pixels * light[:, :, None] * gain + rng.normal(0, rng.uniform(1, 6), size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render_catalog(sprite: Image.Image, size: int) -> Image.Image:
    """The clean catalog picture: the product upright on white."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    part = sprite.resize((size, size), Image.BILINEAR)
    img.paste(part, (0, 0), part)
    return img


# --- title noise ----------------------------------------------------------------------------------

def clamp_noise(noise: float) -> float:
    """`data.title_noise` as the generators use it: at most 0.95, so a title keeps a few real words."""
    return min(max(noise, 0.0), 0.95)


def keep_core(noise: float) -> float:
    """The chance a seller writes a brand or category word: 1 - noise**2."""
    return 1.0 - noise ** 2


def seller_variant(value: int, n_values: int, noise: float, rng: np.random.Generator) -> int | None:
    """The variant a seller writes: the right one with chance 1 - noise, else none or a wrong one (half each)."""
    if rng.random() >= noise:
        return value
    if rng.random() < 0.5:
        return None
    chosen = int(rng.integers(n_values - 1))
    return chosen + (chosen >= value)  # a wrong variant, never the right one


def noise_word_count(n_words: int, noise: float, rng: np.random.Generator) -> int:
    """How many promotional/irrelevant words join `n_words` real ones: on average a share `noise` of the title."""
    return min(30, int(rng.poisson(max(n_words, 3) * noise / (1.0 - noise))))


def is_latin(word: str) -> bool:
    return any("a" <= c.lower() <= "z" for c in word)


def maybe_misspell(word: str, noise: float, rng: np.random.Generator) -> str:
    """Latin words get a typo (a swapped, dropped or doubled letter) with chance 0.05 + 0.15 * noise."""
    if not (is_latin(word) and rng.random() < 0.05 + 0.15 * noise) or len(word) < 3:
        return word
    i = int(rng.integers(1, len(word) - 1))
    how = rng.integers(3)
    if how == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap two letters
    if how == 1:
        return word[:i] + word[i + 1:]  # drop one
    return word[:i] + word[i] + word[i:]  # double one


# --- the writer -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Product:
    """One SKU as the writer needs it: its photos and seller titles (drawn from the SKU's Generator, a
    photo then its title), the tags of its records, and its catalog entry."""
    photo: Callable[[np.random.Generator], Image.Image]
    title: Callable[[np.random.Generator], str]
    tags: list[str]
    catalog_image: Image.Image
    catalog_title: str
    catalog_tags: list[str]


@dataclass(frozen=True)
class World:
    """A built world: its SKUs (each with `id`, `brand` and `category`), how many brands and categories
    it drew them from, the noise words its titles may hold, and how to render one SKU as a `Product`."""
    skus: Sequence[Any]
    brands: int
    categories: int
    noise_words: Sequence[str]
    product: Callable[[Any], Product]


def check_sizes(cfg) -> None:
    for name in ("skus", "brands", "categories", "max_images", "image_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"data.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.image_size < 8:
        raise ValueError(f"data.image_size must be >= 8, got {cfg.image_size}")


def write_world(out_dir: str | Path, cfg, build: Callable[[Any, np.random.Generator], World]) -> dict:
    """Build the world `build(cfg, rng)` describes and write it to the local directory `out_dir`.

    The directory is built under a temporary name and replaces `out_dir` only when complete.
    Returns the world's statistics (also written to world.json, with the params and the noise words).
    """
    started = time.perf_counter()
    check_sizes(cfg)
    world_rng = np.random.default_rng([cfg.seed, 0])
    world = build(cfg, world_rng)
    total = len(world.skus)
    is_holdout = np.zeros(total, dtype=bool)
    is_holdout[world_rng.choice(total, size=cfg.holdout_skus, replace=False)] = True
    trained = np.flatnonzero(~is_holdout)
    counts = np.zeros(total, dtype=int)
    counts[world_rng.permutation(trained)] = train_counts(len(trained), cfg.max_images, cfg.imbalance, cfg.profile)

    plans = [[("holdout", cfg.test_per_class)] if is_holdout[index] else
             [("train", int(counts[index])), ("val", cfg.val_per_class), ("test", cfg.test_per_class)]
             for index in range(total)]
    n_images = {"train": 0, "val": 0, "test": 0, "holdout": 0, "catalog": 0}
    with storage.atomic_dir(out_dir) as tmp:
        names = ["train", "val", "test", "catalog"] + (["holdout"] if cfg.holdout_skus else [])
        files = {name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in names}
        try:
            for lines in _render_all(world, plans, cfg.seed, tmp):
                for split, line in lines:
                    files[split].write(line)
                    n_images[split] += 1
        finally:
            for fh in files.values():
                fh.close()
        train = counts[trained]
        stats = {
            "skus": int(cfg.skus), "holdout_skus": int(cfg.holdout_skus), "brands": world.brands,
            "categories": world.categories, "product_lines": len({(s.brand, s.category) for s in world.skus}),
            "images": n_images,
            "max_class_images": int(train.max()), "min_class_images": int(train.min()),
            "imbalance_requested": float(cfg.imbalance), "imbalance_measured": float(train.max() / train.min()),
        }
        described = {"params": asdict(cfg), "stats": stats, "noise_words": sorted(set(world.noise_words))}
        (tmp / "world.json").write_text(json.dumps(described, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    stats["seconds"] = round(time.perf_counter() - started, 2)
    return stats


_BLOCK = 64  # SKUs per task: big enough to amortise a task's overhead, small enough to balance the workers
_job: tuple = ()  # (world, plans, seed, out) of the rendering in progress in this worker process


def _render_all(world: World, plans: list, seed: int, out: Path) -> Iterator[list[tuple[str, str]]]:
    """Render every SKU's images into `out`, yielding each block's (split, jsonl line)s in SKU order.

    Blocks of SKUs render in worker processes, one per CPU: each SKU's images come from its own seeded
    Generator, so the bytes are the same whatever the number of workers (1.1M images at 64 px take ~75
    CPU-minutes). The workers are forked and inherit the world (its closures do not pickle); where `fork`
    is unavailable, the blocks render in this process."""
    job = (world, plans, seed, out)
    blocks = [range(start, min(start + _BLOCK, len(plans))) for start in range(0, len(plans), _BLOCK)]
    workers = min(len(blocks), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (_render_block(block, job) for block in blocks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(job,))  # forked: initargs are not pickled
    try:
        yield from pool.map(_render_block, blocks)
    finally:  # on an error, don't render the blocks still queued
        pool.shutdown(cancel_futures=True)


def _start_worker(job: tuple) -> None:
    global _job
    _job = job


def _render_block(indices: range, job: tuple = ()) -> list[tuple[str, str]]:
    world, plans, seed, out = job or _job
    lines = []
    for index in indices:
        sku, rng = world.skus[index], np.random.default_rng([seed, 1, index])
        product = world.product(sku)
        for split, n in plans[index]:
            for k in range(n):
                rel = f"images/{sku.id}/{split}_{k:04d}.png"
                save_png(product.photo(rng), out / rel)
                lines.append((split, json.dumps({"image": rel, "sku": sku.id, "title": product.title(rng),
                                                 "tags": product.tags}, ensure_ascii=False) + "\n"))
        rel = f"images/catalog/{sku.id}.png"
        save_png(product.catalog_image, out / rel)
        lines.append(("catalog", json.dumps({"image": rel, "sku": sku.id, "title": product.catalog_title,
                                             "tags": product.catalog_tags}, ensure_ascii=False) + "\n"))
    return lines


def save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=6)
