"""prefect.yaml's `demo` deployment on a real Prefect server: a process work pool, `prefect deploy`, a
worker, and a flow run started through the API with the tiny world as its `overrides` parameter."""
from __future__ import annotations

import json
import shutil

import pytest

from tests import services
from tests.workflow import BIN, REPO, clean_env, copy_code, run, tiny_overrides

pytestmark = [pytest.mark.services, pytest.mark.slow]

POOL = "sicot-process"  # the pool prefect.yaml's demo deployment names


def test_demo_deployment_runs_on_a_process_worker(tmp_path, prefect_server):
    home = tmp_path / "sicot"  # the checkout the worker runs in (SICOT_HOME)
    home.mkdir()
    copy_code(home)
    for name in ("params.yaml", "prefect.yaml"):
        shutil.copy(REPO / name, home / name)
    env = clean_env(**prefect_server.env, SICOT_HOME=str(home))
    prefect = str(BIN / "prefect")

    run([prefect, "work-pool", "create", POOL, "--type", "process"], home, env)
    deployed = run([prefect, "--no-prompt", "deploy", "--name", "demo"], home, env)
    assert "sicot-pipeline/demo" in deployed.output, deployed.explain()

    worker = services.start_process("prefect-worker", [prefect, "worker", "start", "--pool", POOL, "--limit", "1"],
                                    tmp_path / "worker.log", env, cwd=tmp_path)
    try:
        parameters = {"overrides": tiny_overrides()}
        started = run([prefect, "deployment", "run", "sicot-pipeline/demo", "--params", json.dumps(parameters),
                       "--watch", "--watch-timeout", "540"], home, env, check=False)
        print(f"deployment run (tiny world): {started.seconds:.1f}s")
        why = started.explain() + services.tails(worker, prefect_server)
        assert started.returncode == 0 and "Completed" in started.output, why
    finally:
        services.stop(worker)

    assert json.loads((home / "reports/data_stats.json").read_text())["classes"] == 12, why
    for model in ("baseline", "sicot"):
        assert json.loads((home / f"reports/{model}/metrics.json").read_text())["model"] == model
    assert (home / "reports/comparison.md").read_text().startswith("| test accuracy (%)")
    assert json.loads((home / "index_store/index/CURRENT").read_text())["version"].startswith("sicot-v1-")
