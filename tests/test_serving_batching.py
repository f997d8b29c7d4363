"""Requests from many clients share forward passes: concurrent `Recognition.recognise` calls run in fewer
forward passes than requests and get the answers they get alone, a bad image fails only its own request,
and the per-request limits still hold; below that, the batcher (`sicot.batching`) under threads: batch
sizes, waiting, failures, and no thread of its own. (Through MLflow's scoring app: tests/test_serving.py.)

A small untrained recognizer (resnet18 at 16 px, 6 classes) and no index: answers carry SKU ids and scores.
"""
from __future__ import annotations

import threading
import time

import pytest

from sicot.batching import Batcher, BatchError
from tests.tiny_service import random_photos, save_random_recognizer

CLASSES = [f"SKU{i:03d}" for i in range(6)]


def call_together(calls: list) -> list:
    """Run the zero-argument `calls` in threads started together; their results (or exceptions), in order."""
    out, start = [None] * len(calls), threading.Barrier(len(calls))

    def run(i):
        start.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - handed back for the test to look at
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return out


# ---- the batcher ---------------------------------------------------------------------------------

def doubling(sizes: list[int]):
    """A batch function that doubles each item and records each batch's size."""
    def fn(items):
        sizes.append(len(items))
        return [2 * item for item in items]
    return fn


def test_concurrent_callers_share_one_call_and_each_gets_its_own_results():
    sizes = []
    batcher = Batcher(doubling(sizes), max_batch=8, max_wait_s=30)  # the batch fills long before the wait ends
    results = call_together([lambda i=i: batcher([i, 10 + i]) for i in range(4)])
    assert results == [[2 * i, 20 + 2 * i] for i in range(4)]
    assert sizes == [8]


def test_a_call_larger_than_max_batch_runs_in_batches_of_at_most_max_batch():
    sizes = []
    assert Batcher(doubling(sizes), max_batch=4, max_wait_s=0)(list(range(10))) == [2 * i for i in range(10)]
    assert sizes == [4, 4, 2]


def test_an_idle_batcher_waits_at_most_max_wait_for_company():
    for wait in (0.0, 0.2):
        started = time.perf_counter()
        assert Batcher(doubling([]), max_batch=8, max_wait_s=wait)([1]) == [2]
        assert wait <= time.perf_counter() - started < wait + 5


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs():
    def fn(items):
        if "bad" in items:
            raise ValueError("cannot run bad")
        return [item.upper() for item in items]

    batcher = Batcher(fn, max_batch=2, max_wait_s=30)
    results = call_together([lambda: batcher(["bad"]), lambda: batcher(["good"])])
    assert all(isinstance(r, BatchError) and "cannot run bad" in str(r) for r in results), results
    assert isinstance(results[0].__cause__, ValueError)
    assert batcher(["good", "fine"]) == ["GOOD", "FINE"]


def test_the_batcher_starts_no_thread():
    before = set(threading.enumerate())
    batcher = Batcher(doubling([]), max_batch=4, max_wait_s=0.01)
    call_together([lambda: batcher([1, 2, 3])] * 3)
    assert set(threading.enumerate()) == before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Batcher(doubling([]), max_batch=0, max_wait_s=0)


# ---- the service ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return save_random_recognizer(str(tmp_path_factory.mktemp("model") / "model.pt"), CLASSES, 8)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return random_photos(8)


@pytest.fixture
def forward_sizes(monkeypatch) -> list[int]:
    """The batch size of every forward pass from now on."""
    from sicot.model.recognizer import Recognizer

    sizes, real = [], Recognizer.topk_and_embed
    monkeypatch.setattr(Recognizer, "topk_and_embed", lambda self, x, k: sizes.append(len(x)) or real(self, x, k))
    return sizes


def service(model_file: str, **limits):
    from sicot.serving import Recognition

    # Every class scored in every answer; a long wait so that the threads of a test surely meet in one batch.
    return Recognition(model_file, None, top_k=len(CLASSES), min_score=0.0, **{"max_wait_ms": 30_000} | limits)


def assert_same_answers(together: list[dict], alone: list[dict]) -> None:
    """The same SKUs in the same order with the same scores. A batch's convolutions may sum in another order
    than a single image's, moving a probability by about 1e-8: at most one step of the 6 decimals kept."""
    assert [a["status"] for a in together] == [a["status"] for a in alone]
    for t, a in zip(together, alone):
        assert [m["sku"] for m in t["matches"]] == [m["sku"] for m in a["matches"]]
        assert [m["score"] for m in t["matches"]] == pytest.approx([m["score"] for m in a["matches"]], abs=1.01e-6)


def test_concurrent_requests_share_forward_passes_and_get_the_answers_they_get_alone(model_file, photos,
                                                                                    forward_sizes):
    requests = [photos[i:i + 1 + i % 3] for i in range(6)]  # one to three images each
    alone = [service(model_file, max_wait_ms=0).recognise(images) for images in requests]
    assert forward_sizes == [len(images) for images in requests]
    forward_sizes.clear()

    shared = service(model_file, max_batch=sum(map(len, requests)))
    together = call_together([lambda images=images: shared.recognise(images) for images in requests])
    assert forward_sizes == [sum(map(len, requests))]  # one pass for six requests
    for t, a in zip(together, alone):
        assert_same_answers(t, a)


def test_a_bad_image_fails_only_its_own_request_and_image(model_file, photos, forward_sizes):
    requests = [[photos[0], b"not an image", photos[1]], [photos[2]], [photos[3], photos[4]]]
    shared = service(model_file, max_batch=5)
    together = call_together([lambda images=images: shared.recognise(images) for images in requests])
    assert forward_sizes == [5]  # every good image, the bad one decoded by nobody
    assert together[0][1]["status"] == "error" and together[0][1]["error"].startswith("image 1: ")
    assert [a["status"] for answers in together for a in answers].count("error") == 1
    alone = service(model_file, max_wait_ms=0)
    for answers, images in zip(together, requests):
        assert_same_answers(answers, alone.recognise(images))


def test_per_request_limits_hold_while_requests_are_batched(model_file, photos, forward_sizes):
    from sicot.serving import RequestError

    shared = service(model_file, max_images=4, max_request_pixels=3 * 24 * 24 + 100, max_batch=2, max_wait_ms=0)
    results = call_together([lambda: shared.recognise(photos[:5]),  # over max_images
                             lambda: shared.recognise(photos[:4]),  # over max_request_pixels
                             lambda: shared.recognise(photos[:3])])
    assert isinstance(results[0], RequestError) and "at most 4 (serve.max_images)" in str(results[0])
    assert isinstance(results[1], RequestError) and "serve.max_request_pixels" in str(results[1])
    assert [a["status"] for a in results[2]] == ["ok"] * 3
    assert forward_sizes == [2, 1]  # at most max_batch images a pass; nothing from the refused requests
