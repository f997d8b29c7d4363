"""Index publishing as a DAG: one task per catalog shard (`.map`), then a merge task that writes the
manifest and switches `index/CURRENT`.

Locally the shards are tasks in this flow. With `shard_deployment` set (e.g.
`sicot-publish-shard/k8s-gpu`), each shard runs as its own flow run of that deployment, which on the
kubernetes work pool is its own GPU pod; the merge still happens here, after every shard succeeded.
"""
from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.futures import wait

from components import publish_index
from flows.retries import io_retries
from sicot.config import load_params, local_params_file

IO_RETRIES = io_retries(2, 10)


@task(name="build_index_shard", task_run_name="shard_{shard}", **IO_RETRIES)
def build_shard(params_file: str, overrides: list[str], shard: int, shard_deployment: str = "") -> dict:
    shard_overrides = [*overrides, f"publish.shard={shard}"]
    if not shard_deployment:
        return publish_index.run(load_params(params_file or local_params_file(), shard_overrides))
    from prefect.deployments import run_deployment

    run = run_deployment(shard_deployment, parameters={"overrides": shard_overrides, "params_file": params_file})
    if not run.state.is_completed():
        raise RuntimeError(f"shard {shard} ({shard_deployment}, flow run {run.id}) ended {run.state.name}: "
                           f"{run.state.message}")
    return {"shard": shard, "flow_run": str(run.id)}


@task(name="publish_index_version", **IO_RETRIES)
def merge(params_file: str, overrides: list[str]) -> dict:
    return publish_index.run(load_params(params_file or local_params_file(), overrides), merge=True)


@flow(name="sicot-publish")
def publish(overrides: list[str] | None = None, params_file: str = "", shard_deployment: str = "") -> dict:
    """Build every shard of the champion's product index, then publish it atomically.

    params_file: a params file; empty = ./params.yaml when there is one, else the built-in defaults.
    """
    overrides = list(overrides or [])
    params = load_params(params_file or local_params_file(), overrides)
    if not params.publish.model_version:  # every shard embeds with the same model version
        overrides.append(f"publish.model_version={publish_index.champion_version(params.promote.model_name)}")
    shards = params.publish.shards
    futures = build_shard.map(params_file, unmapped(overrides), range(shards), unmapped(shard_deployment))
    wait(futures)
    failed = [f"shard {k}: {f.state.message}" for k, f in enumerate(futures) if not f.state.is_completed()]
    if failed:
        raise RuntimeError("index shards failed, CURRENT left unchanged: " + "; ".join(failed))
    return merge(params_file, overrides)


@flow(name="sicot-publish-shard")
def publish_shard(overrides: list[str], params_file: str = "") -> dict:
    """One shard (`publish.shard` in overrides): the unit a GPU pod runs."""
    return publish_index.run(load_params(params_file or local_params_file(), overrides))
