"""Training as its own flow, so it can be deployed to a GPU work pool (one pod = one node, `train.nproc`
GPUs). Several nodes: one flow run per node (`nnodes`, `node_rank`, the rendezvous of node 0 in
`master_addr`/`master_port`), or one Kubernetes Indexed Job for all of them (flows/train_job.py).

The component runs in a child process — through `torchrun` when there is more than one process — because
it owns a process group and devices, in a fresh empty working directory: a node finds its data, word
vectors and checkpoints through `paths.*` (S3 on a cluster), never on a disk another step wrote.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import yaml
from prefect import flow, get_run_logger

from sicot.config import Params, load_params, local_params_file
from sicot.tracking import PARENT_ENV, tracking_uri


def launch(params: Params, mode: str, nnodes: int = 1, node_rank: int = 0, master_addr: str = "",
           master_port: int = 29500) -> dict:
    """Run the training component on exactly `params`, as node `node_rank` of `nnodes`. Relative local
    paths and the embedded MLflow store stay those of the caller's working directory."""
    params = dataclasses.replace(params, paths=params.paths.anchored(Path.cwd()))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    with tempfile.TemporaryDirectory(prefix=f"sicot-train-{mode}-") as workdir:
        params_file, outputs_file = Path(workdir, "params.yaml"), Path(workdir, "outputs.json")
        params_file.write_text(yaml.safe_dump(params.to_dict(), allow_unicode=True), encoding="utf-8")
        args = ["-m", "components.train_model", "--params", str(params_file), "--set", f"train.mode={mode}",
                "--outputs", str(outputs_file)]
        if nnodes > 1:
            args = ["-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
                    f"--master-addr={master_addr}", f"--master-port={master_port}",
                    f"--nproc-per-node={params.train.nproc}", *args]
        elif params.train.nproc > 1:
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={params.train.nproc}", *args]
        cmd = [sys.executable, *args]
        logger = get_run_logger()
        logger.info("running %s in %s", " ".join(cmd), workdir)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir, env=env)
        tail = forward_progress(proc.stderr, logger.info)
        if proc.wait() != 0:
            raise RuntimeError(f"train_model ({mode}) failed with exit code {proc.returncode}:\n" + "\n".join(tail))
        if not outputs_file.exists():  # only the node holding global rank 0 writes outputs
            return {"mode": mode, "node_rank": node_rank}
        outputs = json.loads(outputs_file.read_text())
        logger.info("train_model: %s, %s epochs, val top-1 %.3f -> %s", mode, outputs["epochs"], outputs["val_top1"],
                    outputs["model"])
        return outputs


def forward_progress(stream: IO[bytes], log: Callable[[str], None], keep: int = 60) -> list[str]:
    """Pass each line the training writes to `log` as it comes, a progress bar only as it was left at
    the end of its line (one per epoch: its refreshes are `\\r`-separated); returns the last `keep` lines,
    which explain a failure."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()
        if line:
            log(line)
            tail.append(line)
    return list(tail)


@flow(name="sicot-train")
def train(mode: str = "sicot", overrides: list[str] | None = None, params_file: str = "",
          parent_run_id: str = "", nnodes: int = 1, node_rank: int = 0, master_addr: str = "",
          master_port: int = 29500) -> dict:
    """Train one model (`baseline` or `sicot`) with `section.key=value` overrides; with `nnodes` > 1, be
    node `node_rank` of a multi-node run whose node 0 listens on `master_addr:master_port`.

    parent_run_id: the pipeline's MLflow run, so this training is logged as its child.
    """
    if parent_run_id:
        os.environ[PARENT_ENV] = parent_run_id
    elif "MLFLOW_TRACKING_URI" not in os.environ:
        from sicot.tracking import setup

        setup()  # the embedded store's experiment keeps its artifacts here, not in the node's directory
    params = load_params(params_file or local_params_file(), list(overrides or []))
    return launch(params, mode, nnodes, node_rank, master_addr, master_port)
