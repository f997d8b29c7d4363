"""The whole pipeline as a newcomer runs it: `python -m flows.pipeline` with Prefect's ephemeral server
and the embedded MLflow store, in a temporary working directory, on the tiny world."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests import services
from tests.workflow import REPO, clean_env, run, write_tiny_params

pytestmark = [pytest.mark.services, pytest.mark.slow]

STEPS = ("prepare_data", "train_word2vec", "train_baseline", "train_sicot", "evaluate_model", "promote_model")


def pipeline(workdir: Path, *args: str, check: bool = True):
    env = clean_env(PYTHONPATH=str(REPO), **services.prefect_env(workdir / ".prefect"))
    return run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", *args], workdir, env,
               check=check)


def task_states(output: str) -> dict[str, str]:
    """Task name -> final state name, from the flow's log lines."""
    found = re.findall(r"Task run '([A-Za-z0-9_]+?)(?:-[0-9a-f]{3})?' - Finished in state (\w+)\(", output)
    return dict(found)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    write_tiny_params(workdir)
    result = pipeline(workdir)
    print(f"tiny pipeline, first run: {result.seconds:.1f}s")
    return workdir, result


def test_first_run_trains_compares_promotes_and_publishes(first_run):
    workdir, result = first_run
    states = task_states(result.output)
    assert all(states.get(step) == "Completed" for step in STEPS), (states, result.explain())
    assert "| test accuracy (%) | baseline | co-training | gain |" in result.output
    assert "| tail top-1 |" in result.output

    stats = json.loads((workdir / "reports/data_stats.json").read_text())
    assert stats["classes"] == 12
    for model in ("baseline", "sicot"):
        metrics = json.loads((workdir / f"reports/{model}/metrics.json").read_text())
        assert metrics["model"] == model and 0.0 <= metrics["top1"] <= metrics["top3"] <= 1.0
        assert metrics["head"]["images"] + metrics["tail"]["images"] == 12 * 2
    comparison = json.loads((workdir / "reports/comparison.json").read_text())
    assert comparison, "empty comparison table"

    current = json.loads((workdir / "index_store/index/CURRENT").read_text())
    assert current["version"].startswith("sicot-v1-")  # built from the champion, model version 1
    assert (workdir / "index_store/index" / current["version"] / "manifest.json").is_file()


def test_first_run_is_tracked_as_parent_and_child_runs(first_run):
    import mlflow

    workdir, _ = first_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
                                 registry_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sicot")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "sicot-pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["train.epochs"] == "2"
    children = {r.data.tags.get("step"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(STEPS) <= set(children), sorted(children)
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["train_sicot"].data.metrics["val_top1"] >= 0.0
    assert children["evaluate_model"].data.metrics["sicot.tail.top1"] >= 0.0
    # every step after prepare read one DVC version of the data, kept in the working directory's DVC cache
    versions = {r.data.tags["data_version"] for step, r in children.items() if step != "prepare_data"}
    assert len(versions) == 1 and re.fullmatch(r"[0-9a-f]{32}\.dir", version := versions.pop())
    listing = workdir / "data/dvc-cache/files/md5" / version[:2] / version[2:]
    assert {"train.jsonl", "labels.json"} <= {entry["relpath"] for entry in json.loads(listing.read_text())}

    champion = client.get_model_version_by_alias("sicot", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["promotion.decision"] == "champion"


def test_second_run_reuses_cached_steps(first_run):
    workdir, first = first_run
    model_bytes = (workdir / "models/sicot/model.pt").read_bytes()
    result = pipeline(workdir)
    print(f"tiny pipeline, cached run: {result.seconds:.1f}s (first {first.seconds:.1f}s)")
    states = task_states(result.output)
    for step in ("prepare_data", "train_word2vec", "train_baseline", "train_sicot", "evaluate_model"):
        assert states.get(step) == "Cached", (step, states, result.explain())
    assert states.get("promote_model") == "Completed"  # side effects are never cached
    assert (workdir / "models/sicot/model.pt").read_bytes() == model_bytes


def test_bad_record_fails_the_flow_with_the_steps_error(first_run, tmp_path):
    workdir, _ = first_run
    # A dataset in the contract's format with one broken line, read with on_bad_record=error.
    dataset = tmp_path / "dataset"
    shutil.copytree(workdir / "data/raw", dataset)
    lines = (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = '{"image": "images/missing.png", "sku": \n'
    (dataset / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    prepared = sorted(p.read_bytes() for p in (workdir / "data/prepared").glob("*.jsonl"))

    result = pipeline(workdir, "--set", f"data.source={dataset}", "--set", "data.on_bad_record=error", check=False)
    assert result.returncode != 0, result.explain()
    assert "train.jsonl:3: " in result.output, result.explain()
    states = task_states(result.output)
    assert states.get("prepare_data") == "Failed", states
    assert "train_baseline" not in states and "promote_model" not in states
    assert "Flow run" in result.output and "Finished in state Failed" in result.output
    # The failed step left the last good dataset in place.
    assert sorted(p.read_bytes() for p in (workdir / "data/prepared").glob("*.jsonl")) == prepared
