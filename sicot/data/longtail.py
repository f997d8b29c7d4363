"""Long-tail bookkeeping: class sizes, head/tail and many/medium/few groups, dataset statistics, the plot."""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable

from sicot import figures, storage

MANY, FEW = 100, 20  # the field's convention: many > 100 >= medium >= 20 > few


def class_counts(records: Iterable) -> dict[str, int]:
    """Images per SKU, largest class first (ties by SKU)."""
    counts = Counter(r.sku for r in records)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def head_tail(counts: dict[str, int], threshold: int) -> tuple[set[str], set[str]]:
    """Head = classes with at least `threshold` training images; tail = the rest."""
    head = {c for c, n in counts.items() if n >= threshold}
    return head, set(counts) - head


def shot_group(n: int) -> str:
    return "many" if n > MANY else "medium" if n >= FEW else "few"


def imbalance(counts: dict[str, int]) -> float:
    """Largest over smallest class size (1.0 for a single class, 0.0 for none)."""
    return max(counts.values()) / min(counts.values()) if counts else 0.0


def _tokenizer() -> Callable[[str], list[str]]:
    try:
        from sicot.text.tokenize import tokenize  # jieba-based; loaded only when statistics are asked for
    except ImportError:
        return str.split
    return tokenize


def data_stats(manifest, head_threshold: int) -> dict:
    """What a reader needs to judge a dataset: size, skew, head/tail split, how titles tie head to tail."""
    counts = class_counts(manifest.train)
    head, tail = head_tail(counts, head_threshold)
    groups = Counter(shot_group(n) for n in counts.values())
    tokenize = _tokenizer()
    vocab = {"head": set(), "tail": set()}
    for record in manifest.train:
        vocab["head" if record.sku in head else "tail"].update(tokenize(record.title))
    shared = vocab["head"] & vocab["tail"]
    titled = [r for split in (manifest.train, manifest.val, manifest.test) for r in split]
    train_skus = set(counts)
    catalog_skus = {r.sku for r in manifest.catalog}
    return {
        "classes": len(counts),
        "images": {"train": len(manifest.train), "val": len(manifest.val), "test": len(manifest.test),
                   "holdout": len(manifest.holdout)},
        "catalog_skus": len(catalog_skus),
        "catalog_only_skus": len(catalog_skus - train_skus),
        "train_skus_missing_from_catalog": len(train_skus - catalog_skus),
        "imbalance": round(imbalance(counts), 3),
        "max_class_images": max(counts.values()),
        "min_class_images": min(counts.values()),
        "median_class_images": statistics.median(counts.values()),
        "head_threshold": head_threshold,
        "head_classes": len(head),
        "tail_classes": len(tail),
        "head_images": sum(counts[c] for c in head),
        "tail_images": sum(counts[c] for c in tail),
        "many_classes": groups["many"],
        "medium_classes": groups["medium"],
        "few_classes": groups["few"],
        "title_vocab": {
            "head": len(vocab["head"]), "tail": len(vocab["tail"]), "shared": len(shared),
            # share of the words seen in tail titles that head titles also use: what lets the text
            # stream carry what it learned on the head over to the tail
            "tail_shared_with_head": round(len(shared) / len(vocab["tail"]), 4) if vocab["tail"] else 0.0,
        },
        "empty_title_share": round(sum(not r.title.strip() for r in titled) / len(titled), 4) if titled else 0.0,
        "dropped_records": len(manifest.dropped),
    }


def plot_long_tail(counts: dict[str, int], threshold: int, path: str) -> None:
    """PNG of class sizes, largest first, on a log axis, with the head/tail boundary marked."""
    sizes = sorted(counts.values(), reverse=True)
    n_head = sum(n >= threshold for n in sizes)

    def draw(ax) -> None:
        ax.bar(range(n_head), sizes[:n_head], width=1.0, color="#31688e", label=f"head (≥ {threshold} images)")
        ax.bar(range(n_head, len(sizes)), sizes[n_head:], width=1.0, color="#fb8b24", label="tail")
        ax.axhline(threshold, color="black", linewidth=0.8, linestyle="--")
        if 0 < n_head < len(sizes):
            ax.axvline(n_head - 0.5, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("class (sorted by training images)")
        ax.set_ylabel("training images")
        ax.set_title(f"{len(sizes)} classes, imbalance {imbalance(counts):.0f}:1, "
                     f"{n_head} head / {len(sizes) - n_head} tail")
        ax.legend(loc="upper right")

    storage.write_bytes(str(path), figures.png(draw, figsize=(7, 3.5)))
