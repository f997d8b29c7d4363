"""The sicot pipeline as a Prefect flow: {prepare → word2vec ∥ pretrain} → {train baseline ∥ train sicot}
→ evaluate → promote → publish. Wiring only: every task calls a component.

Run it with no server (Prefect's ephemeral mode): `python -m flows.pipeline [--set section.key=value]`.

- Caching: data and training steps are keyed on their inputs (the resolved params, the working
  directory and their upstream outputs) plus the task's source, with results persisted, so re-running
  with unchanged inputs skips finished steps. Pass `refresh=True` to recompute everything (for example
  after deleting outputs by hand). Promotion and publishing have side effects and are never cached.
- Training runs in a child process (see flows/train.py), or in its own GPU pod through the
  `train_deployment` parameter.
- Every future is resolved and every state checked, so any failed step fails the flow with its error.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.futures import wait

from components import evaluate_model, prepare_data, pretrain_visual, promote_model, train_word2vec, version_data
from flows import form
from flows.publish import publish as publish_flow
from flows.retries import io_retries
from flows.train import launch
from sicot import storage
from sicot.config import PRETRAINED, ConfigError, Params, load_params, local_params_file
from sicot.tracking import PARENT_ENV

CACHED = {"cache_policy": INPUTS + TASK_SOURCE, "persist_result": True}
IO_RETRIES = io_retries(2, 5)


@task(name="prepare_data", **CACHED, **IO_RETRIES)
def prepare_task(settings: dict, workdir: str) -> dict:
    """The prepared data as a DVC version: later steps, on any machine, read exactly that version."""
    params = Params.from_dict(settings)
    return prepare_data.run(params) | {"version": version_data.run(params, params.paths.prepared)}


@task(name="train_word2vec", **CACHED)
def word2vec_task(settings: dict, workdir: str, data: dict) -> dict:
    params = Params.from_dict(settings)
    return train_word2vec.run(params) | {"version": version_data.run(params, params.paths.word2vec)}


@task(name="pretrain_visual", cache_policy=(INPUTS - "settings") + TASK_SOURCE, persist_result=True)
def pretrain_task(settings: dict, workdir: str, recipe: dict) -> dict:
    """Keyed on `recipe`, what the pretrained stream depends on: tuning the models trained from it, or
    the demo world's size, does not pretrain again."""
    return pretrain_visual.run(Params.from_dict(settings))


def reading(settings: dict, **versions: dict) -> dict:
    """`settings` with `paths.<name>` pointing at the DVC version of that output."""
    return {**settings, "paths": {**settings["paths"], **{name: v["version"]["uri"] for name, v in versions.items()}}}


MODES = ("baseline", "sicot")
# The baseline is the title-free reference whatever train.classifier_rows says (as in dvc.yaml).
MODE_SETS = {"baseline": {"classifier_rows": "trained"}, "sicot": {}}


@task(name="train_model", task_run_name="train_{mode}", retries=1, **CACHED)
def train_task(settings: dict, workdir: str, mode: str, data: dict, vectors: dict | None, start: dict | None,
               deployment: str = "", overrides: list[str] | None = None, nodes: int = 1, master: str = "") -> dict:
    """Train `mode` here, or as `nodes` flow runs of `deployment`, from the pretrain step's output `start`
    when `train.backbone_weights` names it; a retry (a lost pod) resumes from the last checkpoint in
    `paths.models`."""
    from prefect.runtime import task_run

    resume = task_run.run_count > 1
    if not deployment:
        params = Params.from_dict({**settings, "train": settings["train"] | MODE_SETS[mode]})
        params.train.resume = params.train.resume or resume
        return launch(params, mode)
    from prefect.deployments import run_deployment

    # The pod reads its image's params.yaml; the run's overrides travel as parameters.
    sets = [f"train.{key}={value}" for key, value in MODE_SETS[mode].items()]
    parameters = {"mode": mode, "overrides": [*(overrides or []), *sets, *(["train.resume=true"] if resume else [])],
                  "parent_run_id": os.environ.get(PARENT_ENV, "")}
    per_node = [{}]
    if nodes > 1 and not master:  # a deployment that starts every node itself (sicot-train-job: an Indexed Job)
        parameters["nnodes"] = nodes
    elif nodes > 1:  # a flow run per node; node 0 of each training listens on its own port: both run at once
        host, _, port = master.rpartition(":")
        port = int(port) + MODES.index(mode) + 2 * (task_run.run_count - 1)  # a retry: fresh ports
        parameters |= {"nnodes": nodes, "master_addr": host, "master_port": port}
        per_node = [{"node_rank": k} for k in range(nodes)]
    started = [run_deployment(deployment, parameters=parameters | node, timeout=0) for node in per_node]
    runs = wait_together([run.id for run in started])
    failed = [f"flow run {run.id} ended {run.state.name}: {run.state.message}" for run in runs
              if not run.state.is_completed()]
    if failed:
        raise RuntimeError(f"train_{mode} ({deployment}): " + "; ".join(failed))
    return runs[0].state.result()


def wait_together(ids: list, poll_s: float = 5.0) -> list:
    """The final flow runs of nodes that only work together: once one fails, the others are cancelled
    (they would otherwise wait for it in a collective until a timeout)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            if all(run.state.is_final() for run in runs):
                return runs
            if any(run.state.is_final() and not run.state.is_completed() for run in runs):
                for run in runs:
                    if not run.state.is_final():
                        client.set_flow_run_state(run.id, Cancelling(message="another node of this training failed"))
            time.sleep(poll_s)


@task(name="evaluate_model", **CACHED)
def evaluate_task(settings: dict, workdir: str, models: list[dict]) -> dict:
    return evaluate_model.run(Params.from_dict(settings))


@task(name="promote_model", **IO_RETRIES)
def promote_task(settings: dict, evaluation: dict) -> dict:
    return promote_model.run(Params.from_dict(settings))


@flow(name="sicot-pipeline", log_prints=True)
def pipeline(data: form.Data = form.Data.EMPTY, word2vec: form.Word2Vec = form.Word2Vec.EMPTY,
             pretrain: form.Pretrain = form.Pretrain.EMPTY, train: form.Train = form.Train.EMPTY,
             evaluate: form.Evaluate = form.Evaluate.EMPTY, promote: form.Promote = form.Promote.EMPTY,
             publish: form.Publish = form.Publish.EMPTY,
             paths: form.Paths = form.Paths.EMPTY, overrides: tuple[str, ...] = (), params_file: str = "",
             promote_and_publish: bool = True, refresh: bool = False, train_deployment: str = "",
             train_nodes: int = 1, train_master: str = "", shard_deployment: str = "") -> dict:
    """Train the visual-only baseline and the co-trained model on the same data and compare them.

    Args:
        data: data preparation (params.yaml `data:`). An empty field keeps the params file's value.
        word2vec: word vectors of the titles (params.yaml `word2vec:`).
        pretrain: the visual stream's pretraining on other products, for `train.backbone_weights:
            pretrained` (params.yaml `pretrain:`).
        train: training of both models (params.yaml `train:`).
        evaluate: evaluation on the test split (params.yaml `evaluate:`).
        promote: the registry's promotion gate (params.yaml `promote:`).
        publish: the product index (params.yaml `publish:`).
        paths: locations, folders or s3:// URIs (params.yaml `paths:`). An empty field keeps SICOT_<KEY>
            when set.
        overrides: `section.key=value` strings, exactly as `--set` takes them (e.g. `train.epochs=4`);
            they win over the sections above.
        params_file: a params file; empty = ./params.yaml when there is one, else the built-in defaults.
        promote_and_publish: after evaluation, gate the co-trained model into the registry and publish
            the product index.
        refresh: recompute every step, ignoring cached results.
        train_deployment: e.g. `sicot-train/k8s-gpu` to train each model in its own GPU pod.
        train_nodes: nodes per training (torchrun `--nnodes`). With `train_master`, each node is a flow
            run of `train_deployment`; without, `train_deployment` starts them all
            (`sicot-train-job/k8s`: an Indexed Job).
        train_master: `host:port` where node 0 of the baseline listens (the co-trained model's uses
            port + 1).
        shard_deployment: e.g. `sicot-publish-shard/k8s-gpu` to build each index shard in its own GPU pod.
    """
    from sicot import tracking

    sections = (data, word2vec, pretrain, train, evaluate, promote, publish, paths)
    overrides = [*(o for section in sections for o in section.overrides()), *overrides]
    workdir = str(Path.cwd())
    params = load_params(params_file or local_params_file(), overrides)
    settings = params.to_dict()  # the resolved params: what the cache keys on
    opts = {"refresh_cache": True} if refresh else {}
    with tracking.pipeline_run(params) as parent_run:
        pretrained = settings["train"]["backbone_weights"] == PRETRAINED
        start = (pretrain_task.with_options(**opts).submit(settings, workdir, pretrain_visual.recipe(params))
                 if pretrained else None)
        prepared = prepare_task.with_options(**opts)(settings, workdir)
        vectors = word2vec_task.with_options(**opts)(reading(settings, prepared=prepared), workdir, prepared)
        settings = reading(settings, prepared=prepared, word2vec=vectors)
        located = [*overrides,
                   *(f"paths.{k}={v}" for k, v in settings["paths"].items() if k in ("prepared", "word2vec"))]
        runs = [train_task.with_options(**opts).submit(settings, workdir, mode, prepared,
                                                       vectors if mode == "sicot" else None, start and start.result(),
                                                       train_deployment, located, train_nodes, train_master)
                for mode in MODES]
        wait(runs)
        failed = [f"train_{mode}: {run.state.message}" for mode, run in zip(MODES, runs)
                  if not run.state.is_completed()]
        if failed:
            raise RuntimeError("training failed: " + "; ".join(failed))
        report = evaluate_task.with_options(**opts)(settings, workdir, [run.result() for run in runs])
        outputs = {"mlflow_run": parent_run, "evaluation": report}
        if promote_and_publish:
            outputs["promotion"] = promote_task(settings, report)
            outputs["index"] = publish_flow(located, params_file, shard_deployment)
    table = storage.join(params.paths.reports, "comparison.md")
    markdown = storage.read_text(table) if storage.exists(table) else "(no comparison: one model trained)"
    create_markdown_artifact(markdown + "\n\n" + _links(parent_run), key="sicot-comparison",
                             description="Baseline vs co-training, overall / head / tail")
    _summarise(parent_run, params, markdown)
    print(markdown)
    return outputs


def _summarise(parent_run: str, params: Params, markdown: str) -> None:
    """The comparison and SICoT's word-attention view on the parent run as well: the run a Prefect
    artifact links to shows the outcome without a search through its children."""
    from sicot import tracking

    texts = {"comparison.md": markdown}
    attention = storage.join(params.paths.reports, "sicot", "attention.html")
    if storage.exists(attention):
        texts["attention.html"] = storage.read_text(attention)
    tracking.log_texts_to_run(parent_run, texts)


def _links(parent_run: str) -> str:
    from sicot import tracking

    uri, page = tracking.redacted(tracking.tracking_uri()), tracking.run_page(parent_run)
    if page:
        return f"MLflow run: [{parent_run}]({page})"
    return f"MLflow run `{parent_run}` in `{uri}`: open it with `mlflow ui --backend-store-uri {uri}`."


def main(argv: list[str] | None = None) -> None:
    from components.cli import parser

    p = parser("Run the whole sicot pipeline (ephemeral Prefect, embedded MLflow by default).", form.SECTIONS)
    p.add_argument("--no-promote", action="store_true", help="stop after evaluation")
    p.add_argument("--refresh", action="store_true", help="ignore cached step results")
    args = p.parse_args(argv)
    try:  # a bad key or value is the user's error: one line here, not a failed flow run
        load_params(args.params or local_params_file(), args.overrides)
    except ConfigError as exc:
        p.error(str(exc))
    outputs = pipeline(overrides=args.overrides, params_file=args.params or "",
                       promote_and_publish=not args.no_promote, refresh=args.refresh)
    if args.outputs:
        Path(args.outputs).write_text(json.dumps(outputs, indent=2, default=str) + "\n", encoding="utf-8")
    from sicot import tracking

    print("\nBrowse the runs:  .venv/bin/mlflow ui --backend-store-uri " + tracking.redacted(tracking.tracking_uri()))
    print("Browse the flows: .venv/bin/prefect server start  (then open http://127.0.0.1:4200)")


if __name__ == "__main__":
    main()
