"""The recognition service follows index/CURRENT while it runs: a newly published version is swapped in
after `serve.index_refresh_s` without reloading the model, a version that fails to load leaves the served
one answering, requests during a swap each answer from one version, and 0 means CURRENT is never re-read.

A small untrained recognizer (6 classes, 8-d features) and index versions built with a stand-in embedding
whose facts name their version (`title` ends with it, `tags` is it), so every fact in an answer can be
traced to the version it came from. The clock the service reads is the test's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sicot import index, serving
from tests.tiny_service import random_photos, save_random_recognizer

CLASSES = [f"SKU{i:03d}" for i in range(6)]  # SKU006 and SKU007 are new arrivals: catalog only
DIM = 8
SHARDS = 2
CHECK_THREAD = "sicot-index-check"


def catalog(tag: str) -> list[dict]:
    return [{"sku": f"SKU{i:03d}", "title": f"product {i} of {tag}", "tags": [tag], "image": f"images/{i:03d}.jpg"}
            for i in range(8)]


def fake_embed(images: list[bytes]) -> np.ndarray:
    return np.stack([np.random.default_rng(list(img)).normal(size=DIM) for img in images]).astype(np.float32)


def publish(root: str, tag: str) -> str:
    """Build and publish the version whose facts are tagged `tag`; its name."""
    records = catalog(tag)
    version = index.version_id("model-1", records, SHARDS)
    index.build_all(records, SHARDS, fake_embed, lambda record: record["image"].encode(),
                    {sku: i for i, sku in enumerate(CLASSES)}, index.version_uri(root, version))
    assert index.publish(root, version, SHARDS)["switched"]
    return version


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return save_random_recognizer(str(tmp_path_factory.mktemp("model") / "model.pt"), CLASSES, DIM)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return random_photos(3)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(serving, "monotonic", clock)
    return clock


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """How often CURRENT was read and a version loaded, from now on."""
    counts = {"current": 0, "version": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(index, "read_current", counted("current", index.read_current))
    monkeypatch.setattr(index, "load_version", counted("version", index.load_version))
    return counts


def service_on(model_file: str, root: str, refresh_s: float):
    # Every score and every new arrival listed: each answer carries all the facts it can.
    return serving.Recognition(model_file, root, min_score=0.0, min_similarity=-1.0, top_k=3,
                               index_refresh_s=refresh_s)


def finish_checks() -> None:
    for thread in threading.enumerate():
        if thread.name == CHECK_THREAD:
            thread.join(timeout=60)
            assert not thread.is_alive()


def fact_tags(answer: dict) -> set[str]:
    """The versions the facts in `answer` come from, by the tag each of its facts carries."""
    entries = answer["matches"] + answer["new_arrivals"]
    assert len(answer["matches"]) == 3 and len(answer["new_arrivals"]) == 2, answer
    return {e["title"].rsplit(" ", 1)[1] for e in entries} | {t for e in entries for t in e["tags"]}


def served_from(answers: list[dict], version: str, tag: str) -> bool:
    """Whether every answer names `version` and carries its facts, and no other version's."""
    return all(a["index_version"] == version and fact_tags(a) == {tag} for a in answers)


def test_a_newly_published_version_is_served_after_the_interval_without_reloading_the_model(
        model_file, photos, tmp_path, clock, reads, monkeypatch):
    from sicot.model.recognizer import Recognizer

    root = str(tmp_path / "store")
    a = publish(root, "A")
    loads, real_load = [], Recognizer.load
    monkeypatch.setattr(Recognizer, "load", lambda *args, **kwargs: loads.append(1) or real_load(*args, **kwargs))
    service = service_on(model_file, root, refresh_s=30)
    model = service.model
    assert served_from(service.recognise(photos), a, "A")

    b = publish(root, "B")
    reads.update(current=0, version=0)
    clock.now += 29.9
    assert served_from(service.recognise(photos), a, "A")
    finish_checks()
    assert reads == {"current": 0, "version": 0}  # not due: CURRENT is not even read

    clock.now += 0.1
    service.recognise(photos)  # finds the check due and starts it
    finish_checks()
    assert served_from(service.recognise(photos), b, "B")
    assert reads["version"] == 1  # B, once
    assert loads == [1] and service.model is model

    reads.update(current=0, version=0)
    for _ in range(3):
        service.recognise(photos)  # within the interval: no second check
    clock.now += 30
    service.recognise(photos)
    finish_checks()
    assert reads == {"current": 1, "version": 0}  # CURRENT unchanged: its token read, nothing loaded
    assert served_from(service.recognise(photos), b, "B")


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b"of B", b"of X"))


@pytest.mark.parametrize("damage, why", [(corrupt, "checksum mismatch"),
                                         (Path.unlink, "missing")])
def test_a_version_that_fails_to_load_leaves_the_served_one_answering(model_file, photos, tmp_path, clock, caplog,
                                                                       damage, why):
    root = str(tmp_path / "store")
    a = publish(root, "A")
    service = service_on(model_file, root, refresh_s=30)
    b = publish(root, "B")
    damaged = Path(index.version_uri(root, b), "shards", "1", "skus.jsonl")
    intact = damaged.read_bytes()
    damage(damaged)  # after publish checked it: a disk fault, or pruned while it is read

    clock.now += 30
    with caplog.at_level(logging.WARNING, logger="sicot.serving"):
        service.recognise(photos)
        finish_checks()
    assert served_from(service.recognise(photos), a, "A")
    (warning,) = [r for r in caplog.records if r.name == "sicot.serving" and r.levelno == logging.WARNING]
    assert warning.getMessage().startswith(f"index version {b} under {root} not loaded, still serving {a}: ")
    assert f"{damaged}: {why}" in warning.getMessage(), warning.getMessage()

    damaged.write_bytes(intact)  # repaired: the next check loads it
    clock.now += 30
    service.recognise(photos)
    finish_checks()
    assert served_from(service.recognise(photos), b, "B")


def test_requests_during_a_swap_each_answer_from_one_version(model_file, photos, tmp_path, clock):
    root = str(tmp_path / "store")
    versions = {publish(root, "A"): "A"}
    service = service_on(model_file, root, refresh_s=30)
    versions[publish(root, "B")] = "B"
    infer = service.model.topk_and_embed
    # Slower inference keeps requests in flight while the new version is loaded and swapped in.
    service.model.topk_and_embed = lambda *args: time.sleep(0.02) or infer(*args)

    answers, straddled, failures = [], [], []
    deadline = time.monotonic() + 120

    def client():
        try:
            seen_b = 0
            while seen_b < 3 and time.monotonic() < deadline:  # each client goes on until B has answered it
                before = service.products.version
                (answer,) = service.recognise(photos[:1])
                answers.append(answer)
                seen_b += versions[answer["index_version"]] == "B"
                if service.products.version != before:
                    straddled.append(answer)
        except Exception as exc:  # reported below
            failures.append(exc)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    while len(answers) < 8 and all(thread.is_alive() for thread in clients):
        time.sleep(0.005)
    clock.now += 30  # the next request starts the check
    for thread in clients:
        thread.join(timeout=150)
    finish_checks()
    assert not failures, failures
    assert [versions[a["index_version"]] for a in answers[:8]] == ["A"] * 8
    assert {a["index_version"] for a in answers} == set(versions)
    for answer in answers:
        assert fact_tags(answer) == {versions[answer["index_version"]]}, answer
    assert straddled  # requests that began before the swap and ended after it: still one version each


def test_with_index_refresh_s_0_current_is_never_read_again(model_file, photos, tmp_path, clock, reads):
    root = str(tmp_path / "store")
    a = publish(root, "A")
    service = service_on(model_file, root, refresh_s=0)
    publish(root, "B")
    reads.update(current=0, version=0)
    for step in (1, 30, 1e6):
        clock.now += step
        assert served_from(service.recognise(photos), a, "A")
    finish_checks()
    assert reads == {"current": 0, "version": 0}


def test_a_service_started_before_any_publish_picks_up_the_first(model_file, photos, tmp_path, clock):
    root = str(tmp_path / "store")
    service = service_on(model_file, root, refresh_s=30)
    (answer,) = service.recognise(photos[:1])
    assert answer["index_version"] is None and all(m["title"] is None for m in answer["matches"])
    a = publish(root, "A")
    clock.now += 30
    service.recognise(photos)
    finish_checks()
    assert served_from(service.recognise(photos), a, "A")


# ---- through MLflow's scoring app on a real HTTP server -------------------------------------------

@pytest.fixture
def http_server():
    """Serve an ASGI app on loopback from a thread of this process; yields a function that starts it."""
    import uvicorn

    from tests.services import free_port

    running = []

    def start(app) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=30)


def recognised(url: str, photo: bytes) -> dict:
    import base64

    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(photo).decode()]]}})
    request = urllib.request.Request(url + "/invocations", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"][0]


def test_the_served_model_reads_the_index_location_and_interval_from_its_environment(
        model_file, photos, tmp_path, monkeypatch, http_server):
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import scoring_server
    from mlflow.types import ColSpec, Schema

    from sicot.config import Serve

    root = str(tmp_path / "store")
    a = publish(root, "A")
    saved = tmp_path / "served"
    # What `log_service` logs, with another index location: the environment's wins.
    mlflow.pyfunc.save_model(str(saved), python_model=str(serving.STUB), artifacts={"model": model_file},
                             model_config={"index_root": str(tmp_path / "registered"),
                                           **dataclasses.asdict(Serve(min_score=0.0, min_similarity=-1.0))},
                             signature=ModelSignature(inputs=Schema([ColSpec("binary", "image")])),
                             pip_requirements=[])
    monkeypatch.setenv(serving.INDEX_ENV, root)
    monkeypatch.setenv(serving.REFRESH_ENV, "0.2")
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # restored after: the scoring app sets it
    model = mlflow.pyfunc.load_model(str(saved))
    assert model.unwrap_python_model().limits.index_refresh_s == 0.2
    url = http_server(scoring_server.init(model))
    assert served_from([recognised(url, photos[0])], a, "A")

    b = publish(root, "B")
    deadline = time.monotonic() + 30
    while not served_from([answer := recognised(url, photos[0])], b, "B"):
        assert served_from([answer], a, "A") and time.monotonic() < deadline, answer
        time.sleep(0.1)
