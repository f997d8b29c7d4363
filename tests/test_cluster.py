"""A cluster in miniature: every step a separate process in its own empty directory, sharing nothing but
an S3 server (SeaweedFS), an MLflow server whose artifacts are on S3 and a Prefect server with a worker.

The code is installed (as in the image); no flow run finds a file another one wrote on disk. The
pipeline deployment versions the data with DVC into the S3 remote, trains the baseline on one node and
the co-trained model as two torchrun "nodes" (two flow runs, each in its own directory, sharded
classifier) that are killed once after their first checkpoint and resume from S3, evaluates, promotes
and publishes the index as two shard runs. Then `mlflow models serve` of the champion answers a catalog
photo with its SKU and title, and a second publish is picked up by the running server without a restart.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import services
from tests.workflow import BIN, clean_env, run, tiny_overrides

pytestmark = [pytest.mark.services, pytest.mark.slow]

POOL = "cluster"
MODEL = "sicot-cluster"
DEPLOYMENTS = {  # module entrypoints: each flow run starts in a fresh temporary directory of the worker
    "sicot-pipeline": "flows.pipeline:pipeline",
    "sicot-train": "flows.train:train",
    "sicot-publish": "flows.publish:publish",
    "sicot-publish-shard": "flows.publish:publish_shard",
}


def deploy_file(directory: Path) -> Path:
    spec = {"name": "sicot-cluster", "prefect-version": "3", "build": None, "push": None, "pull": [],
            "deployments": [{"name": POOL, "entrypoint": entry, "work_pool": {"name": POOL}}
                            for entry in DEPLOYMENTS.values()]}
    path = directory / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def s3_keys(bucket: str, prefix: str) -> list[str]:
    from sicot import storage

    return storage.list_keys(f"{bucket}/{prefix}")


def kill_training_after_first_checkpoint(bucket: str, mode: str, pipeline: subprocess.Popen, deadline: float) -> bool:
    """SIGKILL the `mode` training's processes once its first checkpoint is on S3 (a lost node)."""
    from sicot import storage

    checkpoint = f"{bucket}/models/{mode}/checkpoint.pt"
    while time.monotonic() < deadline and pipeline.poll() is None:
        if storage.exists(checkpoint):
            pids = subprocess.run(["pgrep", "-f", f"components.train_model .*train.mode={mode}"],
                                  capture_output=True, text=True).stdout.split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            if pids:
                return True
        time.sleep(0.2)
    return False


def restore_with_dvc(directory: Path, remote: str, version: str, env: dict) -> Path:
    """What a user does to get a run's data back: a .dvc file naming the version, then `dvc pull`."""
    directory.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "init", "--no-scm", "-q"], directory, env)
    run([*dvc, "remote", "add", "-d", "s3", remote], directory, env)
    run([*dvc, "remote", "modify", "s3", "endpointurl", env["AWS_ENDPOINT_URL"]], directory, env)
    (directory / "prepared.dvc").write_text(f"outs:\n- md5: {version}\n  hash: md5\n  path: prepared\n")
    run([*dvc, "pull", "prepared.dvc"], directory, env)
    return directory / "prepared"


def serve(env: dict, directory: Path) -> services.Service:
    port = services.free_port()
    service = services.start_process("mlflow-serve", [str(BIN / "mlflow"), "models", "serve", "-m",
                                                      f"models:/{MODEL}@champion", "--env-manager", "local",
                                                      "-p", str(port), "--host", "127.0.0.1"],
                                     directory / "serve.log", env, cwd=directory)
    service.url = f"http://127.0.0.1:{port}"
    return services.wait_healthy(service, service.url + "/ping", 240)


def recognise(service: services.Service, image: bytes) -> dict:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}})
    request = urllib.request.Request(service.url + "/invocations", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"][0]


def test_the_pipeline_runs_on_a_cluster_in_miniature(tmp_path, s3_server, mlflow_server, prefect_server, monkeypatch):
    from sicot import index, storage

    bucket = f"s3://{s3_server.new_bucket('cluster')}"
    env = clean_env(**prefect_server.env, **mlflow_server.env, **s3_server.env, MLFLOW_REGISTRY_URI=mlflow_server.url,
                    SICOT_MODELS=f"{bucket}/models", SICOT_PRETRAINED=f"{bucket}/models/pretrained",
                    SICOT_REPORTS=f"{bucket}/reports",
                    SICOT_INDEX=f"{bucket}/index_store", SICOT_DVC_REMOTE=f"{bucket}/dvc",
                    PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
                    PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK="remote-file-system/sicot-results",
                    SICOT_SERVE_INDEX_REFRESH_S="1")
    for key, value in s3_server.env.items():  # this process reads S3 too, to watch and check
        monkeypatch.setenv(key, value)
    storage.s3.cache_clear()
    admin = tmp_path / "admin"  # where the operator deploys from: only a deployment file, no data
    admin.mkdir()
    prefect = str(BIN / "prefect")
    run([sys.executable, "-m", "flows.results", f"{bucket}/prefect-results"], admin, env)
    run([prefect, "work-pool", "create", POOL, "--type", "process"], admin, env)
    deployed = run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(deploy_file(admin))], admin, env)
    assert all(f"{name}/{POOL}" in deployed.output for name in DEPLOYMENTS), deployed.explain()
    worker = services.start_process("prefect-worker", [prefect, "worker", "start", "--pool", POOL, "--limit", "6"],
                                    tmp_path / "worker.log", env, cwd=tmp_path / "admin")
    try:
        # its own registered model: the MLflow server is shared with other tests
        overrides = [*tiny_overrides(), "train.epochs=3", "train.fc=sharded", "train.threads=1",
                     "train.backbone_weights=pretrained", f"promote.model_name={MODEL}"]
        parameters = {"overrides": overrides, "params_file": "", "train_deployment": f"sicot-train/{POOL}",
                      # node 0 of each training listens on its own port, a retry on the next two (flows.pipeline)
                      "train_nodes": 2, "train_master": f"127.0.0.1:{services.free_port_block(4)}",
                      "shard_deployment": f"sicot-publish-shard/{POOL}"}
        started = time.monotonic()
        log = tmp_path / "pipeline.log"
        with log.open("w") as out:  # a file, not a pipe: nobody reads while the run is watched
            pipeline = subprocess.Popen([prefect, "deployment", "run", f"sicot-pipeline/{POOL}", "--params",
                                         json.dumps(parameters), "--watch", "--watch-timeout", "900"],
                                        cwd=admin, env=env, stdout=out, stderr=subprocess.STDOUT)
            killed = kill_training_after_first_checkpoint(bucket, "sicot", pipeline, time.monotonic() + 600)
            pipeline.wait(timeout=900)
        output = log.read_text()
        why = output[-6000:] + services.tails(worker, prefect_server, chars=8000)
        assert killed, "the co-trained model never wrote a checkpoint to S3" + why
        assert pipeline.returncode == 0 and "Completed" in output, why
        print(f"cluster in miniature: pipeline {time.monotonic() - started:.0f}s")

        # nothing was written on a disk the steps share: the operator's directory holds only what it wrote
        assert sorted(p.name for p in admin.iterdir()) == ["prefect.yaml"]
        comparison = json.loads(storage.read_text(f"{bucket}/reports/comparison.json"))
        assert comparison
        assert [k for k in s3_keys(bucket, "dvc/files/md5") if k.endswith(".dir")], "no DVC version in the remote"
        assert s3_keys(bucket, "prefect-results"), "the trainings' results did not cross pods through S3"

        import mlflow

        client = mlflow.MlflowClient(mlflow_server.url, mlflow_server.url)
        runs = client.search_runs([client.get_experiment_by_name("sicot").experiment_id])
        parent = next(r for r in runs if r.info.run_name == "sicot-pipeline")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        by_step = {}
        for r in children:
            by_step.setdefault(r.data.tags["step"], []).append(r)
        assert {"prepare_data", "train_word2vec", "pretrain_visual", "train_baseline", "train_sicot", "evaluate_model",
                "promote_model"} <= set(by_step), sorted(by_step)
        # the pods trained from the visual stream the pipeline's pretrain step left on S3
        assert storage.exists(f"{bucket}/models/pretrained/backbone.pt")
        versions = {r.data.tags["data_version"] for r in children if "data_version" in r.data.tags}
        assert len(versions) == 1 and (version := versions.pop()).endswith(".dir")
        prepared = storage.dvc_tree_uri(f"{bucket}/dvc", version)  # the data every step read, in the DVC remote
        sicot_runs = {r.info.status for r in by_step["train_sicot"]}
        assert "FINISHED" in sicot_runs and len(by_step["train_sicot"]) >= 2, sicot_runs  # killed once, resumed
        champion = client.get_model_version_by_alias(MODEL, "champion")
        restored = restore_with_dvc(tmp_path / "restore", f"{bucket}/dvc", version, env)
        original = storage.read_bytes(storage.join(prepared, "train.jsonl"))
        assert restored.joinpath("train.jsonl").read_bytes() == original

        current = json.loads(storage.read_text(f"{bucket}/index_store/index/CURRENT"))
        manifest = json.loads(storage.read_text(f"{bucket}/index_store/index/{current['version']}/manifest.json"))
        assert manifest["num_shards"] == 2 and manifest["model_uri"] == f"models:/{MODEL}/{champion.version}"

        # serving: the champion from the registry, the index location from the environment
        served = tmp_path / "serve"
        served.mkdir()
        server = serve(env, served)
        try:
            loaded = index.load_current(f"{bucket}/index_store")
            product = next(row for row in loaded.skus if row["class_index"] >= 0)
            photo_uri = storage.join(prepared, product["image"])
            answer = recognise(server, storage.read_bytes(photo_uri))
            assert answer["status"] == "ok" and answer["index_version"] == current["version"], answer
            assert answer["matches"][0]["sku"] and answer["matches"][0]["title"] is not None, answer

            # a second publish (another shard count: another version) reaches the running server
            republished = run([prefect, "deployment", "run", f"sicot-publish/{POOL}", "--params",
                               json.dumps({"overrides": [*overrides, "publish.shards=1",
                                                         f"paths.prepared={prepared}"],
                                           "params_file": ""}), "--watch", "--watch-timeout", "600"],
                              admin, env, check=False)
            assert republished.returncode == 0, republished.explain()
            newer = json.loads(storage.read_text(f"{bucket}/index_store/index/CURRENT"))["version"]
            assert newer != current["version"]
            deadline = time.monotonic() + 30
            while (answer := recognise(server, storage.read_bytes(photo_uri)))["index_version"] != newer:
                assert time.monotonic() < deadline, f"the server still answers from {answer['index_version']}"
                time.sleep(1)
        finally:
            services.stop(server)

    finally:
        services.stop(worker)
