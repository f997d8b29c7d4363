"""Training as its own flow, so it can be deployed to a GPU work pool (one pod, `train.nproc` GPUs).

The component runs in a child process — through `torchrun` when `train.nproc` > 1 — because it owns
a process group and devices; its JSON outputs (last thing it prints) become the flow's result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import yaml
from prefect import flow, get_run_logger

from sicot.config import Params, load_params


def launch(params: Params, mode: str, workdir: str | None = None) -> dict:
    """Run the training component on exactly `params` (written to a temporary params file)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(params.to_dict(), fh, allow_unicode=True)
    try:
        return _run(fh.name, params.train.nproc, mode, workdir)
    finally:
        os.unlink(fh.name)


def _run(params_file: str, nproc: int, mode: str, workdir: str | None) -> dict:
    args = ["-m", "components.train_model", "--params", params_file, "--set", f"train.mode={mode}"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args[1:]]
    cmd = [sys.executable, *args]
    get_run_logger().info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"train_model ({mode}) failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
    start = proc.stdout.rfind("\n{")
    return json.loads(proc.stdout[start + 1:] if start >= 0 else proc.stdout)


@flow(name="sicot-train")
def train(mode: str = "sicot", overrides: list[str] | None = None, params_file: str = "params.yaml") -> dict:
    """Train one model (`baseline` or `sicot`) with the given `section.key=value` overrides."""
    return launch(load_params(params_file, list(overrides or [])), mode)
