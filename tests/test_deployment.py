"""prefect.yaml's `demo` deployment on a real Prefect server, started the way a UI user starts it.

Headless Chromium (Debian's `chromium`, installed by `bin/setup --test`; driven by Playwright, which
launches that binary: Playwright's own browser download is not reachable) opens the deployment's run
form, types one typed field, and submits. A process worker runs the pipeline on the tiny world (the
worker checkout's params.yaml); its runs go to the MLflow server, whose UI then shows the pipeline's
parent run with the comparison table and the word-attention view.

Screenshots of both UIs go to the test's temporary folder, or to `$SICOT_SCREENSHOTS` when set
(`SICOT_SCREENSHOTS=docs/img pytest tests/test_deployment.py` refreshes the README's pictures).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import services
from tests.workflow import BIN, REPO, clean_env, copy_code, run, write_tiny_params

pytestmark = [pytest.mark.services, pytest.mark.slow]

POOL = "sicot-process"  # the pool prefect.yaml's demo deployment names
EPOCHS = 1  # typed into the form; the worker's params.yaml (the tiny world) says 2
MODEL = "sicot-ui"  # its own registered model on the shared MLflow server


def api(server: services.Service, path: str, body: dict | None = None) -> dict | list:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def refused(server: services.Service, path: str, body: dict) -> str:
    """The error text of a request the server must refuse."""
    try:
        api(server, path, body)
    except urllib.error.HTTPError as exc:
        return exc.read().decode()
    raise AssertionError(f"{path} accepted {body}")


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: run `bin/setup --test`"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # CI runs as root
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("SICOT_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def form_input(page, section: str, key: str):
    """The input of `section.key` in Prefect's schema form, where each label reads `name (Optional)`."""
    def labelled(name: str) -> str:
        return (f"//div[contains(@class, 'schema-form-property')]"
                f"[./div/label//span[normalize-space() = '{name} (Optional)']]")
    return page.locator(labelled(section) + labelled(key) + "//input")


def wait_final(server: services.Service, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (flow_run := api(server, f"/flow_runs/{flow_run_id}"))["state"]["type"] not in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, f"flow run still {flow_run['state']['type']} after {timeout:.0f}s"
        time.sleep(3)
    return flow_run


def test_a_run_started_from_the_ui_form_uses_the_typed_values(tmp_path, prefect_server, mlflow_server, page,
                                                                screenshots):
    home = tmp_path / "sicot"  # the checkout the worker runs in (SICOT_HOME)
    home.mkdir()
    copy_code(home)
    shutil.copy(REPO / "prefect.yaml", home / "prefect.yaml")
    params = yaml.safe_load(write_tiny_params(home).read_text(encoding="utf-8"))
    params["promote"]["model_name"] = MODEL
    params["train"]["cotrain_weight"] = 2.0  # the paper's co-training: the parent run shows its word attention
    (home / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = clean_env(**prefect_server.env, **mlflow_server.env, SICOT_HOME=str(home))
    prefect = str(BIN / "prefect")

    run([prefect, "work-pool", "create", POOL, "--type", "process"], home, env)
    deployed = run([prefect, "--no-prompt", "deploy", "--name", "demo"], home, env)
    assert "sicot-pipeline/demo" in deployed.output, deployed.explain()

    deployment = api(prefect_server, "/deployments/name/sicot-pipeline/demo")
    schema = deployment["parameter_openapi_schema"]
    epochs = schema["definitions"]["Train"]["properties"]["epochs"]
    assert epochs["type"] == "integer" and epochs["minimum"] == 1 and epochs["description"], epochs
    assert schema["definitions"]["Train"]["properties"]["fc"]["enum"] == ["auto", "sharded", "replicated"]
    assert schema["properties"]["train"]["default"] == {}  # an untouched form overrides nothing
    why = refused(prefect_server, f"/deployments/{deployment['id']}/create_flow_run",
                  {"parameters": {"train": {"epochs": 0}}})
    assert "epochs" in why and "minimum" in why, why

    ui = prefect_server.url.removesuffix("/api")
    page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run")
    epochs_input = form_input(page, "train", "epochs")
    epochs_input.fill(str(EPOCHS))
    epochs_input.evaluate("input => input.scrollIntoView({block: 'center'})")
    page.screenshot(path=screenshots / "prefect-run-form.png")
    worker = services.start_process("prefect-worker", [prefect, "worker", "start", "--pool", POOL, "--limit", "1"],
                                    tmp_path / "worker.log", env, cwd=tmp_path)
    try:
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+(\?|$)"))
        [flow_run] = api(prefect_server, "/flow_runs/filter",
                         {"deployments": {"id": {"any_": [deployment["id"]]}}})
        started = time.monotonic()
        flow_run = wait_final(prefect_server, flow_run["id"], timeout=540)
        print(f"flow run started from the UI (tiny world): {time.monotonic() - started:.1f}s")
        why = json.dumps(flow_run["state"]) + services.tails(worker, prefect_server)
        assert flow_run["state"]["type"] == "COMPLETED", why
    finally:
        services.stop(worker)
    assert flow_run["parameters"]["train"] == {"epochs": EPOCHS}

    assert json.loads((home / "reports/data_stats.json").read_text())["classes"] == 12, why
    for model in ("baseline", "sicot"):
        assert json.loads((home / f"reports/{model}/metrics.json").read_text())["model"] == model
    assert json.loads((home / "index_store/index/CURRENT").read_text())["version"].startswith(f"{MODEL}-v1-")

    # The flow run's artifact links to the pipeline's parent run in MLflow.
    [artifact] = api(prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": ["sicot-comparison"]}},
                                                          "flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    link = re.search(r"\((http://[^)]+/#/experiments/\w+/runs/(\w+))\)", artifact["data"])
    assert link, artifact["data"]
    import mlflow

    parent = mlflow.MlflowClient(mlflow_server.url).get_run(link.group(2))
    assert parent.data.params["train.epochs"] == str(EPOCHS)  # what the pipeline ran with

    # MLflow's UI takes a while to load on a small machine; `machine_learning`: the classic run view
    page.goto(f"{link.group(1)}/artifactPath/comparison.md?workflowType=machine_learning")
    page.get_by_text("test accuracy (%)").first.wait_for(timeout=120_000)
    page.get_by_role("button", name="Close").click()  # the assistant's side panel
    page.get_by_text("attention.html", exact=True).click()
    page.frame_locator("iframe").get_by_text("Word attention of the title stream").wait_for()
    page.screenshot(path=screenshots / "mlflow-run.png")
