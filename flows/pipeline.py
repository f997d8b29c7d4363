"""The sicot pipeline as a Prefect flow: prepare → word2vec → {train baseline ∥ train sicot} → evaluate
→ promote → publish. Wiring only: every task calls a component.

Run it with no server (Prefect's ephemeral mode): `python -m flows.pipeline [--set section.key=value]`.

- Caching: data and training steps are keyed on their inputs (the params, the working directory and
  their upstream outputs' fingerprints) plus the task's source, with results persisted, so re-running
  with unchanged inputs skips finished steps. Pass `refresh=True` to recompute everything (for example
  after deleting outputs by hand). Promotion and publishing have side effects and are never cached.
- Training runs the component's CLI in a child process (through `torchrun` when `train.nproc` > 1):
  it owns a process group and devices, exactly as it does in its own Kubernetes pod.
- Every future is resolved and every state checked, so any failed step fails the flow with its error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Prefect's temporary server can take more than its default 20 s to start on a small machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.futures import wait

from components import evaluate_model, prepare_data, promote_model, publish_index, train_word2vec
from sicot.config import load_params

CACHED = {"cache_policy": INPUTS + TASK_SOURCE, "persist_result": True}
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5}


def _params(params_file: str, overrides: list[str]):
    return load_params(params_file, overrides)


@task(name="prepare_data", **CACHED, **IO_RETRIES)
def prepare(params_file: str, overrides: list[str], workdir: str) -> dict:
    return prepare_data.run(_params(params_file, overrides))


@task(name="train_word2vec", **CACHED)
def word2vec(params_file: str, overrides: list[str], workdir: str, data: dict) -> dict:
    return train_word2vec.run(_params(params_file, overrides))


@task(name="train_model", task_run_name="train_{mode}", **CACHED)
def train(params_file: str, overrides: list[str], workdir: str, mode: str, data: dict, vectors: dict | None) -> dict:
    params = _params(params_file, overrides)
    step = ["-m", "components.train_model", "--params", params_file, *sum((["--set", o] for o in overrides), []),
            "--set", f"train.mode={mode}"]
    if params.train.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={params.train.nproc}", *step[1:]]
    else:
        cmd = [sys.executable, *step]
    logger = get_run_logger()
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"train_model ({mode}) failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
    return _last_json(proc.stdout)


@task(name="evaluate_model", **CACHED)
def evaluate(params_file: str, overrides: list[str], workdir: str, models: list[dict]) -> dict:
    return evaluate_model.run(_params(params_file, overrides))


@task(name="promote_model", **IO_RETRIES)
def promote(params_file: str, overrides: list[str], evaluation: dict) -> dict:
    return promote_model.run(_params(params_file, overrides))


@task(name="publish_index", **IO_RETRIES)
def publish(params_file: str, overrides: list[str], promotion: dict) -> dict:
    return publish_index.run(_params(params_file, overrides))


def _last_json(stdout: str) -> dict:
    """A component CLI prints its outputs as a JSON object last."""
    start = stdout.rfind("\n{")
    return json.loads(stdout[start + 1:] if start >= 0 else stdout)


@flow(name="sicot-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, params_file: str = "params.yaml",
             promote_and_publish: bool = True, refresh: bool = False) -> dict:
    """Train the visual-only baseline and the co-trained model on the same data and compare them.

    overrides: `section.key=value` strings, exactly as `--set` takes them (e.g. `train.epochs=4`).
    """
    from sicot import tracking

    overrides = list(overrides or [])
    workdir = str(Path.cwd())
    params = _params(params_file, overrides)
    opts = {"refresh_cache": True} if refresh else {}
    with tracking.pipeline_run(params) as parent_run:
        data = prepare.with_options(**opts)(params_file, overrides, workdir)
        vectors = word2vec.with_options(**opts)(params_file, overrides, workdir, data)
        runs = [train.with_options(**opts).submit(params_file, overrides, workdir, mode, data,
                                                  vectors if mode == "sicot" else None)
                for mode in ("baseline", "sicot")]
        wait(runs)
        failed = [f"train_{mode}: {run.state.message}" for mode, run in zip(("baseline", "sicot"), runs)
                  if not run.state.is_completed()]
        if failed:
            raise RuntimeError("training failed: " + "; ".join(failed))
        report = evaluate.with_options(**opts)(params_file, overrides, workdir, [run.result() for run in runs])
        outputs = {"mlflow_run": parent_run, "evaluation": report}
        if promote_and_publish:
            outputs["promotion"] = promote(params_file, overrides, report)
            outputs["index"] = publish(params_file, overrides, outputs["promotion"])
    table = Path(params.paths.reports, "comparison.md")
    markdown = table.read_text(encoding="utf-8") if table.exists() else "(no comparison: one model trained)"
    create_markdown_artifact(markdown + "\n\n" + _links(parent_run), key="sicot-comparison",
                             description="Baseline vs co-training, overall / head / tail")
    print(markdown)
    return outputs


def _links(parent_run: str) -> str:
    from sicot import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("http"):
        experiment = tracking.setup().get_run(parent_run).info.experiment_id
        return f"MLflow run: [{parent_run}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{parent_run})"
    return f"MLflow run `{parent_run}` in `{uri}`: open it with `mlflow ui --backend-store-uri {uri}`."


def main(argv: list[str] | None = None) -> None:
    from components.cli import parser

    p = parser("Run the whole sicot pipeline (ephemeral Prefect, embedded MLflow by default).")
    p.add_argument("--no-promote", action="store_true", help="stop after evaluation")
    p.add_argument("--refresh", action="store_true", help="ignore cached step results")
    args = p.parse_args(argv)
    pipeline(overrides=args.overrides, params_file=args.params, promote_and_publish=not args.no_promote,
             refresh=args.refresh)
    from sicot import tracking

    print("\nBrowse the runs:  .venv/bin/mlflow ui --backend-store-uri " + tracking.tracking_uri())
    print("Browse the flows: .venv/bin/prefect server start  (then open http://127.0.0.1:4200)")


if __name__ == "__main__":
    main()
