"""The recognition service on a tiny trained model and a published index: directly, and behind real
`mlflow models serve` and `python -m sicot.serving_app` processes answering HTTP on loopback. Hostile
input (decompression-style PNGs, too many images, formats outside the allow-list, oversize bodies) is
shown to get through or cost memory without its guard, then refused before anything is decoded.

One module-scoped deployment: a tiny world with two new-arrival SKUs (catalog only, never trained on),
a baseline model trained for two epochs, registered as champion in an embedded SQLite MLflow store, and
the product index published for it by `publish_index`, exactly as the pipeline does.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import services
from tests.hostile_input import MiB, encoded, flat_png, peak_memory
from tests.workflow import FOREIGN

pytestmark = [pytest.mark.services, pytest.mark.slow]

FACTS = ("sku", "title", "tags", "image")


@dataclass
class Deployment:
    root: Path
    params: object
    model_file: str
    index_version: str
    catalog: dict[str, dict]  # sku -> catalog record (facts)
    test: list[dict]  # test.jsonl records: photos of trained SKUs
    holdout: list[dict]  # holdout.jsonl records: photos of new arrivals
    env: dict[str, str]

    def image(self, record: dict) -> bytes:
        """The photo as the user has it: the generated world's file (the prepared dataset holds it in a shard)."""
        return (Path(self.params.paths.raw) / record["image"]).read_bytes()

    def recognition(self, **limits):
        """The service with the deployment's serve params, `limits` overriding some of them."""
        from sicot.serving import Recognition, recognition_limits

        return Recognition(self.model_file, self.params.paths.index, **recognition_limits(self.params.serve) | limits)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    from components import evaluate_model, prepare_data, promote_model, publish_index, train_model
    from sicot.config import load_params

    root = tmp_path_factory.mktemp("serving")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the embedded store keeps its artifacts in ./mlartifacts
        for key in FOREIGN:
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        params = load_params(None, [
            f"paths.raw={root / 'raw'}", f"paths.prepared={root / 'prepared'}", f"paths.models={root / 'models'}",
            f"paths.reports={root / 'reports'}", f"paths.index={root / 'index_store'}",
            "data.skus=6", "data.holdout_skus=2", "data.brands=3", "data.categories=2", "data.max_images=16",
            "data.imbalance=4", "data.val_per_class=1", "data.test_per_class=2", "data.image_size=32",
            "train.mode=baseline", "promote.candidate=baseline", "train.image_size=16", "train.feature_dim=32",
            "train.epochs=2", "train.batch_size=16", "train.lr=0.02", "train.threads=1",
            "evaluate.head_threshold=10", "publish.shards=2", "publish.batch_size=4", "serve.max_images=16"])
        prepare_data.run(params, track=False)
        model_file = train_model.run(params, track=False)["model"]
        evaluate_model.run(params, track=False)
        assert promote_model.run(params)["promote"]
        published = publish_index.run(params)
        prepared = Path(params.paths.prepared)
        yield Deployment(root, params, model_file, published["version"],
                         {r["sku"]: r for r in read_jsonl(prepared / "catalog.jsonl")},
                         read_jsonl(prepared / "test.jsonl"), read_jsonl(prepared / "holdout.jsonl"), env)


# ---- building bad inputs -------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int) -> bytes:
    """A valid-looking 1-bit grayscale PNG that declares `width` x `height` but holds ~100 bytes: what a
    decompression bomb shows the decoder before any pixel is expanded."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def as_jpeg(png: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize((96, 96)).save(out, format="JPEG", quality=90)
    return out.getvalue()


BAD_IMAGES = ["text", "empty", "truncated_jpeg", "truncated_png", "bomb_20000x20000", "over_max_pixels", "string",
              "none", "number", "bmp", "tiff", "gif"]


def bad_images(good: bytes) -> dict[str, tuple[object, str]]:
    """name -> (value sent in place of an image, words its error must contain)."""
    jpeg = as_jpeg(good)
    return {
        "text": (b"this is a product description, not a photo", "not a recognised image format"),
        "empty": (b"", "empty"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated_png": (good[: len(good) // 2], "image"),
        "bomb_20000x20000": (declared_png(20000, 20000), "too large"),
        "over_max_pixels": (declared_png(5000, 5000), "PNG 5000x5000 = 25000000 pixels, over the limit of 16000000 "
                                                      "pixels per image (serve.max_pixels)"),
        "string": ("aGVsbG8=", "expected image bytes, got str"),
        "none": (None, "expected image bytes, got NoneType"),
        "number": (42, "expected image bytes, got int"),
        **{fmt.lower(): (encoded(fmt), f"{fmt} is not one of the accepted formats JPEG, PNG, WEBP (serve.formats)")
           for fmt in ("BMP", "TIFF", "GIF")},
    }


# ---- Recognition, in process ---------------------------------------------------------------------

def check_facts(deployed: Deployment, entry: dict) -> None:
    assert {k: entry[k] for k in FACTS} == {k: deployed.catalog[entry["sku"]][k] for k in FACTS}
    assert isinstance(entry["score"], float)


def test_answers_carry_product_facts_and_the_index_version(deployed):
    service = deployed.recognition(min_score=0.0, top_k=3)
    answers = service.recognise([deployed.image(r) for r in deployed.test])
    trained = {r["sku"] for r in deployed.test}
    assert len(answers) == len(deployed.test)
    for answer in answers:
        assert answer["status"] == "ok" and answer["index_version"] == deployed.index_version
        scores = [m["score"] for m in answer["matches"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5
        for match in answer["matches"]:
            assert match["sku"] in trained
            check_facts(deployed, match)
    # The matches are the model's own top 3, in its order, with its probabilities: the service maps class
    # indices to SKUs and facts and changes nothing else (whether the tiny model is right is not its concern).
    from sicot.model.recognizer import Recognizer

    model = Recognizer.load(deployed.model_file)
    probabilities, classes = model.topk(model.prepare([deployed.image(r) for r in deployed.test]), 3)
    for answer, p, c in zip(answers, probabilities.tolist(), classes.tolist(), strict=True):
        assert [m["sku"] for m in answer["matches"]] == [model.classes[i] for i in c]
        assert [m["score"] for m in answer["matches"]] == pytest.approx(p, abs=1e-5)


def test_a_score_threshold_above_every_score_means_no_match(deployed):
    service = deployed.recognition(min_score=1.01, min_similarity=1.01)
    answers = service.recognise([deployed.image(r) for r in deployed.test[:3] + deployed.holdout[:1]])
    assert [a["status"] for a in answers] == ["no_match"] * 4
    assert all(a["matches"] == [] and a["new_arrivals"] == [] for a in answers)


def test_new_arrivals_are_retrieved_from_the_catalog_by_embedding(deployed):
    new = {sku for sku, r in deployed.catalog.items()} - {r["sku"] for r in deployed.test}
    assert new == {r["sku"] for r in deployed.holdout} and len(new) == 2
    service = deployed.recognition(min_score=0.0, min_similarity=-1.0, top_k=3)
    assert len(service.products.arrivals) == 2

    # A new arrival's own catalog image is its nearest neighbour, at cosine 1.
    catalog_images = [(Path(deployed.params.paths.prepared) / deployed.catalog[sku]["image"]).read_bytes()
                      for sku in sorted(new)]
    for sku, answer in zip(sorted(new), service.recognise(catalog_images)):
        assert answer["new_arrivals"][0]["sku"] == sku
        assert answer["new_arrivals"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    # Every photo gets both new arrivals ranked (top_k 3 > 2 of them), with facts; the classifier still
    # answers with trained SKUs only.
    for answer in service.recognise([deployed.image(r) for r in deployed.holdout + deployed.test[:2]]):
        arrivals = answer["new_arrivals"]
        assert {a["sku"] for a in arrivals} == new
        assert [a["score"] for a in arrivals] == sorted((a["score"] for a in arrivals), reverse=True)
        for entry in arrivals:
            check_facts(deployed, entry)
            assert -1.0 - 1e-5 <= entry["score"] <= 1.0 + 1e-5
        assert not {m["sku"] for m in answer["matches"]} & new

    # Only neighbours at or above the similarity threshold are listed.
    cut = deployed.recognition(min_score=0.0, min_similarity=0.9999).recognise(catalog_images[:1] + [
        deployed.image(deployed.test[0])])
    assert [a["sku"] for a in cut[0]["new_arrivals"]] == [sorted(new)[0]]
    assert all(a["score"] >= 0.9999 for a in cut[1]["new_arrivals"])


def test_one_backbone_pass_gives_the_scores_and_embeddings_of_two(deployed):
    import torch

    from sicot.model.recognizer import Recognizer

    model = Recognizer.load(deployed.model_file)
    x = model.prepare([deployed.image(r) for r in deployed.test[:4] + deployed.holdout[:2]])
    scores, classes = model.topk(x, 3)
    both_scores, both_classes, features = model.topk_and_embed(x, 3)
    assert torch.equal(classes, both_classes)
    torch.testing.assert_close(both_scores, scores)
    torch.testing.assert_close(features, model.embed(x))


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_each_bad_image_gets_its_own_error(deployed, case):
    good = deployed.image(deployed.test[0])
    value, words = bad_images(good)[case]
    answers = deployed.recognition(min_score=0.0).recognise([good, value, good])
    assert answers[0]["status"] == answers[2]["status"] == "ok" and answers[0]["matches"]
    bad = answers[1]
    assert bad["status"] == "error" and bad["matches"] == [] and bad["new_arrivals"] == []
    assert bad["error"].startswith("image 1: ") and words in bad["error"], bad["error"]
    assert " at 0x" not in bad["error"]  # no object reprs
    assert bad["index_version"] == deployed.index_version


def test_requests_that_cannot_be_answered_are_refused(deployed):
    from sicot.serving import RequestError

    service = deployed.recognition()
    with pytest.raises(RequestError, match="empty request"):
        service.recognise([])
    good = deployed.image(deployed.test[0])
    with pytest.raises(RequestError, match=r"17 images in one request; at most 16 \(serve.max_images\)"):
        service.recognise([good] * 17)
    assert len(service.recognise([good] * 16)) == 16


def test_without_a_published_index_answers_carry_sku_ids_only(deployed):
    from sicot.serving import Products, Recognition

    service = Recognition(deployed.model_file, str(deployed.root / "nothing_published_here"), min_score=0.0)
    assert service.products == Products()
    (answer,) = service.recognise([deployed.image(deployed.holdout[0])])
    assert answer["status"] == "ok" and answer["index_version"] is None and answer["new_arrivals"] == []
    assert all(m["title"] is None and m["sku"] in deployed.catalog for m in answer["matches"])


# ---- hostile input, in process -------------------------------------------------------------------

def count_decodes(monkeypatch) -> list[str]:
    """The format of every image decoded from now on (`load` with tiles left to decode)."""
    from PIL import ImageFile

    decoded, real = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: (decoded.append(self.format) if self.tile else None) or real(self))
    return decoded


def test_a_request_over_the_pixel_budget_is_refused_before_any_image_is_decoded(deployed, monkeypatch):
    from sicot.serving import RequestError

    service = deployed.recognition()
    png = flat_png(4000, 4000)  # exactly serve.max_pixels, in tens of kB
    assert len(png) < 100_000
    with peak_memory() as one:
        (answer,) = service.recognise([png])
    assert answer["status"] != "error" and one["growth"] > 150 * MiB  # what decoding one costs

    decoded = count_decodes(monkeypatch)
    with peak_memory() as five, pytest.raises(RequestError, match=(
            r"^5 images of 80000000 pixels in all; at most 64000000 pixels per request \(serve.max_request_pixels\)$")):
        service.recognise([png] * 5)
    assert decoded == [] and five["growth"] < 20 * MiB, five
    assert [a["status"] != "error" for a in service.recognise([png] * 4)] == [True] * 4  # at the budget
    assert decoded == ["PNG"] * 4


def test_too_many_images_are_refused_before_any_is_opened(deployed, monkeypatch):
    from sicot import serving

    opened = []
    monkeypatch.setattr(serving, "open_image", lambda *args: opened.append(1))
    decoded = count_decodes(monkeypatch)
    with pytest.raises(serving.RequestError, match=r"17 images in one request; at most 16 \(serve.max_images\)"):
        deployed.recognition().recognise([flat_png(4000, 4000)] * 17)
    assert opened == [] and decoded == []


def test_at_most_max_decodes_images_are_decoded_at_once_whatever_the_clients(deployed, monkeypatch):
    from sicot import serving

    service = deployed.recognition(max_decodes=2)
    png = flat_png(4000, 4000)
    with peak_memory() as one:
        service.recognise([png])
    active, most, lock, real = [0], [0], threading.Lock(), serving.decode_opened

    def tracked(img, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return real(img, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(serving, "decode_opened", tracked)
    answers = []
    clients = [threading.Thread(target=lambda: answers.extend(service.recognise([png]))) for _ in range(8)]
    with peak_memory() as eight:
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=120)
    assert len(answers) == 8 and all(a["status"] != "error" for a in answers)
    assert most[0] == 2
    # 2 at a time is about 2x, 8 at once about 8x; 2 at a time in the clients' own threads was 2.8-3.8x
    assert eight["growth"] < 3 * one["growth"], (one, eight)


# ---- the logged model: code, not a pickle --------------------------------------------------------

@pytest.fixture(scope="module")
def champion_dir(deployed, tmp_path_factory) -> Path:
    """A local copy of the registered champion, as the serving pods download it."""
    import mlflow
    from mlflow.artifacts import download_artifacts

    mlflow.set_tracking_uri(deployed.env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(deployed.env["MLFLOW_TRACKING_URI"])
    return Path(download_artifacts(artifact_uri="models:/sicot@champion",
                                   dst_path=str(tmp_path_factory.mktemp("champion"))))


def test_the_served_model_is_logged_from_code_and_holds_no_pickle(deployed, champion_dir, monkeypatch):
    import mlflow
    import pandas as pd

    from sicot.serving import STUB, verify_model_code

    files = sorted(p.relative_to(champion_dir).as_posix() for p in champion_dir.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    assert STUB.name in files and (champion_dir / STUB.name).read_bytes() == STUB.read_bytes()
    verify_model_code(champion_dir)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # nothing here needs unpickling
    model = mlflow.pyfunc.load_model(str(champion_dir))
    images = [deployed.image(r) for r in deployed.test[:2] + deployed.holdout[:1]]
    assert model.predict(pd.DataFrame({"image": images})) == deployed.recognition().recognise(images)
    with pytest.raises(Exception, match=r"17 images in one request; at most 16 \(serve.max_images\)"):
        model.predict(pd.DataFrame({"image": images[:1] * 17}))


def test_a_model_whose_code_was_altered_is_refused(deployed, champion_dir, tmp_path):
    import mlflow

    from sicot.serving import STUB, ModelCodeError, verify_model_code

    altered = tmp_path / "altered"
    shutil.copytree(champion_dir, altered)
    (altered / STUB.name).write_text((altered / STUB.name).read_text() + "print('anything at all')\n")
    with pytest.raises(ModelCodeError, match=r"served_model.py: sha256 [0-9a-f]{64}, expected [0-9a-f]{64} .*"
                                             r"refusing altered model code"):
        verify_model_code(altered)
    with pytest.raises(Exception, match="refusing altered model code"):  # the check on MLflow's load path
        mlflow.pyfunc.load_model(str(altered))
    # Before anything is loaded: what the serving app does at start-up.
    cmd = [sys.executable, "-m", "sicot.serving_app", "--model", str(altered), "--verify-only"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=os.environ | deployed.env)
    assert refused.returncode == 1 and "refusing altered model code" in refused.stderr, refused.stderr
    assert "anything at all" not in refused.stdout
    cmd[cmd.index(str(altered))] = str(champion_dir)
    accepted = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=os.environ | deployed.env)
    assert accepted.returncode == 0 and "code verified" in accepted.stdout, accepted.stderr


def test_a_pickled_model_is_refused(deployed, tmp_path):
    import mlflow

    from sicot.serving import ModelCodeError, RecognitionService, verify_model_code

    pickled = tmp_path / "pickled"
    mlflow.pyfunc.save_model(str(pickled), python_model=RecognitionService(), artifacts={"model": deployed.model_file},
                             pip_requirements=[])
    assert (pickled / "python_model.pkl").is_file()
    with pytest.raises(ModelCodeError, match="not logged from code"):
        verify_model_code(pickled)


# ---- batching through MLflow's scoring app -------------------------------------------------------

def test_concurrent_requests_through_the_scoring_app_share_forward_passes(deployed, champion_dir, monkeypatch):
    """The scoring app runs each request's predict in a thread of asyncio's pool, so requests in flight
    together reach the batcher together, each answered as it would be alone."""
    import asyncio

    import httpx

    from sicot import serving_app
    from sicot.model.recognizer import Recognizer
    from tests.test_serving_batching import assert_same_answers

    sizes, real = [], Recognizer.topk_and_embed
    monkeypatch.setattr(Recognizer, "topk_and_embed", lambda self, x, k: sizes.append(len(x)) or real(self, x, k))
    monkeypatch.setenv(serving_app.MODEL_DIR_ENV, str(champion_dir))
    monkeypatch.setenv("SERVING_MODEL_CONFIG", json.dumps({"max_wait_ms": 2000}))  # time enough to gather all
    app = serving_app.create_app()
    images = [deployed.image(r) for r in deployed.test[:6]]

    async def send_together():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serving") as client:
            return await asyncio.gather(*(client.post("/invocations", json=split_body([b64(i)])) for i in images))

    replies = asyncio.run(send_together())
    assert [r.status_code for r in replies] == [200] * len(images), replies[0].text
    assert sum(sizes) == len(images) and len(sizes) < len(images), sizes
    alone = deployed.recognition()
    for reply, image in zip(replies, images):
        assert_same_answers(reply.json()["predictions"], alone.recognise([image]))


# ---- the real server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(deployed):
    port = services.free_port()
    cmd = [str(services.BIN / "mlflow"), "models", "serve", "-m", "models:/sicot@champion", "--env-manager", "local",
           "-p", str(port), "--host", "127.0.0.1"]
    env = deployed.env | {"PATH": f"{services.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it execs uvicorn
    yield from serving(deployed, "mlflow-models-serve", cmd, port, env)


def serving(deployed, name: str, cmd: list[str], port: int, env: dict):
    """A started server for a fixture to yield, stopped after the test."""
    service = services.start_process(name, cmd, deployed.root / f"{name}.log", env, cwd=deployed.root, unset=FOREIGN)
    service.url = f"http://127.0.0.1:{port}"
    try:
        yield services.wait_healthy(service, service.url + "/ping", timeout=240)
    finally:
        services.stop(service)


def post(server, body: bytes | dict, timeout: float = 60) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def split_body(values: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def assert_answers_good_request(server, deployed) -> None:
    status, body = post(server, split_body([b64(deployed.image(deployed.test[0]))]))
    assert status == 200, f"{body}" + services.tails(server)
    (answer,) = body["predictions"]
    assert answer["status"] in ("ok", "no_match") and answer["index_version"] == deployed.index_version


def test_server_answers_with_product_facts(server, deployed):
    images = [deployed.image(r) for r in deployed.test[:2] + deployed.holdout[:1]]
    replies = []
    for body in (split_body([b64(i) for i in images]), {"inputs": {"image": [b64(i) for i in images]}}):
        status, reply = post(server, body)
        assert status == 200, f"{reply}" + services.tails(server)
        answers = reply["predictions"]
        assert len(answers) == 3 and all(a["status"] != "error" for a in answers), answers
        for answer in answers:
            assert answer["index_version"] == deployed.index_version
            for entry in answer["matches"] + answer["new_arrivals"]:
                check_facts(deployed, entry)
        replies.append(answers)
    assert replies[0] == replies[1]  # both body formats carry the same bytes
    # The served model is the champion the in-process service loads; its limits came with it.
    assert replies[0] == deployed.recognition().recognise(images)


def test_server_reports_a_bad_image_beside_good_ones(server, deployed):
    good = b64(deployed.image(deployed.test[0]))
    status, reply = post(server, split_body([good, b64(b"GIF89a but not really"), good]))
    assert status == 200, reply
    assert [a["status"] != "error" for a in reply["predictions"]] == [True, False, True]
    assert reply["predictions"][1]["error"] == ("image 1: GIF is not one of the accepted formats JPEG, PNG, WEBP "
                                                "(serve.formats)")
    status, reply = post(server, {"inputs": {"image": [good, "not an image", good]}})
    assert status == 200, reply
    assert [a["status"] != "error" for a in reply["predictions"]] == [True, False, True]


@pytest.mark.parametrize("name, body", [
    ("not base64", split_body(["%%% not base64 %%%"])),
    ("base64 with broken padding", split_body(["abcde"])),
    ("empty dataframe", split_body([])),
    ("empty body", {}),
    ("no image column", {"dataframe_split": {"columns": ["photo"], "data": [["aGVsbG8="]]}}),
    ("not json", b"\x89PNG\r\n"),
])
def test_server_refuses_malformed_requests_and_keeps_serving(server, deployed, name, body):
    status, reply = post(server, body)
    assert 400 <= status < 500, f"{name}: {status} {reply}"
    assert_answers_good_request(server, deployed)


def test_server_refuses_a_thousand_images_in_one_request(server, deployed):
    status, reply = post(server, split_body([b64(deployed.image(deployed.test[0]))] * 1000))
    assert status == 400, f"{status} {str(reply)[:500]}"
    assert reply["message"] == "1000 images in one request; at most 16 (serve.max_images)"  # not the input's repr
    assert_answers_good_request(server, deployed)


# ---- the serving app: MLflow's scoring app behind a body limit ------------------------------------

@pytest.fixture(scope="module")
def app_server(deployed):
    port = services.free_port()
    cmd = [sys.executable, "-m", "sicot.serving_app", "--model", "models:/sicot@champion", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    yield from serving(deployed, "sicot-serving-app", cmd, port, deployed.env)


def get(server, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return response.status, response.read()


def test_the_serving_app_answers_as_mlflow_models_serve_does(server, app_server, deployed):
    images = [b64(deployed.image(r)) for r in deployed.test[:2] + deployed.holdout[:1]]
    for body in (split_body(images), {"inputs": {"image": images}}, split_body([images[0], b64(b"GIF89a")])):
        assert post(app_server, body) == post(server, body)
    for body in (split_body(["%%% not base64 %%%"]), {}, b"\x89PNG\r\n", split_body([images[0]] * 17)):
        (status, reply), (mlflow_status, mlflow_reply) = post(app_server, body), post(server, body)
        assert status == mlflow_status and 400 <= status < 500 and reply["error_code"] == mlflow_reply["error_code"]
        assert reply["message"][:40] == mlflow_reply["message"][:40]  # the rest may list a set in another order
    for path in ("/ping", "/health", "/version"):
        assert get(app_server, path) == get(server, path)


def raw_response(server, request: bytes) -> tuple[int, dict]:
    """Send `request` bytes as they are and read the reply: lets a client stop before the body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_an_oversize_body_is_refused_before_it_is_read(server, app_server, deployed):
    limit = deployed.params.serve.max_request_bytes
    assert limit == 32 * MiB
    # `mlflow models serve` reads such a body whole before saying anything about it.
    started = time.monotonic()
    status, _ = post(server, b"x" * (limit + 1))
    assert status == 400, status  # read and parsed: not JSON

    headers = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {limit + 1}\r\n\r\n").encode()
    status, reply = raw_response(app_server, headers)  # not a byte of the body sent
    assert status == 413 and reply == {
        "error_code": "REQUEST_LIMIT_EXCEEDED",
        "message": f"request body is {limit + 1} bytes; at most {limit} bytes per request (serve.max_request_bytes)"}

    # A chunked body declares no length: cut off once past the limit.
    host, port = app_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/invocations", body=(b"x" * MiB for _ in range(40)), encode_chunked=True,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413, response.read()
    assert json.loads(response.read())["message"] == (f"request body is over {limit} bytes; at most {limit} bytes "
                                                      "per request (serve.max_request_bytes)")
    connection.close()
    assert time.monotonic() - started < 120
    assert_answers_good_request(app_server, deployed)


def test_on_sigterm_the_requests_waiting_in_a_batch_are_answered_before_the_server_exits(deployed):
    """Graceful shutdown is uvicorn's: it stops accepting, lets the requests in flight finish, then exits.
    The batcher holds no thread of its own that could keep the worker alive or die in the middle of a pass."""
    port = services.free_port()
    cmd = [sys.executable, "-m", "sicot.serving_app", "--model", "models:/sicot@champion", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = deployed.env | {"SERVING_MODEL_CONFIG": json.dumps({"max_wait_ms": 4000})}  # a batch waits 4 s for company
    service = services.start_process("sicot-serving-app-shutdown", cmd, deployed.root / "shutdown.log", env,
                                     cwd=deployed.root, unset=FOREIGN)
    service.url = f"http://127.0.0.1:{port}"
    replies = []
    try:
        services.wait_healthy(service, service.url + "/ping", timeout=240)
        body = split_body([b64(deployed.image(deployed.test[0]))])
        clients = [threading.Thread(target=lambda: replies.append(post(service, body))) for _ in range(3)]
        for client in clients:
            client.start()
        time.sleep(1.5)  # the three are in one batch now, waiting for more
        service.proc.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(timeout=60)
        service.proc.wait(60)
    finally:
        services.stop(service)
    assert [status for status, _ in replies] == [200] * 3, f"{replies}" + services.tails(service)
    assert all(reply["predictions"][0]["status"] != "error" for _, reply in replies), replies
    log = service.log_tail()
    assert "Finished server process" in log and "Traceback" not in log, log
    # uvicorn re-raises the signal it handled once it has shut down, so the exit is SIGTERM's
    assert service.proc.returncode == -signal.SIGTERM


def test_the_serving_app_refuses_a_request_over_the_pixel_budget(app_server, deployed):
    status, reply = post(app_server, split_body([b64(flat_png(4000, 4000))] * 5))
    assert status == 400 and reply["message"] == ("5 images of 80000000 pixels in all; at most 64000000 pixels per "
                                                  "request (serve.max_request_pixels)")
    assert_answers_good_request(app_server, deployed)
