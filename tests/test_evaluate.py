import csv
import json

import numpy as np
import pytest

from sicot.evaluate import comparison, per_class, strongest_baseline, summarize

# 4 classes with 150 (many, head), 40 (medium, head), 12 and 3 (few, tail) training images.
TRAIN_COUNTS = [150, 40, 12, 3]
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3])
TOPK = np.array([
    [0, 1, 2],  # top-1 hit
    [1, 0, 2],  # top-3 hit only
    [1, 2, 3],  # top-1 hit
    [0, 2, 3],  # miss
    [0, 1, 2],  # top-3 hit only
    [2, 0, 1],  # top-1 hit
    [0, 1, 2],  # miss
    [0, 3, 1],  # top-3 hit only (the true class ranked second)
])


def test_metrics_by_hand():
    m = summarize("sicot", TOPK, LABELS, TRAIN_COUNTS, head_threshold=20)
    assert m["model"] == "sicot" and m["head_threshold"] == 20
    assert m["top1"] == pytest.approx(3 / 8) and m["top3"] == pytest.approx(6 / 8)
    assert m["head"] == {"top1": 0.5, "top3": 0.75, "classes": 2, "images": 4}
    assert m["tail"] == {"top1": 0.25, "top3": 0.75, "classes": 2, "images": 4}
    assert m["many"] == {"top1": 0.5, "top3": 1.0, "classes": 1, "images": 2}
    assert m["medium"] == {"top1": 0.5, "top3": 0.5, "classes": 1, "images": 2}
    assert m["few"] == {"top1": 0.25, "top3": 0.75, "classes": 2, "images": 4}
    # the contract's exact key set
    assert list(m) == ["model", "top1", "top3", "head_threshold", "head", "tail", "many", "medium", "few"]


def test_group_without_test_images_reports_zero_images():
    m = summarize("baseline", TOPK[:2], LABELS[:2], TRAIN_COUNTS, head_threshold=20)
    assert m["tail"] == {"top1": 0.0, "top3": 0.0, "classes": 0, "images": 0}


def test_per_class_rows():
    rows = per_class(TOPK, LABELS, ["a", "b", "c", "d"], TRAIN_COUNTS, head_threshold=20)
    assert [(r["sku"], r["top1"], r["top3"], r["group"], r["shot"]) for r in rows] == [
        ("a", 0.5, 1.0, "head", "many"), ("b", 0.5, 0.5, "head", "medium"),
        ("c", 0.5, 1.0, "tail", "few"), ("d", 0.0, 0.5, "tail", "few")]


def test_comparison_table():
    base = summarize("baseline", TOPK, LABELS, TRAIN_COUNTS, 20) | {"classifier_rows": "trained"}
    better = summarize("sicot", np.tile(LABELS[:, None], (1, 3)), LABELS, TRAIN_COUNTS, 20)
    table, markdown = comparison(base | {"val_top1": 0.5}, better | {"classifier_rows": "title_words"})
    rows = {(r["group"], r["metric"]): r for r in table["rows"]}
    assert list(rows) == [(g, m) for g in ("overall", "head", "tail") for m in ("top1", "top3")]
    assert rows["tail", "top1"]["gain"] == pytest.approx(0.75) == rows["tail", "top1"]["gain_over_strongest"]
    assert "| overall top-1 | 37.5 | 100.0 | +62.5 |" in markdown
    assert markdown.splitlines()[0] == ("| test accuracy (%) | baseline, trained rows | sicot, title-word rows "
                                        "| gain over the baseline |")
    assert table["strongest"] == "baseline" and "picked on validation" not in markdown  # nothing to pick from
    assert table["note"] in markdown and "seed" in table["note"].lower()


@pytest.mark.parametrize("val_top1, strongest", [((0.6, 0.5), "baseline"), ((0.5, 0.6), "class_means"),
                                                 ((0.5, 0.5), "class_means"), ((None, None), "class_means")])
def test_comparison_with_the_baselines_class_means(val_top1, strongest):
    """The baseline's class-mean score sits beside it; the gain is also taken over the strongest of the two,
    picked on validation (the class means on a tie or without validation photos)."""
    base = summarize("baseline", TOPK, LABELS, TRAIN_COUNTS, 20) | {"val_top1": val_top1[0]}
    base["class_means"] = summarize("baseline+class_means", TOPK[:, [1, 0, 2]], LABELS, TRAIN_COUNTS, 20) | {
        "val_top1": val_top1[1]}
    sicot = summarize("sicot", np.tile(LABELS[:, None], (1, 3)), LABELS, TRAIN_COUNTS, 20)
    table, markdown = comparison(base, sicot)
    tail = next(r for r in table["rows"] if (r["group"], r["metric"]) == ("tail", "top1"))
    means_tail = base["class_means"]["tail"]["top1"]
    assert tail["baseline_class_means"] == means_tail and tail["gain_over_class_means"] == pytest.approx(1 - means_tail)
    assert table["strongest"] == strongest
    assert tail["gain_over_strongest"] == (tail["gain"] if strongest == "baseline" else tail["gain_over_class_means"])
    lines = markdown.splitlines()
    assert lines[0] == ("| test accuracy (%) | baseline, its rows | baseline, class means | sicot, its rows "
                        "| gain over the baseline | gain over the strongest baseline |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|"
    overall = 100 * base["class_means"]["top1"]
    over_strongest = 100 - (37.5 if strongest == "baseline" else overall)
    assert f"| overall top-1 | 37.5 | {overall:.1f} | 100.0 | +62.5 | {over_strongest:+.1f} |" in lines
    which = "trained rows" if strongest == "baseline" else "class means"
    assert f"picked on validation top-1: the baseline's {which}" in markdown
    assert ("(60.0 vs 50.0 %)" in markdown) == (val_top1 == (0.6, 0.5))


def test_evaluate_model_writes_the_reports(tiny_world, tmp_path, monkeypatch):
    """Both models trained on the tiny world: every report of the contract is written and logged, with
    the share of SICoT's attention on the demo world's noise words."""
    from components import evaluate_model
    from sicot.attention import NOISE_METRICS
    from sicot.data.synthetic import IRRELEVANT_WORDS, PROMO_WORDS
    from sicot.train import run_training

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for mode in ("baseline", "sicot"):
        run_training(tiny_world.params(tmp_path, f"train.mode={mode}", "train.epochs=1"), track=False)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "world.json").write_text(json.dumps({"noise_words": sorted(PROMO_WORDS + IRRELEVANT_WORDS)}))
    params = tiny_world.params(tmp_path, f"paths.raw={tmp_path / 'raw'}")
    out = evaluate_model.run(params)

    reports = tmp_path / "reports"
    for model in ("baseline", "sicot"):
        metrics = json.loads((reports / model / "metrics.json").read_text())
        assert metrics == out["models"][model] and metrics["model"] == model
        assert metrics["head"]["images"] + metrics["tail"]["images"] == 18  # 6 SKUs x 3 test images
        assert 0.0 <= metrics["top1"] <= metrics["top3"] <= 1.0
        rows = list(csv.DictReader((reports / model / "per_class.csv").open()))
        assert len(rows) == 6 and sum(int(r["test_images"]) for r in rows) == 18
        assert (reports / model / "per_class.png").read_bytes()[:4] == b"\x89PNG"
    assert not (reports / "baseline" / "attention.html").exists()
    means = out["models"]["baseline"]["class_means"]  # evaluate.class_means: on by default
    assert means["model"] == "baseline+class_means" and means["tail"]["images"] == metrics["tail"]["images"]
    assert "class_means" not in out["models"]["sicot"]
    page = (reports / "sicot" / "attention.html").read_text(encoding="utf-8")
    assert page.count("<tr><td>SKU") == 4  # evaluate.attention_samples
    sicot = out["models"]["sicot"]
    assert not set(NOISE_METRICS) & set(out["models"]["baseline"])
    assert 0 < sicot["attention_noise_tokens"] < 1 and 0 < sicot["attention_noise_titles"] <= 18
    noise_mass, noise_tokens = sicot["attention_noise_mass"], sicot["attention_noise_tokens"]
    assert sicot["attention_noise_ratio"] == pytest.approx(noise_mass / noise_tokens)
    assert f"Noise ratio {sicot['attention_noise_ratio']:.2f}" in page and 'noise">' in page
    table = json.loads((reports / "comparison.json").read_text())
    assert table["baseline"] == "baseline" and table["cotraining"] == "sicot" and len(table["rows"]) == 6
    assert (reports / "comparison.md").read_text().startswith("| test accuracy (%) |")
    assert table["rows"][0]["baseline_class_means"] == means["top1"]
    baseline = out["models"]["baseline"]
    assert baseline["classifier_rows"] == "trained" and means["classifier_rows"] == "class_means"
    assert all(0.0 <= m["val_top1"] <= 1.0 for m in (means, baseline, sicot))
    assert table["strongest"] == strongest_baseline(baseline)

    import mlflow

    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert run.data.metrics["sicot.top1"] == pytest.approx(out["models"]["sicot"]["top1"])
    assert run.data.metrics["sicot.attention_noise_ratio"] == pytest.approx(sicot["attention_noise_ratio"])
    assert run.data.metrics["baseline.class_means.tail.top1"] == pytest.approx(means["tail"]["top1"])
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"])} >= {"baseline", "sicot",
                                                                                      "comparison.json"}


def test_evaluate_without_models_says_what_to_run(tiny_world, tmp_path):
    from sicot.evaluate import EvaluationError, evaluate_all

    with pytest.raises(EvaluationError, match="run train_model first"):
        evaluate_all(tiny_world.params(tmp_path), track=False)
