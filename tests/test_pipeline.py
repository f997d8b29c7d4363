"""The whole pipeline as a newcomer runs it: the README's first command, `python -m flows.pipeline` with
Prefect's ephemeral server and the embedded MLflow store, on the demo world in a copy of the checkout.

That run is the README test's (tests/readme.py): the suite runs the demo pipeline once. The README's
later blocks run in the same checkout before these tests look at it, so they pick the first pipeline
run out of what is there (its output, the first parent run in MLflow, model version 1)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests import readme
from tests.workflow import run

pytestmark = [pytest.mark.services, pytest.mark.slow]

FIRST_COMMAND = ".venv/bin/python -m flows.pipeline"
STEPS = ("prepare_data", "train_word2vec", "pretrain_visual", "train_baseline", "train_sicot", "evaluate_model",
         "promote_model")
# What each step says when it is done, in one line, and what training says once per epoch.
SAYS = ("prepare_data: ", "train_word2vec: ", "pretrain_visual: ", "train_model: baseline, ", "train_model: sicot, ",
        "evaluate_model: ", "promote_model: ", "publish_index: ")


def pipeline(checkout: readme.Checkout, *args: str, check: bool = True):
    return run([*FIRST_COMMAND.split(), *args], checkout.root, checkout.env, timeout=readme.BLOCK_TIMEOUT_S,
               check=check)


def task_states(output: str) -> dict[str, str]:
    """Task name -> final state name, from the flow's log lines."""
    found = re.findall(r"Task run '([A-Za-z0-9_]+?)(?:-[0-9a-f]{3})?' - Finished in state (\w+)\(", output)
    return dict(found)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> readme.Checkout:
    return readme.checkout(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def first_run(demo):
    result = demo.result(FIRST_COMMAND)
    assert result.returncode == 0, result.explain()
    print(f"demo pipeline, first run: {result.seconds:.1f}s")
    return result


@pytest.fixture(scope="module")
def params(demo) -> dict:
    return yaml.safe_load((demo.root / "params.yaml").read_text(encoding="utf-8"))


def test_first_run_is_clean_and_says_what_each_step_did(first_run):
    noise = [line for line in first_run.output.splitlines() if re.search(r"\|\s*ERROR\s*\||Traceback", line)]
    assert not noise, "\n".join(noise) + "\n" + first_run.explain()
    for said in SAYS:
        assert said in first_run.output, (said, first_run.explain())
    assert re.search(r"sicot epoch 1/\d+: loss ", first_run.output), first_run.explain()  # training shows progress


def test_first_run_trains_compares_promotes_and_publishes(demo, first_run, params):
    states = task_states(first_run.output)
    assert all(states.get(step) == "Completed" for step in STEPS), (states, first_run.explain())
    assert ("| test accuracy (%) | baseline, trained rows | baseline, class means | sicot, title-word rows "
            "| gain over the baseline | gain over the strongest baseline |") in first_run.output
    assert "| tail top-1 |" in first_run.output and "picked on validation top-1" in first_run.output
    # both trainings started from the pretrain step's visual stream
    starts = re.findall(r"starting the backbone from \S*models/pretrained/backbone\.pt", first_run.output)
    assert len(starts) == 2, first_run.explain()

    skus, test_images = params["data"]["skus"], params["data"]["skus"] * params["data"]["test_per_class"]
    assert json.loads((demo.root / "reports/data_stats.json").read_text())["classes"] == skus
    for model in ("baseline", "sicot"):
        metrics = json.loads((demo.root / f"reports/{model}/metrics.json").read_text())
        assert metrics["model"] == model and 0.0 <= metrics["top1"] <= metrics["top3"] <= 1.0
        assert metrics["head"]["images"] + metrics["tail"]["images"] == test_images
    assert json.loads((demo.root / "reports/comparison.json").read_text())["rows"], "empty comparison table"

    current = json.loads((demo.root / "index_store/index/CURRENT").read_text())
    assert current["history"][-1].startswith("sicot-v1-")  # the first index: built from model version 1
    assert (demo.root / "index_store/index" / current["version"] / "manifest.json").is_file()


def test_first_run_is_tracked_as_parent_and_child_runs(demo, first_run, params):
    import mlflow

    store = f"sqlite:///{demo.root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("sicot")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.info.run_name == "sicot-pipeline")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == str(params["train"]["epochs"])
    children = {r.data.tags.get("step"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(STEPS) <= set(children), sorted(children)
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["prepare_data"].data.metrics["classes"] == params["data"]["skus"]
    assert children["train_sicot"].data.metrics["val_top1"] >= 0.0
    assert children["evaluate_model"].data.metrics["sicot.tail.top1"] >= 0.0
    assert children["promote_model"].data.metrics["promoted"] == 1.0
    # every step after prepare read one DVC version of the data, kept in the checkout's DVC cache (the
    # pretraining reads a world of its own)
    versions = {r.data.tags["data_version"] for step, r in children.items()
                if step not in ("prepare_data", "pretrain_visual")}
    assert len(versions) == 1 and re.fullmatch(r"[0-9a-f]{32}\.dir", version := versions.pop())
    listing = demo.root / ".dvc/cache/files/md5" / version[:2] / version[2:]
    assert {"train.jsonl", "labels.json"} <= {entry["relpath"] for entry in json.loads(listing.read_text())}

    first = client.get_model_version("sicot", "1")
    assert first.tags["promotion.decision"] == "champion" and first.tags["candidate"] == "sicot"


def test_second_run_reuses_cached_steps(demo, first_run):
    model_bytes = (demo.root / "models/sicot/model.pt").read_bytes()
    result = pipeline(demo)
    print(f"demo pipeline, cached run: {result.seconds:.1f}s (first {first_run.seconds:.1f}s)")
    states = task_states(result.output)
    for step in ("prepare_data", "train_word2vec", "pretrain_visual", "train_baseline", "train_sicot",
                 "evaluate_model"):
        assert states.get(step) == "Cached", (step, states, result.explain())
    assert states.get("promote_model") == "Completed"  # side effects are never cached
    assert (demo.root / "models/sicot/model.pt").read_bytes() == model_bytes


def test_bad_record_fails_the_flow_with_the_steps_error(demo, first_run, tmp_path):
    # A dataset in the contract's format with one broken line, read with on_bad_record=error.
    dataset = tmp_path / "dataset"
    shutil.copytree(demo.root / "data/raw", dataset)
    lines = (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = '{"image": "images/missing.png", "sku": \n'
    (dataset / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    prepared = _jsonl_bytes(demo.root / "data/prepared")

    result = pipeline(demo, "--set", f"data.source={dataset}", "--set", "data.on_bad_record=error", check=False)
    assert result.returncode != 0, result.explain()
    assert "train.jsonl:3: " in result.output, result.explain()
    states = task_states(result.output)
    assert states.get("prepare_data") == "Failed", states
    assert "train_baseline" not in states and "promote_model" not in states
    assert "Flow run" in result.output and "Finished in state Failed" in result.output
    assert _jsonl_bytes(demo.root / "data/prepared") == prepared  # the failed step left the last good dataset


def _jsonl_bytes(directory: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in directory.glob("*.jsonl"))
