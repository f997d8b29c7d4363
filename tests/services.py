"""Real local services for the workflow tests: a Prefect server, an MLflow tracking server, and plain
background processes (a Prefect worker), each on a free loopback port.

Every service runs in its own process group, so stopping it also stops the children it spawned
(uvicorn workers, flow-run subprocesses). Its output goes to a log file whose tail is shown when it
fails to start and can be added to any assertion message (`tails`).
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


class ServiceError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)  # what a client needs to reach it
    artifacts: str = ""  # where an MLflow server stores artifacts

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None


def tails(*services: Service, chars: int = 3000) -> str:
    """The last lines of each service's log, for an assertion message."""
    return "".join(f"\n--- {s.name} log ({s.log}) ---\n{s.log_tail(chars)}" for s in services)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free loopback ports, for a program that binds them later and in
    turn (torchrun's node 0: one port per training, the next ones on a retry). They lie below the kernel's
    ephemeral range, which any outgoing connection may take a port from meanwhile."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        first = rng.randrange(10_000, ephemeral_low - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports below {ephemeral_low}")


def start_process(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                  cwd: str | Path | None = None, unset: tuple[str, ...] = ()) -> Service:
    """Start `cmd` in a new process group, output appended to `log`; `unset` names variables of this
    process's environment the service must not inherit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in unset} | (env or {})
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=environ, cwd=cwd, start_new_session=True)
    return Service(name, proc, log)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(service: Service, health_url: str, timeout: float) -> Service:
    """Poll `health_url` until it answers 200; stop the service and raise with its log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise ServiceError(f"{service.name} exited with code {service.proc.returncode} while starting:"
                               + tails(service))
        if _healthy(health_url):
            return service
        time.sleep(0.5)
    stop(service)
    raise ServiceError(f"{service.name} not healthy at {health_url} after {timeout:.0f}s:" + tails(service))


def stop(service: Service, grace: float = 5.0) -> None:
    """SIGTERM to the whole process group, then SIGKILL whatever is left after `grace` seconds."""
    if service.alive():
        _signal_group(service.proc, signal.SIGTERM)
        try:
            service.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Children may outlive a leader that exited on SIGTERM.
    _signal_group(service.proc, signal.SIGKILL)
    service.proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """A private Prefect profile directory; `api_url` points clients at a server."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_COLOR": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect_server(home: Path, timeout: float = 180.0) -> Service:
    """`prefect server start` on 127.0.0.1 with its database under `home` and its UI at the root URL;
    `.env` holds what clients need."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    ui = {"PREFECT_SERVER_UI_ENABLED": "true", "PREFECT_UI_API_URL": url}  # the UI's calls go to this port
    service = start_process("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                               "--port", str(port), "--analytics-off"],
                            home / "server.log", prefect_env(home) | ui, unset=("PREFECT_API_URL",))
    service.url = url
    service.env = prefect_env(home, service.url)
    return wait_healthy(service, service.url + "/health", timeout)


def start_mlflow_server(root: Path, artifacts_destination: str | None = None, env: dict[str, str] | None = None,
                        timeout: float = 240.0) -> Service:
    """`mlflow server` with a SQLite store under `root`, one worker, proxied artifacts.

    `artifacts_destination` (e.g. `s3://bucket/mlartifacts`) is where the server stores artifacts; its
    credentials go in `env` (the server's environment only: clients upload through the server).
    """
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    destination = artifacts_destination or (root / "artifacts").as_uri()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", destination]
    service = start_process("mlflow-server", cmd, root / "server.log", env, unset=("MLFLOW_TRACKING_URI",))
    service.url = f"http://127.0.0.1:{port}"
    service.env = {"MLFLOW_TRACKING_URI": service.url}
    service.artifacts = destination
    return wait_healthy(service, service.url + "/health", timeout)
