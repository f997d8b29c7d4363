"""Working directories and commands for the end-to-end workflow tests.

The tests run the real entry points (`python -m flows.pipeline`, `dvc repro`, a Prefect worker) in a
temporary working directory, so every output (data, models, reports, mlflow.db, index) lands there and
the checkout stays clean. The tiny world of tests/tiny_params.yaml trains in seconds.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny_params.yaml")
CODE = ("sicot", "components", "flows")
# Variables of the developer's shell that would point a run at their own servers or stores.
FOREIGN = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "SICOT_PARENT_RUN_ID",
           "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
           *(f"SICOT_{key}" for key in ("RAW", "PREPARED", "WORD2VEC", "PRETRAINED", "MODELS", "REPORTS", "INDEX",
                                        "DVC_REMOTE")))


def tiny_settings() -> dict[str, dict]:
    return yaml.safe_load(TINY.read_text(encoding="utf-8"))


def tiny_overrides() -> list[str]:
    """The tiny world as `section.key=value` strings (what `--set` and the flow's `overrides` take)."""
    return [f"{section}.{key}={value}" for section, values in tiny_settings().items() for key, value in values.items()]


def write_tiny_params(directory: Path, name: str = "params.yaml") -> Path:
    """The repository's params.yaml with the tiny world's values in place."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for section, values in tiny_settings().items():
        params[section].update(values)
    path = directory / name
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def copy_code(directory: Path) -> None:
    """The importable packages, for runs whose working directory is also their code's home."""
    for name in CODE:
        shutil.copytree(REPO / name, directory / name, ignore=shutil.ignore_patterns("__pycache__"))


def copy_checkout(directory: Path) -> None:
    """Tracked plus new, not ignored files of the working tree: what a commit of it would hold."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, directory / rel)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without foreign service pointers, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


@dataclass
class Result:
    cmd: list[str]
    returncode: int
    output: str
    seconds: float

    def explain(self, chars: int = 6000) -> str:
        return f"$ {' '.join(self.cmd)}  (exit {self.returncode}, {self.seconds:.0f}s)\n{self.output[-chars:]}"


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600, check: bool = True) -> Result:
    """Run `cmd`, stdout and stderr together; with `check`, a non-zero exit fails with the output."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    result = Result(cmd, proc.returncode, proc.stdout, time.perf_counter() - started)
    if check:
        assert proc.returncode == 0, result.explain()
    print(f"{' '.join(cmd[:4])}...: {result.seconds:.1f}s")
    return result


def git(directory: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=sicot-tests", "-c", "user.email=tests@sicot.invalid",
                    "-c", "init.defaultBranch=main", *args], cwd=directory, check=True, capture_output=True)
