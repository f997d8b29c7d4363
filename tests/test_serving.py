"""The recognition service on a tiny trained model and a published index: directly, and behind a real
`mlflow models serve` process answering HTTP on loopback.

One module-scoped deployment: a tiny world with two new-arrival SKUs (catalog only, never trained on),
a baseline model trained for two epochs, registered as champion in an embedded SQLite MLflow store, and
the product index published for it by `publish_index`, exactly as the pipeline does.
"""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import services
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
        return (Path(self.params.paths.prepared) / record["image"]).read_bytes()

    def recognition(self, **limits):
        """The service with the deployment's serve params, `limits` overriding some of them."""
        from sicot.serving import Recognition

        serve = vars(self.params.serve) | limits
        return Recognition(self.model_file, self.params.paths.index, **serve)


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
              "none", "number"]


def bad_images(good: bytes) -> dict[str, tuple[object, str]]:
    """name -> (value sent in place of an image, words its error must contain)."""
    jpeg = as_jpeg(good)
    return {
        "text": (b"this is a product description, not a photo", "not a recognised image format"),
        "empty": (b"", "empty"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated_png": (good[: len(good) // 2], "image"),
        "bomb_20000x20000": (declared_png(20000, 20000), "too large"),
        "over_max_pixels": (declared_png(5000, 5000), "over the limit"),
        "string": ("aGVsbG8=", "expected image bytes, got str"),
        "none": (None, "expected image bytes, got NoneType"),
        "number": (42, "expected image bytes, got int"),
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
    # Two epochs on six SKUs already put the right SKU in the top 3 more often than not (chance: 1/2).
    hits = sum(r["sku"] in {m["sku"] for m in a["matches"]} for r, a in zip(deployed.test, answers))
    assert hits > len(answers) / 2, hits


def test_a_score_threshold_above_every_score_means_no_match(deployed):
    service = deployed.recognition(min_score=1.01, min_similarity=1.01)
    answers = service.recognise([deployed.image(r) for r in deployed.test[:3] + deployed.holdout[:1]])
    assert [a["status"] for a in answers] == ["no_match"] * 4
    assert all(a["matches"] == [] and a["new_arrivals"] == [] for a in answers)


def test_new_arrivals_are_retrieved_from_the_catalog_by_embedding(deployed):
    new = {sku for sku, r in deployed.catalog.items()} - {r["sku"] for r in deployed.test}
    assert new == {r["sku"] for r in deployed.holdout} and len(new) == 2
    service = deployed.recognition(min_score=0.0, min_similarity=-1.0, top_k=3)
    assert len(service.arrivals) == 2

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
    from sicot.serving import Recognition

    service = Recognition(deployed.model_file, str(deployed.root / "nothing_published_here"), min_score=0.0)
    assert service.index is None and service.arrivals is None
    (answer,) = service.recognise([deployed.image(deployed.holdout[0])])
    assert answer["status"] == "ok" and answer["index_version"] is None and answer["new_arrivals"] == []
    assert all(m["title"] is None and m["sku"] in deployed.catalog for m in answer["matches"])


# ---- the real server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(deployed):
    port = services.free_port()
    cmd = [str(services.BIN / "mlflow"), "models", "serve", "-m", "models:/sicot@champion", "--env-manager", "local",
           "-p", str(port), "--host", "127.0.0.1"]
    env = deployed.env | {"PATH": f"{services.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it execs uvicorn
    service = services.start_process("mlflow-models-serve", cmd, deployed.root / "serve.log", env,
                                     cwd=deployed.root, unset=FOREIGN)
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
    assert "image 1: not a recognised image format" in reply["predictions"][1]["error"]
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
    assert "1000 images in one request; at most 16" in reply["message"]
    assert_answers_good_request(server, deployed)
