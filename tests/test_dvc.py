"""The DVC pipeline in a throwaway git repository holding the working tree, on the tiny world:
each stage declares what its step reads and imports; repro, no-op repro, a params change that re-runs
only what depends on it, metrics and plots, and a push to S3 (SeaweedFS) from which a fresh clone pulls
everything and has nothing left to run."""
from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import yaml

from components.cli import RECORD_READS
from components.pretrain_visual import world_overrides
from sicot.config import Params
from sicot.config_docs import sections
from tests.workflow import BIN, clean_env, copy_checkout, git, run, write_tiny_params

pytestmark = [pytest.mark.services, pytest.mark.slow]

STAGES = ("prepare", "word2vec", "pretrain", "train_baseline", "train_sicot", "evaluate@baseline", "evaluate@sicot",
          "compare")
UP_TO_DATE = "Data and pipelines are up to date."
# Keys that change how a step runs, not what it computes (`opt(..., runtime=True)`): no stage lists them.
RUNTIME = {f"{name}.{key.name}" for name, kind in sections() for key in dataclasses.fields(kind)
           if key.metadata["runtime"]}
# Modules every step imports that shape no output: the command line, and the schema, whose values reach
# DVC through params.yaml (which holds every key: tests/test_config.py).
NOT_DEPS = {"components/__init__.py", "components/cli.py", "sicot/__init__.py", "sicot/config.py",
            "sicot/config_docs.py"}
# Read without effect: the baseline builds the co-training schedule but has no title stream to weigh; the
# pretraining run sets its world's sizes and its schedule itself (data.seed and train.backbone_weights
# it reads from the params: they decide whether it runs) and reports on its world only to itself.
COTRAIN = {"train.cotrain_weight", "train.cotrain_rampup"}
UNUSED_READS = {"train_baseline": COTRAIN,
                "pretrain": COTRAIN | {"evaluate.head_threshold"}
                | {f"{section}.{key}" for section, values in world_overrides(Params()).items() for key in values}
                - {"data.seed", "train.backbone_weights"}}


def dvc(repo, *args, check=True):
    return run([str(BIN / "dvc"), *args], repo, clean_env(), check=check)


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def s3_remote(repo, server, bucket: str) -> None:
    """The S3 remote as the default, endpoint and credentials in the untracked local config."""
    dvc(repo, "remote", "add", "--local", "--default", "s3", f"s3://{bucket}/dvc")
    for key, value in (("endpointurl", server.endpoint), ("access_key_id", server.access_key),
                       ("secret_access_key", server.secret_key), ("region", server.region)):
        dvc(repo, "remote", "modify", "--local", "s3", key, value)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny world reproduced once by `dvc repro`, every step recording the keys it read and the
    modules it imported."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    copy_checkout(repo)
    write_tiny_params(repo)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny world")
    reads = repo.parent / "reads.jsonl"
    first = run([str(BIN / "dvc"), "repro"], repo, clean_env(**{RECORD_READS: str(reads)}))
    return SimpleNamespace(repo=repo, first=first, reads=[json.loads(line) for line in reads.read_text().splitlines()])


def undeclared(step: dict, stage: dict) -> list[str]:
    """What `step` (one recorded run) read or imported that its resolved `stage` (from dvc.lock) does not
    declare, and the sections it read that its `--help` does not list."""
    declared = set()
    for key, value in stage.get("params", {}).get("params.yaml", {}).items():
        declared |= {f"{key}.{k}" for k in value} if "." not in key else {key}
    declared |= set(re.findall(r"--set (\S+?)=", stage["cmd"]))
    keys = {k for k in step["keys"] if not k.startswith("paths.")}  # locations are the stage's deps and outs
    deps = [dep["path"].rstrip("/") for dep in stage["deps"]]
    modules = {m for m in step["modules"] if m not in NOT_DEPS
               and not any(m == dep or m.startswith(dep + "/") for dep in deps)}
    unlisted = {k.split(".")[0] for k in step["keys"]} - set(step["sections"])
    unused = UNUSED_READS.get(step["stage"], set())
    return ([f"reads {key}, not in its params" for key in sorted(keys - declared - RUNTIME - unused)]
            + [f"imports {module}, not in its deps" for module in sorted(modules)]
            + [f"reads section {name}, which its --help does not list" for name in sorted(unlisted)])


def test_each_stage_declares_what_its_step_reads(pipeline):
    stages = yaml.safe_load((pipeline.repo / "dvc.lock").read_text())["stages"]
    assert {step["stage"] for step in pipeline.reads} == set(STAGES), pipeline.first.explain()
    problems = [f"{step['stage']}: {problem}" for step in pipeline.reads
                for problem in undeclared(step, stages[step["stage"]])]
    assert problems == [], "dvc.yaml is behind the code:\n" + "\n".join(problems)

    # Not vacuous: the reads were recorded, and a stage that leaves them out is caught.
    sicot = next(step for step in pipeline.reads if step["stage"] == "train_sicot")
    behind = {"cmd": "python -m components.train_model", "params": {"params.yaml": {"train.lr": 0.1}},
              "deps": [{"path": "components/train_model.py"}, {"path": "sicot/train.py"}]}
    found = undeclared(sicot, behind)
    assert {"reads train.cotrain_rampup, not in its params", "reads train.mode, not in its params",
            "imports sicot/data/dataset.py, not in its deps"} <= set(found), found
    assert "reads train.lr, not in its params" not in found and "reads train.threads, not in its params" not in found


def test_repro_change_push_pull(pipeline, tmp_path, s3_server):
    repo, first = pipeline.repo, pipeline.first
    assert ran(first.output) == set(STAGES), first.explain()
    print(f"dvc repro, all stages: {first.seconds:.1f}s")
    assert json.loads((repo / "reports/comparison.json").read_text())
    again = dvc(repo, "repro")
    assert UP_TO_DATE in again.output and not ran(again.output), again.explain()

    # Only the co-trained model reads train.cotrain_weight.
    exp = dvc(repo, "exp", "run", "-S", "train.cotrain_weight=0.5")
    assert {"train_sicot", "evaluate@sicot"} <= ran(exp.output) <= {"train_sicot", "evaluate@sicot", "compare"}, \
        exp.explain()
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["cotrain_weight"] == 0.5

    metrics = dvc(repo, "metrics", "show", "--json")
    shown = json.dumps(json.loads(metrics.output[metrics.output.index("{"):]))
    for path in ("reports/baseline/metrics.json", "reports/sicot/metrics.json", "reports/comparison.json",
                 "reports/data_stats.json"):
        assert path in shown, metrics.explain()
    plots = dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots/index.html").is_file(), plots.explain()
    assert "history.json" in (tmp_path / "plots/index.html").read_text()

    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "co-training weight 0.5")
    bucket = s3_server.new_bucket("dvc")
    s3_remote(repo, s3_server, bucket)
    push = dvc(repo, "push")
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) > 0, push.explain()

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    s3_remote(clone, s3_server, bucket)
    dvc(clone, "pull")
    assert (clone / "models/sicot/model.pt").read_bytes() == (repo / "models/sicot/model.pt").read_bytes()
    status = dvc(clone, "status")
    assert UP_TO_DATE in status.output, status.explain()
    nothing = dvc(clone, "repro")
    assert UP_TO_DATE in nothing.output and not ran(nothing.output), nothing.explain()
