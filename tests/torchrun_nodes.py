"""`components.train_model` as N torchrun "nodes" on this machine, the way pods of a cluster run it.

Each node is its own torchrun agent with its own working directory and `params.yaml`; the nodes meet only
through a c10d rendezvous on loopback. Nothing else is shared, so whatever one node needs from another
(checkpoints, the trained model) must travel through the locations in the params: S3, MLflow.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Node:
    workdir: Path
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nodes: int, endpoint: str, run_id: str, nproc_per_node: int) -> list[str]:
    """One node's torchrun; c10d hands out ranks in order of arrival (it ignores --node-rank)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
            "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", run_id, "--local-addr", "127.0.0.1", "--max-restarts", "0"]


def train_on_nodes(params, workdirs: list[Path], *overrides: str, nproc_per_node: int = 1,
                   track: bool = False, env: dict[str, str] | None = None, timeout: float = 300) -> list[Node]:
    """Run `python -m components.train_model` with `params` (written to each node's ./params.yaml) and
    `--set overrides` (`--no-track` unless `track`), one torchrun node per working directory; returns each
    node's outcome (its output
    is also in `torchrun.out` / `torchrun.err` there). Nodes still running after `timeout` seconds are
    killed with their whole process group (returncode -9)."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:12]
    procs = []
    try:
        for workdir in workdirs:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), allow_unicode=True))
            command = [*torchrun_command(len(workdirs), endpoint, run_id, nproc_per_node),
                       "-m", "components.train_model", *([] if track else ["--no-track"]),
                       *(a for o in overrides for a in ("--set", o))]
            # Files, not pipes: a node blocked on a full pipe would stall the others in a collective.
            with open(workdir / "torchrun.out", "w") as out, open(workdir / "torchrun.err", "w") as err:
                procs.append(subprocess.Popen(command, cwd=workdir, env={**os.environ, **(env or {})},
                                              stdout=out, stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [Node(w, proc.returncode, (w / "torchrun.out").read_text(), (w / "torchrun.err").read_text())
            for proc, w in zip(procs, workdirs)]
