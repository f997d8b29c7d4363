"""Kubernetes manifests, the Prefect work-pool template and the images: what an API server, a worker or a
build would refuse, checked without any of them."""
import asyncio
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from sicot.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
TEMPLATE = REPO / "infra" / "prefect" / "kubernetes-gpu-job-template.json"
DOCKERFILES = [REPO / "infra" / "Dockerfile", REPO / "infra" / "Dockerfile.cuda"]
K8S_VERSION = "1.33.0"  # the cluster version the manifests target

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.I)
COMPONENTS = sorted(p.stem for p in (REPO / "components").glob("*.py") if p.stem not in ("__init__", "cli"))


def manifests() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def workloads() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in manifests() if d["kind"] in ("Job", "Deployment")]


def pod_spec(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def ids(items):
    return [f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in items]


def config_map() -> dict:
    return next(d for _, d in manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "sicot-config")


def set_overrides(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_manifests_pass_strict_schema_validation():
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, *files],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARN" not in out and "ERROR" not in out, out  # an unknown kind is only a warning: refuse it
    assert out.count(" passed for resource ") == len(manifests()) >= 8


@pytest.mark.parametrize("name,resource", manifests(), ids=ids(manifests()))
def test_names_are_dns_labels(name, resource):
    names = [resource["metadata"]["name"]]
    if resource["kind"] in ("Job", "Deployment"):
        spec = pod_spec(resource)
        names += [c["name"] for c in spec["containers"]] + [v["name"] for v in spec.get("volumes", [])]
        ports = [p["name"] for c in spec["containers"] for p in c.get("ports", [])]
        assert all(PORT_NAME.match(p) and len(p) <= 15 for p in ports), ports
    if resource["kind"] == "Service":
        assert all(PORT_NAME.match(p["name"]) and len(p["name"]) <= 15 for p in resource["spec"]["ports"])
    assert all(DNS_1123_LABEL.match(n) and len(n) <= 63 for n in names), names


@pytest.mark.parametrize("name,resource", workloads(), ids=ids(workloads()))
def test_workloads_are_runnable(name, resource):
    spec = pod_spec(resource)
    if resource["kind"] == "Job":
        assert spec["restartPolicy"] in ("Never", "OnFailure")
        assert isinstance(resource["spec"].get("backoffLimit"), int)
    else:
        selector = resource["spec"]["selector"]["matchLabels"]
        assert selector.items() <= resource["spec"]["template"]["metadata"]["labels"].items()
    accounts = {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "ServiceAccount"}
    assert spec["serviceAccountName"] in accounts
    assert spec["securityContext"]["runAsNonRoot"] is True
    for container in spec["containers"]:
        assert re.fullmatch(r"sicot:\d+\.\d+\.\d+(-cuda)?", container["image"]), container["image"]
        for kind in ("requests", "limits"):
            for resource_name, quantity in container["resources"].get(kind, {}).items():
                assert isinstance(quantity, str) and QUANTITY.match(quantity), (resource_name, quantity)
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])}


@pytest.mark.parametrize("name,resource", workloads(), ids=ids(workloads()))
def test_commands_run_existing_steps_with_valid_params(name, resource):
    """`$(VAR)` must be defined (else Kubernetes passes the literal text) and `--set` keys must exist."""
    indexed = resource["spec"].get("completionMode") == "Indexed"
    defined = set(config_map()["data"]) | ({"JOB_COMPLETION_INDEX"} if indexed else set())
    for container in pod_spec(resource)["containers"]:
        defined_here = defined | {e["name"] for e in container.get("env", [])}
        argv = container["command"] + container.get("args", [])
        assert set(re.findall(r"\$\((\w+)\)", " ".join(argv))) <= defined_here
        assert {"configMapRef": {"name": "sicot-config"}} in container["envFrom"]
        if argv[:3] == ["python", "-m", "sicot.serving_app"]:
            assert argv[argv.index("--model") + 1] == "models:/sicot@champion"
            continue
        module = argv[argv.index("-m") + 1]
        assert module.split(".")[0] == "components" and module.split(".")[1] in COMPONENTS, module
        overrides = [re.sub(r"\$\(JOB_COMPLETION_INDEX\)", "0", re.sub(r"\$\(SICOT_\w+\)", "s3://b/p", o))
                     for o in set_overrides(argv)]
        try:
            load_params(None, overrides)
        except ConfigError as exc:
            pytest.fail(f"{name}: {exc}")


@pytest.mark.parametrize("name,resource", manifests(), ids=ids(manifests()))
def test_no_literal_credentials(name, resource):
    assert resource["kind"] != "Secret"
    if resource["kind"] == "ConfigMap":
        assert not [k for k in resource["data"] if SECRET_NAME.search(k)]
    text = json.dumps(resource)
    assert not re.search(r"AKIA[0-9A-Z]{12,}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY", text, re.I)
    if resource["kind"] in ("Job", "Deployment"):
        for container in pod_spec(resource)["containers"]:
            assert not [e for e in container.get("env", []) if SECRET_NAME.search(e["name"]) and "value" in e]
            assert {"secretRef": {"name": "sicot-s3"}} in container["envFrom"]


def test_gpu_jobs_request_gpus_matching_their_workers():
    jobs = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Job"}
    for job in ("sicot-publish-shards", "sicot-train"):
        container = pod_spec(jobs[job])["containers"][0]
        assert container["image"].endswith("-cuda")
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert {t["key"] for t in pod_spec(jobs[job])["tolerations"]} == {"nvidia.com/gpu"}

    shards = jobs["sicot-publish-shards"]
    args = set_overrides(pod_spec(shards)["containers"][0]["args"])
    assert shards["spec"]["completionMode"] == "Indexed"
    assert "publish.shard=$(JOB_COMPLETION_INDEX)" in args
    assert f"publish.shards={shards['spec']['completions']}" in args
    merge = pod_spec(jobs["sicot-publish-merge"])["containers"][0]
    assert "--merge" in merge["args"]
    assert f"publish.shards={shards['spec']['completions']}" in set_overrides(merge["args"])

    train = jobs["sicot-train"]
    container = pod_spec(train)["containers"][0]
    flags = dict(a.lstrip("-").split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)
    assert container["command"] == ["torchrun"]
    assert int(flags["nnodes"]) == train["spec"]["completions"] == train["spec"]["parallelism"]
    assert int(flags["nproc-per-node"]) == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert flags["node-rank"] == "$(JOB_COMPLETION_INDEX)"
    # rank 0's address is pod 0's name under the headless Service that the pods' subdomain names
    service = next(d for _, d in manifests()
                   if d["kind"] == "Service" and d["metadata"]["name"] == pod_spec(train)["subdomain"])
    assert flags["master-addr"] == f"{train['metadata']['name']}-0.{service['metadata']['name']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": train["metadata"]["name"]}
    assert int(flags["master-port"]) in {p["port"] for p in service["spec"]["ports"]}


# ---- Prefect work pool -------------------------------------------------------------------------------

def render_pool_job(values: dict) -> dict:
    """The Job the kubernetes worker would submit for a flow run, rendered by prefect-kubernetes itself."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    # A client is only contacted for block or variable references, which the template has none of.
    client = PrefectClient("http://127.0.0.1:9/api")
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        json.loads(TEMPLATE.read_text()), values, client=client))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4()))
    return config.job_manifest


@pytest.mark.parametrize("values,gpus", [({}, 1), ({"gpu": 4, "cpu_request": "8", "memory_limit": "32Gi"}, 4),
                                          ({"gpu": 0}, 0)])
def test_work_pool_template_renders_a_job_with_the_requested_gpus(values, gpus):
    import kubernetes_validate

    job = render_pool_job({"name": "sicot-train", **values})
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["image"] == "sicot:0.1.0-cuda" and spec["serviceAccountName"] == "sicot-pipeline"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert {"secretRef": {"name": "sicot-s3"}} in container["envFrom"]
    assert job["metadata"]["generateName"] == "sicot-train-"
    for key in ("cpu_request", "memory_limit"):
        if key in values:
            kind = "requests" if key.endswith("request") else "limits"
            assert container["resources"][kind][key.split("_")[0]] == values[key]
    # prefect-kubernetes' own validator insists on `parallelism`/`completions` inside the pod spec, where
    # the API server drops them as unknown fields; everything else must pass strict validation.
    assert (spec.pop("parallelism"), spec.pop("completions")) == (1, 1)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_work_pool_template_keeps_the_defaults_and_rejects_bad_gpu_counts():
    import jsonschema
    from prefect_kubernetes.worker import KubernetesWorker

    template = json.loads(TEMPLATE.read_text())
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) < set(template["variables"]["properties"])
    assert set(default["job_configuration"]) == set(template["job_configuration"])
    gpu = template["variables"]["properties"]["gpu"]
    assert gpu["type"] == "integer" and gpu["minimum"] == 0
    jsonschema.validate({"gpu": 2}, template["variables"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu": -1}, template["variables"])


def test_prefect_deployments_match_the_pool_template_and_the_image():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    on_k8s = [d for d in deployments if d["work_pool"]["name"] == "sicot-k8s-gpu"]
    assert on_k8s
    variables = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    workdir = re.search(r"^WORKDIR (\S+)", (REPO / "infra" / "Dockerfile.cuda").read_text(), re.M).group(1)
    for d in on_k8s:
        assert set(d["work_pool"].get("job_variables", {})) <= set(variables), d["name"]
        steps = [s["prefect.deployments.steps.set_working_directory"]["directory"] for s in d["pull"]]
        assert steps == [workdir], d["name"]
        assert (REPO / d["entrypoint"].split(":")[0]).exists()


# ---- images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_pinned_project_and_checks_every_step(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)  # the interpreter constraints.txt was resolved for
    assert re.search(r"^COPY .*\bconstraints\.txt\b", text, re.M)
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "WORKDIR /opt/sicot" in text and re.search(r"^USER 10001$", text, re.M)
    assert set(re.findall(r"components\.(\w+)", text)) >= set(COMPONENTS)

    # every file the image copies exists and is not excluded from the build context
    allowed = [line[1:].rstrip("/") for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (REPO / source).exists() and source.rstrip("/") in allowed, source


def test_images_in_manifests_are_the_ones_the_dockerfiles_build():
    built = {m for p in DOCKERFILES for m in re.findall(r"docker build -f infra/\S+ -t (\S+) \.", p.read_text())}
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert built == {f"sicot:{version}", f"sicot:{version}-cuda"}
    used = {c["image"] for _, d in workloads() for c in pod_spec(d)["containers"]}
    used.add(json.loads(TEMPLATE.read_text())["variables"]["properties"]["image"]["default"])
    assert used == built


def test_the_train_job_flow_renders_a_valid_indexed_job_for_its_parameters():
    from flows.train_job import render

    service, job = render("sicot-train-sicot-1a2b3c4d", nnodes=3, gpus_per_node=8, mode="sicot",
                          overrides=["train.epochs=4", "train.resume=true"], parent_run_id="abc123")
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "sicot-train-sicot-1a2b3c4d"}
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = pod_spec(job)
    container = pod["containers"][0]
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    args = container["args"]
    assert args[:5] == ["--nnodes=3", "--nproc-per-node=8", "--node-rank=$(JOB_COMPLETION_INDEX)",
                        "--master-addr=sicot-train-sicot-1a2b3c4d-0.sicot-train-sicot-1a2b3c4d", "--master-port=29500"]
    params = load_params(None, set_overrides(args))
    assert (params.train.mode, params.train.nproc, params.train.epochs, params.train.resume) == ("sicot", 8, 4, True)
    assert {"name": "SICOT_PARENT_RUN_ID", "value": "abc123"} in container["env"]
    assert not [v for v in pod.get("volumes", []) if v["name"] == "models"]  # checkpoints go to S3, not the pod
    import kubernetes_validate

    for doc in (service, job):
        kubernetes_validate.validate(doc, "1.30", strict=True)
