"""Multi-node training on Kubernetes from Prefect: one Indexed Job (infra/k8s/train-job.yaml) whose pods
are the nodes, created with prefect-kubernetes and followed to the end.

The manifest in infra/k8s is the template: this flow names the Job after the flow run (so runs never
collide), sets the node count, GPUs per node, the model, the overrides and the pipeline's MLflow run, and
creates the headless Service that gives node 0 the DNS name the other nodes rendezvous at.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml
from prefect import flow, get_run_logger

MANIFEST = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "train-job.yaml"


def render(name: str, nnodes: int, gpus_per_node: int, mode: str, overrides: list[str], parent_run_id: str,
           image: str = "", manifest: Path = MANIFEST) -> tuple[dict, dict]:
    """(Service, Job) of the template with this run's parameters."""
    if nnodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nnodes ({nnodes}) and gpus_per_node ({gpus_per_node}) must be >= 1")
    service, job = (copy.deepcopy(doc) for doc in yaml.safe_load_all(manifest.read_text(encoding="utf-8")))
    service["metadata"]["name"] = name
    service["spec"]["selector"] = {"batch.kubernetes.io/job-name": name}
    job["metadata"]["name"] = name
    job["spec"]["completions"] = job["spec"]["parallelism"] = nnodes
    pod = job["spec"]["template"]["spec"]
    pod["subdomain"] = name
    container = pod["containers"][0]
    if image:
        container["image"] = image
    port = next(a for a in container["args"] if a.startswith("--master-port=")).split("=", 1)[1]
    sets = [f"train.mode={mode}", "train.device=cuda", f"train.nproc={gpus_per_node}", *overrides]
    container["args"] = [f"--nnodes={nnodes}", f"--nproc-per-node={gpus_per_node}",
                         "--node-rank=$(JOB_COMPLETION_INDEX)",
                         f"--master-addr={name}-0.{name}", f"--master-port={port}", "-m", "components.train_model",
                         *(arg for value in sets for arg in ("--set", value))]
    container["env"] = [e for e in container.get("env", []) if e["name"] != "SICOT_PARENT_RUN_ID"]
    if parent_run_id:
        container["env"].append({"name": "SICOT_PARENT_RUN_ID", "value": parent_run_id})
    container["resources"]["limits"]["nvidia.com/gpu"] = str(gpus_per_node)
    return service, job


@flow(name="sicot-train-job")
def train_job(mode: str = "sicot", overrides: list[str] | None = None, nnodes: int = 2, gpus_per_node: int = 4,
              parent_run_id: str = "", namespace: str = "sicot", image: str = "") -> dict:
    """Train one model on `nnodes` Kubernetes pods with `gpus_per_node` GPUs each (an Indexed Job).

    overrides: `section.key=value` strings (e.g. `train.epochs=4`, `train.resume=true`).
    parent_run_id: the pipeline's MLflow run, so the training is logged as its child.
    image: the training image; empty = the one in infra/k8s/train-job.yaml.
    """
    from prefect.runtime import flow_run
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_kubernetes.credentials import KubernetesCredentials
    from prefect_kubernetes.jobs import KubernetesJob
    from prefect_kubernetes.services import create_namespaced_service

    name = f"sicot-train-{mode}-{str(flow_run.id)[:8]}"
    service, job = render(name, nnodes, gpus_per_node, mode, list(overrides or []), parent_run_id, image)
    run_coro_as_sync(create_namespaced_service.fn(kubernetes_credentials=KubernetesCredentials(),
                                                  new_service=service, namespace=namespace))
    get_run_logger().info("Indexed Job %s/%s: %d nodes x %d GPUs", namespace, name, nnodes, gpus_per_node)
    run = KubernetesJob(v1_job=job, namespace=namespace).trigger()
    run.wait_for_completion()
    return {"mode": mode, "job": name, "namespace": namespace, "nodes": nnodes, "logs": run.fetch_result()}
