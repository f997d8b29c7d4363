"""The DVC pipeline in a throwaway git repository holding the working tree, on the tiny world:
repro, no-op repro, a params change that re-runs only what depends on it, metrics and plots, and a
push to S3 (SeaweedFS) from which a fresh clone pulls everything and has nothing left to run."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.workflow import BIN, clean_env, copy_checkout, git, run, write_tiny_params

pytestmark = [pytest.mark.services, pytest.mark.slow]

STAGES = ("prepare", "word2vec", "train_baseline", "train_sicot", "evaluate@baseline", "evaluate@sicot", "compare")
UP_TO_DATE = "Data and pipelines are up to date."


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


def test_repro_change_push_pull(tmp_path, s3_server):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_checkout(repo)
    write_tiny_params(repo)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny world")

    first = dvc(repo, "repro")
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
