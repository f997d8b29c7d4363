"""Test-split evaluation of every trained model: top-k overall and by long-tail group, per class, plots,
the word-attention view of SICoT's title stream, and the baseline vs co-training comparison.

Writes, per model directory `paths.models/<model>/model.pt`:
- `reports/<model>/metrics.json`: the evaluation output contract (docs/architecture.md#evaluation-output-contract),
  plus `model_sha256`, the sha256 of the model file the numbers describe,
- `reports/<model>/per_class.csv` and `per_class.png` (top-1 against training images, log x),
- `reports/<model>/attention.html` when the model has a title encoder with word attention; on the demo
  world, metrics.json then also holds how much of that attention lands on noise words (sicot.attention),
and `reports/comparison.json` / `comparison.md` when both `baseline` and `sicot` exist.
A group with no test image reports accuracy 0.0 with `images: 0`.

The baseline is also scored with class-mean rows (`evaluate.class_means`, metrics.json's `class_means`):
the strongest title-free baseline measured (docs/method.md), so the comparison shows what the titles add
beyond it, not only beyond the plain baseline.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from sicot import figures, storage
from sicot.config import Params

GROUPS = ("head", "tail", "many", "medium", "few")
COMPARED = (("overall", "top1"), ("overall", "top3"), ("head", "top1"), ("head", "top3"),
            ("tail", "top1"), ("tail", "top3"))


class EvaluationError(ValueError):
    pass


# --- metrics ------------------------------------------------------------------------------------------

def hits(topk: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (true class ranked first, true class in the first three)."""
    return topk[:, 0] == labels, (topk[:, :3] == labels[:, None]).any(axis=1)


def summarize(model: str, topk: np.ndarray, labels: np.ndarray, train_counts: Sequence[int],
              head_threshold: int) -> dict:
    """The metrics.json contract from top-k predictions [N, k] and true labels [N] (class indices).

    `train_counts[c]` = training images of class c: it decides head/tail (>= head_threshold) and the
    many/medium/few shot group of every test image's class.
    """
    from sicot.data.longtail import shot_group

    top1, top3 = hits(topk, labels)
    counts = np.asarray(train_counts)[labels]
    member = {"head": counts >= head_threshold, "tail": counts < head_threshold}
    shots = np.array([shot_group(int(n)) for n in counts])
    member.update({g: shots == g for g in ("many", "medium", "few")})

    def part(rows: np.ndarray) -> dict:
        n = int(rows.sum())
        return {"top1": float(top1[rows].mean()) if n else 0.0, "top3": float(top3[rows].mean()) if n else 0.0,
                "classes": int(len(np.unique(labels[rows]))), "images": n}

    out = {"model": model, "top1": float(top1.mean()) if len(labels) else 0.0,
           "top3": float(top3.mean()) if len(labels) else 0.0, "head_threshold": head_threshold}
    out.update({g: part(member[g]) for g in GROUPS})
    return out


def per_class(topk: np.ndarray, labels: np.ndarray, classes: Sequence[str], train_counts: Sequence[int],
              head_threshold: int) -> list[dict]:
    """One row per class with test images: its accuracy next to how much it had to learn from."""
    from sicot.data.longtail import shot_group

    top1, top3 = hits(topk, labels)
    # One counting pass per column, linear in images (a mask per class is O(classes x images)).
    images = np.bincount(labels, minlength=len(classes))
    right1 = np.bincount(labels, weights=top1, minlength=len(classes))
    right3 = np.bincount(labels, weights=top3, minlength=len(classes))
    rows = []
    for c in np.flatnonzero(images):
        n = int(train_counts[c])
        rows.append({"class": int(c), "sku": classes[c], "train_images": n, "test_images": int(images[c]),
                     "top1": float(right1[c] / images[c]), "top3": float(right3[c] / images[c]),
                     "group": "head" if n >= head_threshold else "tail", "shot": shot_group(n)})
    return rows


NOISE_NOTE = ("A training seed alone moves these numbers: on params.yaml's demo, SICoT's tail gain over the strongest "
              "baseline was +2.2 ± 0.7 points over 3 seeds (docs/method.md; `python -m benchmarks.demo_regime` "
              "measures it for any settings). A gain within about twice the spread is noise.")
# The pipeline and dvc.yaml train the baseline with its trained rows whatever train.classifier_rows says:
# the title-free reference.
BASELINE_ROWS = "trained"
ROWS = {"trained": "trained rows", "class_means": "class means", "title_words": "title-word rows"}


def strongest_baseline(baseline: dict) -> str:
    """The title-free reference a co-trained model must beat: `baseline` (its trained rows) or
    `class_means` (the same visual stream with class-mean rows, when scored), whichever has the higher
    validation top-1; the class means without validation photos (the stronger in docs/method.md)."""
    means = baseline.get("class_means")
    if means is None:
        return "baseline"
    own, theirs = baseline.get("val_top1"), means.get("val_top1")
    return "baseline" if own is not None and theirs is not None and own > theirs else "class_means"


def comparison(baseline: dict, cotraining: dict) -> tuple[dict, str]:
    """The paper-style table: overall/head/tail x top-1/top-3 of the baseline, its class means when they
    were scored (metrics.json's `class_means`) and the co-trained model, and the co-trained model's gain
    over the baseline and over the strongest of the two, picked on validation."""
    means = baseline.get("class_means")
    strongest = strongest_baseline(baseline)

    def value(metrics: dict, group: str, metric: str) -> float:
        return metrics[metric] if group == "overall" else metrics[group][metric]

    rows = []
    for group, metric in COMPARED:
        b, s = value(baseline, group, metric), value(cotraining, group, metric)
        row = {"group": group, "metric": metric, "baseline": b, "cotraining": s, "gain": s - b}
        if means is not None:
            m = value(means, group, metric)
            row |= {"baseline_class_means": m, "gain_over_class_means": s - m}
        row["gain_over_strongest"] = row["gain_over_class_means"] if strongest == "class_means" else row["gain"]
        rows.append(row)

    def label(metrics: dict, name: str) -> str:
        return f"{name}, {ROWS.get(metrics.get('classifier_rows'), 'its rows')}"

    columns = [label(baseline, "baseline"), *(["baseline, class means"] if means is not None else []),
               label(cotraining, "sicot"), "gain over the baseline",
               *(["gain over the strongest baseline"] if means is not None else [])]
    table = ["| test accuracy (%) | " + " | ".join(columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for r in rows:
        cells = [r["baseline"], *([r["baseline_class_means"]] if means is not None else []), r["cotraining"]]
        gains = [r["gain"], *([r["gain_over_strongest"]] if means is not None else [])]
        table.append(f"| {r['group']} top-{r['metric'][-1]} | " + " | ".join(f"{100 * v:.1f}" for v in cells)
                     + " | " + " | ".join(f"{100 * g:+.1f}" for g in gains) + " |")
    picked = ""
    if means is not None:
        own, theirs = baseline.get("val_top1"), means.get("val_top1")
        scores = f" ({100 * own:.1f} vs {100 * theirs:.1f} %)" if own is not None and theirs is not None else ""
        picked = (f"Strongest title-free baseline, picked on validation top-1: the baseline's "
                  f"{'trained rows' if strongest == 'baseline' else 'class means'}{scores}.\n\n")
    return ({"baseline": baseline["model"], "cotraining": cotraining["model"], "strongest": strongest, "rows": rows,
             "note": NOISE_NOTE}, "\n".join(table) + f"\n\n{picked}{NOISE_NOTE}\n")


# --- model outputs ------------------------------------------------------------------------------------

@torch.no_grad()
def predict(recognizer, dataset, batch_size: int, device: torch.device, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(top-k class indices [N, k], labels [N]) over a dataset."""
    from torch.utils.data import DataLoader

    from sicot.data.dataset import collate

    recognizer.to(device).eval()
    tops, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        tops.append(recognizer.topk(batch["image"].to(device), k)[1].cpu())
        labels.append(batch["label"])
    if not tops:
        return np.zeros((0, k), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(tops).numpy(), torch.cat(labels).numpy()


def per_class_png(rows: list[dict], model: str, head_threshold: int) -> bytes:
    def draw(ax) -> None:
        for group, colour in (("head", "tab:blue"), ("tail", "tab:orange")):
            mine = [r for r in rows if r["group"] == group]
            ax.scatter([r["train_images"] for r in mine], [r["top1"] for r in mine], s=14, alpha=0.7,
                       color=colour, label=f"{group} ({len(mine)} classes)")
        ax.axvline(head_threshold, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("training images of the class (log)")
        ax.set_ylabel("test top-1 of the class")
        ax.set_title(f"{model}: per-class accuracy against training data")
        ax.legend(loc="upper left")

    return figures.png(draw, figsize=(7, 4.5))


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["class", "sku", "train_images", "test_images", "top1", "top3", "group", "shot"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --- the step -----------------------------------------------------------------------------------------

def split_stream(recognizer, manifest, split: str, batch_size: int):
    """The photos of one split, labelled by the recognizer's class index, read shard by shard."""
    from sicot.data.dataset import ProductImages
    from sicot.data.stream import ShardStream

    index = {sku: i for i, sku in enumerate(recognizer.classes)}
    return ShardStream(ProductImages(index, recognizer.image_size), manifest.root, manifest.shards[split], batch_size)


def score(model_uri: str, params: Params, manifest, device: torch.device):
    """(recognizer, top-3 class indices [N, 3], labels [N], training images per class) on the test split.
    A classifier over `evaluate.max_classifier_mb` is scored block by block from its files."""
    from sicot.data.longtail import class_counts
    from sicot.model.recognizer import Recognizer

    recognizer = Recognizer.load(model_uri, max_classifier_mb=params.evaluate.max_classifier_mb)
    unknown = sorted({r.sku for r in manifest.test} - set(recognizer.classes))
    if unknown:
        raise EvaluationError(f"{model_uri} does not know {len(unknown)} SKU(s) of the test split "
                              f"(e.g. {unknown[:3]}): it was trained on other data; retrain it")
    counts = class_counts(manifest.train)
    batch_size = params.evaluate.batch_size
    topk, labels = predict(recognizer, split_stream(recognizer, manifest, "test", batch_size), batch_size, device)
    return recognizer, topk, labels, [counts.get(sku, 0) for sku in recognizer.classes]


def class_mean_weight(recognizer, manifest, batch_size: int, device: torch.device) -> torch.Tensor:
    """The recognizer's rows replaced by its class means over the training photos, exactly as training
    exports them with `train.classifier_rows: class_means` (sicot.model.class_means)."""
    from torch.utils.data import DataLoader

    from sicot.data.dataset import collate
    from sicot.model.class_means import class_feature_sums, class_mean_rows

    recognizer.to(device).eval()
    loader = DataLoader(split_stream(recognizer, manifest, "train", batch_size), batch_size=batch_size,
                        collate_fn=collate)
    batches = ((b["image"].to(device), b["label"]) for b in loader)
    weight = recognizer.weight
    sums, counts = class_feature_sums(recognizer.backbone, batches, (0, weight.shape[0]), weight.shape[1], device)
    return class_mean_rows(weight, sums, counts)


def val_top1(recognizer, manifest, params: Params, device: torch.device) -> float | None:
    """Top-1 on the validation split (what picks the strongest baseline); None without validation photos."""
    if not manifest.val:
        return None
    batch_size = params.evaluate.batch_size
    topk, labels = predict(recognizer, split_stream(recognizer, manifest, "val", batch_size), batch_size, device)
    return float((topk[:, 0] == labels).mean())


def model_sha256(model_uri: str) -> str:
    """What ties a set of numbers to the model bytes they describe."""
    return hashlib.sha256(storage.read_bytes(model_uri)).hexdigest()


def evaluate_model_file(model_uri: str, params: Params, name: str = "candidate") -> dict:
    """metrics.json's content for any model file on the current test split; writes nothing."""
    from sicot.data.prepared import load_prepared
    from sicot.train import pick_device

    manifest = load_prepared(params.paths.prepared)
    _, topk, labels, counts = score(model_uri, params, manifest, pick_device(params.train.device))
    return summarize(name, topk, labels, counts, params.evaluate.head_threshold)


def report_model(name: str, model_dir: str, params: Params, manifest, device: torch.device) -> dict:
    """Evaluate the model in `model_dir` and write its reports; returns metrics.json's content."""
    model_uri = storage.join(model_dir, "model.pt")
    digest = model_sha256(model_uri)
    recognizer, topk, labels, counts = score(model_uri, params, manifest, device)
    threshold = params.evaluate.head_threshold
    rows_kind = BASELINE_ROWS if name == "baseline" else params.train.classifier_rows
    metrics = summarize(name, topk, labels, counts, threshold) | {
        "model_sha256": digest, "classifier_rows": rows_kind,
        "val_top1": val_top1(recognizer, manifest, params, device)}
    rows = per_class(topk, labels, recognizer.classes, counts, threshold)
    # The same visual stream with class-mean rows; a W too large to hold is scored from its files and
    # skips this.
    if name == "baseline" and params.evaluate.class_means and recognizer.weight is not None:
        recognizer.weight = class_mean_weight(recognizer, manifest, params.evaluate.batch_size, device)
        means_topk, _ = predict(recognizer, split_stream(recognizer, manifest, "test", params.evaluate.batch_size),
                                params.evaluate.batch_size, device)
        metrics["class_means"] = summarize(f"{name}+class_means", means_topk, labels, counts, threshold) | {
            "classifier_rows": "class_means", "val_top1": val_top1(recognizer, manifest, params, device)}

    out = storage.join(params.paths.reports, name)
    encoder_uri = storage.join(model_dir, "text_encoder.pt")
    if storage.exists(encoder_uri):
        from sicot.attention import attention_report, load_noise_words

        noise_words = load_noise_words(params.paths.raw) if params.data.source == "synthetic" else None
        page, noise = attention_report(encoder_uri, manifest.test, params.evaluate.attention_samples, noise_words)
        if noise is not None:
            metrics |= noise.metrics()
        if page:
            storage.write_text(storage.join(out, "attention.html"), page)
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    storage.write_text(storage.join(out, "per_class.csv"), csv_text(rows))
    storage.write_bytes(storage.join(out, "per_class.png"), per_class_png(rows, name, threshold))
    return metrics


def evaluate_all(params: Params, track: bool = True, only: str | None = None) -> dict:
    """Evaluate every trained model (or just `only`); returns {model: metrics} plus the comparison
    when both the baseline and the co-trained model have been evaluated."""
    from sicot import tracking
    from sicot.data.prepared import load_prepared
    from sicot.train import pick_device

    models = {name: where for name, where in tracking.trained_models(params).items() if only in (None, name)}
    if not models:
        where = (f"in pipeline run {os.environ[tracking.PARENT_ENV]}" if os.environ.get(tracking.PARENT_ENV)
                 else f"under {params.paths.models} (looked for */model.pt)")
        raise EvaluationError(f"no trained model{f' {only!r}' if only else ''} {where}; run train_model first")
    manifest = load_prepared(params.paths.prepared)
    device = pick_device(params.train.device)
    results = {name: report_model(name, where, params, manifest, device) for name, where in sorted(models.items())}
    outputs = {"models": results, "reports": params.paths.reports}
    table = write_comparison(params) if only is None else None
    if table is not None:
        outputs["comparison"] = table
    if track:
        outputs["run_id"] = log_to_mlflow(params, results, table)
    return outputs


def write_comparison(params: Params) -> dict | None:
    """reports/comparison.{json,md} from the stored metrics of both models; None unless both exist."""
    stored = {}
    for name in ("baseline", "sicot"):
        uri = storage.join(params.paths.reports, name, "metrics.json")
        if not storage.exists(uri):
            return None
        stored[name] = json.loads(storage.read_text(uri))
    table, markdown = comparison(stored["baseline"], stored["sicot"])
    storage.write_text(storage.join(params.paths.reports, "comparison.json"), json.dumps(table, indent=2) + "\n")
    storage.write_text(storage.join(params.paths.reports, "comparison.md"), markdown)
    return table


def log_to_mlflow(params: Params, results: dict, table: dict | None) -> str:
    from sicot import tracking
    from sicot.attention import NOISE_METRICS

    with tracking.step_run("evaluate_model", params, sections=("evaluate",)) as run:
        for name, metrics in results.items():
            flat = {f"{name}.top1": metrics["top1"], f"{name}.top3": metrics["top3"]}
            flat.update({f"{name}.{g}.{m}": metrics[g][m] for g in GROUPS for m in ("top1", "top3")})
            flat.update({f"{name}.{key}": metrics[key] for key in NOISE_METRICS if key in metrics})
            flat.update({f"{name}.val_top1": metrics["val_top1"]} if metrics.get("val_top1") is not None else {})
            if "class_means" in metrics:
                means = metrics["class_means"]
                flat |= {f"{name}.class_means.top1": means["top1"], f"{name}.class_means.top3": means["top3"]}
                flat |= {f"{name}.class_means.val_top1": means["val_top1"]} if means["val_top1"] is not None else {}
                flat |= {f"{name}.class_means.{g}.{m}": means[g][m] for g in GROUPS for m in ("top1", "top3")}
            tracking.log_metrics(flat)
            for key in storage.list_keys(storage.join(params.paths.reports, name)):
                tracking.log_file(key, artifact_path=name)
        if table is not None:
            tracking.log_dict(table, "comparison.json")
        return run.info.run_id
