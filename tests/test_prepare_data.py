"""The prepare_data step: synthetic or hand-made source, skip/error modes, atomic output, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components import prepare_data
from sicot.config import load_params
from sicot.data.manifest import DatasetError
from sicot.data.prepared import load_prepared
from tests.test_manifest import BAD_CASES, SKUS, append, make_dataset

REPO = Path(__file__).resolve().parents[1]


def params_for(tmp_path: Path, *overrides: str):
    return load_params(None, [f"paths.raw={tmp_path}/raw", f"paths.prepared={tmp_path}/prepared",
                              f"paths.reports={tmp_path}/reports", *overrides])


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_source_is_generated_validated_and_described(tmp_path):
    params = params_for(tmp_path, "data.skus=12", "data.brands=3", "data.categories=2", "data.max_images=20",
                        "data.imbalance=10", "data.image_size=16", "data.val_per_class=1", "data.test_per_class=2",
                        "data.holdout_skus=1", "evaluate.head_threshold=8")
    out = prepare_data.run(params, track=False)
    assert out["classes"] == 12 and out["dropped"] == 0 and out["generated"]["images"]["catalog"] == 13
    prepared = load_prepared(str(tmp_path / "prepared"))
    assert len(prepared.classes()) == 12 and len(prepared.holdout) == 2
    assert json.loads((tmp_path / "prepared" / "labels.json").read_text())["classes"] == prepared.classes()
    stats = json.loads((tmp_path / "reports" / "data_stats.json").read_text())
    assert stats["classes"] == 12 and isinstance(stats["classes"], int)
    assert stats["imbalance"] == 10.0 and stats["max_class_images"] == 20 and stats["min_class_images"] == 2
    assert stats["head_classes"] + stats["tail_classes"] == 12 and stats["head_classes"] > 0
    assert stats["many_classes"] + stats["medium_classes"] + stats["few_classes"] == 12
    assert stats["images"] == {"train": len(prepared.train), "val": 12, "test": 24, "holdout": 2}
    assert 0 < stats["title_vocab"]["tail_shared_with_head"] <= 1 and stats["title_vocab"]["shared"] > 0
    assert stats["catalog_only_skus"] == 1 and 0 <= stats["empty_title_share"] < 0.5
    assert (tmp_path / "reports" / "long_tail.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "reports" / "dropped_records.jsonl").read_text() == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("case, file, make_line, reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_skip_mode_prepares_the_rest_and_reports_the_dropped(tmp_path, case, file, make_line, reason):
    source = make_dataset(tmp_path / "handmade")
    line = append(source, file, make_line(source))
    out = prepare_data.run(params_for(tmp_path, f"data.source={source}", "data.on_bad_record=skip"), track=False)
    assert out["dropped"] == 1 and out["classes"] == 3
    report = [json.loads(x) for x in (tmp_path / "reports" / "dropped_records.jsonl").read_text().splitlines()]
    assert len(report) == 1 and report[0]["file"] == file and report[0]["line"] == line
    assert reason in report[0]["reason"]
    prepared = load_prepared(str(tmp_path / "prepared"))
    assert (len(prepared.train), len(prepared.val), len(prepared.test), len(prepared.catalog)) == (9, 3, 3, 4)
    assert json.loads((tmp_path / "reports" / "data_stats.json").read_text())["dropped_records"] == 1


def test_a_failed_prepare_changes_nothing(tmp_path):
    source = make_dataset(tmp_path / "handmade")
    params = params_for(tmp_path, f"data.source={source}")
    prepare_data.run(params, track=False)
    before = snapshot(tmp_path / "prepared"), snapshot(tmp_path / "reports")
    append(source, "test.jsonl", '{"image": "images/x.png", "sku": 5}')
    with pytest.raises(DatasetError, match=r"test\.jsonl:4: field 'sku' must be a string"):
        prepare_data.run(params, track=False)
    assert (snapshot(tmp_path / "prepared"), snapshot(tmp_path / "reports")) == before


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    return subprocess.run([sys.executable, "-m", "components.prepare_data", "--params", str(REPO / "params.yaml"),
                           "--set", f"paths.prepared={tmp_path}/prepared", "--set", f"paths.reports={tmp_path}/reports",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prepares_a_hand_made_directory_and_logs_to_mlflow(tmp_path):
    source = make_dataset(tmp_path / "handmade")
    done = _cli(tmp_path, "--set", f"data.source={source}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["classes"] == 3
    assert "prepare_data: 3 classes, 9/3/3 train/val/test images" in done.stderr
    assert load_prepared(str(tmp_path / "prepared")).classes() == SKUS
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        metrics = dict(db.execute("select key, value from latest_metrics").fetchall())
    assert metrics["classes"] == 3 and metrics["images_train"] == 9


def test_cli_exits_2_listing_every_problem(tmp_path):
    source = make_dataset(tmp_path / "handmade")
    a = append(source, "train.jsonl", "{broken")
    b = append(source, "val.jsonl", '{"image": "images/val_SKU-A_0.png", "sku": "SKU-Q"}')
    done = _cli(tmp_path, "--set", f"data.source={source}")
    assert done.returncode == 2
    assert f"train.jsonl:{a}: invalid JSON" in done.stderr and f"val.jsonl:{b}: sku 'SKU-Q'" in done.stderr
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "reports").exists()
