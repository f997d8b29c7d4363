"""Every MLflow call of the steps: one parent run per pipeline run, a child run per step, and registry aliases.
The recognition service's own pyfunc code (`sicot.serving`, `sicot.serving_app`) talks to MLflow's model
flavour and scoring server directly: that is the flavour's API, not tracking.

Embedded default: `sqlite:///mlflow.db` in the working directory with artifacts in `mlartifacts/`, so a
newcomer needs no server; `MLFLOW_TRACKING_URI` points everything at a real server instead. A step
finds its parent through `SICOT_PARENT_RUN_ID`, which works across processes (DVC stages, pods).
mlflow is imported inside functions: it costs seconds of import time that most CLIs never need.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from sicot import storage
from sicot.config import Params

EXPERIMENT = "sicot"
PARENT_ENV = "SICOT_PARENT_RUN_ID"
SECRET_PARAM = re.compile(r"token|key|secret|pass|pwd|sig|credential|auth|session", re.IGNORECASE)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def redacted(uri: str) -> str:
    """`uri` fit to print or store: a userinfo password and the values of secret-looking query
    parameters become `***`. A userinfo without a password is hidden whole: that is how tokens travel
    (`https://TOKEN@host`)."""
    from urllib.parse import unquote

    head, question, rest = uri.partition("?")
    query, hash_, fragment = rest.partition("#")
    scheme, slashes, tail = head.partition("://")
    if slashes:
        authority, slash, path = tail.partition("/")
        if "@" in authority:
            userinfo, _, host = authority.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            authority = f"{user}:***@{host}" if colon else f"***@{host}"
        head = f"{scheme}://{authority}{slash}{path}"
    pairs = [p.partition("=") for p in query.split("&")] if question else []
    query = "&".join(f"{k}{eq}***" if eq and SECRET_PARAM.search(unquote(k)) else f"{k}{eq}{v}" for k, eq, v in pairs)
    return head + question + query + hash_ + fragment


def setup():
    """Point mlflow at the configured store and select (or create) the `sicot` experiment."""
    import mlflow

    uri = tracking_uri()
    # A step's model downloads are its internals: their progress bars would flood the step's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if redacted(uri) != uri:  # mlflow prints "View run at <tracking URI>/..." as given, secrets and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # A local store keeps artifacts beside the database; a server decides its own artifact root.
        location = Path("mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def data_version(prepared: str) -> str:
    """DVC's version (`<md5>.dir`) of the prepared data: from its tree URI when steps read a DVC version in
    place (the pipeline), or from dvc.lock when `dvc repro` produced it. Data DVC never saw is named by a
    content hash of its record files instead, marked `unversioned-`."""
    if tree := storage.dvc_tree(prepared):
        return tree[0].rsplit("/", 2)[-2] + tree[0].rsplit("/", 1)[-1]
    if Path("dvc.lock").is_file() and not storage.is_s3(prepared):
        import yaml

        lock = yaml.safe_load(Path("dvc.lock").read_text(encoding="utf-8")) or {}
        wanted = Path(prepared).resolve()
        for stage in (lock.get("stages") or {}).values():
            for out in stage.get("outs", []):
                if Path(out.get("path", "")).resolve() == wanted and out.get("md5"):
                    return out["md5"]
    digest = hashlib.md5()
    for name in ("labels.json", "train.jsonl", "val.jsonl", "test.jsonl", "catalog.jsonl"):
        uri = storage.join(prepared, name)
        if storage.exists(uri):
            digest.update(name.encode() + b"\0" + storage.read_bytes(uri))
    return "unversioned-" + digest.hexdigest()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def pipeline_run(params: Params, name: str = "sicot-pipeline") -> Iterator[str]:
    """The parent run of one pipeline execution; steps started inside it become its children.

    The parent is created through the client rather than `start_run`, so it never sits on a thread's
    active-run stack where it would collide with the steps' own runs.
    """
    mlflow = setup()
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    run = client.create_run(experiment, run_name=name, tags={"git_commit": git_commit()})
    run_id = run.info.run_id
    flat = params.flat("data", "word2vec", "train", "evaluate", "promote")
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in flat.items()])
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


@contextlib.contextmanager
def step_run(step: str, params: Params, sections: tuple[str, ...] = (), reads_data: bool = True) -> Iterator[object]:
    """An MLflow run for one step: params of its sections logged once, tagged with commit and the version
    of the data it reads (`reads_data=False` for the step that makes the data: it has no version yet).

    Nested under the pipeline's parent run when one is active (`SICOT_PARENT_RUN_ID`).
    """
    mlflow = setup()
    tags = {"step": step, "git_commit": git_commit()}
    if reads_data:
        tags["data_version"] = data_version(params.paths.prepared)
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=step, tags=tags) as run:
        mlflow.log_params(params.flat(*sections) if sections else params.flat())
        yield run


def log_file(uri: str, artifact_path: str | None = None) -> None:
    """`mlflow.log_artifact` for a local path or an s3:// object (fetched to a temporary file first)."""
    import tempfile

    import mlflow

    if not storage.is_s3(uri) and not storage.is_dvc_tree(uri):
        mlflow.log_artifact(uri, artifact_path)
        return
    with tempfile.TemporaryDirectory(prefix="sicot-artifact-") as tmp:
        local = Path(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
        local.write_bytes(storage.read_bytes(uri))
        mlflow.log_artifact(str(local), artifact_path)


def log_texts_to_run(run_id: str, texts: Mapping[str, str]) -> None:
    """Text artifacts (`{"comparison.md": "..."}`) on a run that need not be the active one."""
    client = setup().MlflowClient()
    for artifact_file, text in texts.items():
        client.log_text(run_id, text, artifact_file)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Numbers of the active run (a step's)."""
    import mlflow

    mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)


def log_dict(data: dict, artifact_file: str) -> None:
    """`data` as a JSON artifact of the active run."""
    import mlflow

    mlflow.log_dict(data, artifact_file)


def set_tags(tags: Mapping[str, object]) -> None:
    """Tags of the active run."""
    import mlflow

    mlflow.set_tags({name: str(value) for name, value in tags.items()})


def run_page(run_id: str) -> str | None:
    """The run's page in the tracking server's UI; None for a store without one (the embedded SQLite)."""
    uri = redacted(tracking_uri())
    if not uri.startswith("http"):
        return None
    experiment = setup().get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


MODEL_ARTIFACTS = "model"  # where training logs model.pt (and text_encoder.pt) in its run
MODE_TAG = "sicot.mode"  # a training run's train.mode: how later steps find the model of each mode


@contextlib.contextmanager
def training_run(params: Params) -> Iterator[object]:
    """The MLflow run of one training, `train_<mode>`, tagged with its mode."""
    with step_run("train_" + params.train.mode, params, sections=("data", "word2vec", "train")) as run:
        set_tags({MODE_TAG: params.train.mode})
        yield run


def log_trained_model(files: list[str]) -> str:
    """A training's output files (model.pt, text_encoder.pt, history.json) as artifacts of the active run
    under MODEL_ARTIFACTS; returns model.pt's artifact path."""
    for uri in files:
        log_file(uri, MODEL_ARTIFACTS)
    return f"{MODEL_ARTIFACTS}/model.pt"


def trained_models(params: Params) -> dict[str, str]:
    """{mode: directory holding its model.pt} of the trained models a step should use.

    Inside a pipeline run (`SICOT_PARENT_RUN_ID`) the models travel through MLflow: the artifacts of the
    run's newest finished `train_<mode>` children, downloaded, wherever those trainings ran. Otherwise
    (a DVC stage, a step run by hand) they are the directories under `paths.models`."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        root = params.paths.models
        return {name: storage.join(root, name) for name in storage.list_children(root)
                if storage.exists(storage.join(root, name, "model.pt"))}
    mlflow = setup()
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    found = {}
    for run in runs:
        mode = run.data.tags.get(MODE_TAG)
        if mode and mode not in found:
            found[mode] = _downloaded(run.info.run_id)
    return found


@functools.cache
def _downloaded(run_id: str) -> str:
    """A training run's model files in a local directory (once per process)."""
    import tempfile

    from mlflow.artifacts import download_artifacts

    target = tempfile.mkdtemp(prefix=f"sicot-model-{run_id[:8]}-")
    return download_artifacts(run_id=run_id, artifact_path=MODEL_ARTIFACTS, dst_path=target)


def promotion_decision(candidate: dict, champion: dict | None, max_tail_drop: float) -> tuple[bool, str]:
    """The registry gate: the first model becomes champion; later ones only if, on the same test set,
    overall top-1 is at least the champion's and tail top-1 drops by no more than `max_tail_drop`."""
    if champion is None:
        return True, "first model: no champion yet"
    top1, champ_top1 = candidate["top1"], champion["top1"]
    drop = champion["tail"]["top1"] - candidate["tail"]["top1"]
    if top1 < champ_top1:
        return False, f"top-1 {top1:.4f} below champion's {champ_top1:.4f}"
    if drop > max_tail_drop:
        return False, f"tail top-1 drops {drop:.4f} > allowed {max_tail_drop:.4f}"
    return True, f"top-1 {top1:.4f} >= champion's {champ_top1:.4f}; tail top-1 change {-drop:+.4f}"


def alias_version(name: str, alias: str):
    """The registered model version behind `alias`, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return setup().MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    setup().MlflowClient().set_registered_model_alias(name, alias, version)


def tag_version(name: str, version: str, tags: Mapping[str, object]) -> None:
    client = setup().MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def registered_model_dir(name: str, version: str, dst: str | None = None) -> Path:
    """The files of version `version` of registered model `name`, downloaded (into `dst` when given)."""
    from mlflow.artifacts import download_artifacts

    setup()
    return Path(download_artifacts(f"models:/{name}/{version}", dst_path=dst))


def download_model_file(model_uri: str, dst: str) -> Path:
    """The model.pt of an MLflow model URI (`models:/<name>@<alias>`, `models:/<name>/<version>`,
    `runs:/<run_id>/<path>`: a registered model or a training run's `model/`), downloaded into `dst`."""
    from mlflow.artifacts import download_artifacts

    setup()
    local = Path(download_artifacts(artifact_uri=model_uri, dst_path=dst))
    found = local if local.name == "model.pt" else next(local.rglob("model.pt"), None)
    if found is None:
        raise FileNotFoundError(f"{model_uri}: holds no model.pt")
    return found
