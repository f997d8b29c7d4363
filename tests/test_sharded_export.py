"""A class-sharded classifier stays sharded after training: per-rank shard files, scoring W a block at a
time under a memory setting, the same answers as the one-file model, and bad shard sets named."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sicot.data.prepared import load_prepared
from sicot.model.block_topk import blockwise_topk
from sicot.model.recognizer import Recognizer, RecognizerError
from tests.parallel_workers import EXPORT_CLASSES, export_sharded, free_port

TINY_MB = 200 / 2**20  # 200 bytes: W (11 x 8 floats) does not fit; a block is a few rows


def images(n: int = 6, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_topk(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert torch.equal(a[1], b[1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The 2-rank export (models/baseline/) and the one-file model of the same weights (reference.pt)."""
    root = tmp_path_factory.mktemp("export")
    mp.start_processes(export_sharded, args=(2, free_port(), str(root)), nprocs=2, start_method="spawn")
    outcomes = [json.loads(Path(root, f"export-{rank}.json").read_text()) for rank in range(2)]
    errors = [o["error"] for o in outcomes if "error" in o]
    assert not errors, "\n".join(errors)
    assert outcomes[0]["classifier_shards"] == [str(root / "models/baseline" / f"model-classifier-{r}-of-2.pt")
                                                 for r in range(2)]
    return root


def model_pt(root: Path) -> str:
    return str(root / "models/baseline/model.pt")


def test_each_rank_writes_its_own_rows_without_gathering(exported):
    ranges = [json.loads(Path(exported, f"export-{rank}.json").read_text())["class_range"] for rank in range(2)]
    assert ranges == [[0, 6], [6, EXPORT_CLASSES]]
    reference = Recognizer.load(str(exported / "reference.pt")).weight
    for rank, (lo, hi) in enumerate(ranges):
        shard = torch.load(exported / f"models/baseline/model-classifier-{rank}-of-2.pt", weights_only=True)
        assert shard["rows"] == [lo, hi] and shard["world_size"] == 2
        torch.testing.assert_close(shard["weight"], reference[lo:hi], rtol=0, atol=1e-6)
    header = torch.load(model_pt(exported), weights_only=True)
    assert "weight" not in header["state_dict"] and len(header["classifier"]["shards"]) == 2


@pytest.mark.parametrize("limit_mb", [None, TINY_MB], ids=["loaded-whole", "block-by-block"])
def test_the_sharded_model_predicts_what_the_one_file_model_does(exported, limit_mb):
    sharded = Recognizer.load(model_pt(exported), max_classifier_mb=limit_mb)
    assert (sharded.weight is None) == (limit_mb is not None)
    reference = Recognizer.load(str(exported / "reference.pt"))
    batch = images()
    assert_same_topk(sharded.topk(batch, 4), reference.topk(batch, 4))
    scores, classes, features = sharded.topk_and_embed(batch, EXPORT_CLASSES + 5)  # k over C is capped
    assert_same_topk((scores, classes), reference.topk(batch, EXPORT_CLASSES))
    torch.testing.assert_close(features, reference.embed(batch))


def test_consolidation_writes_the_one_file_model(exported, tmp_path):
    from sicot.model.consolidate import main

    assert main([model_pt(exported), str(tmp_path / "one.pt")]) == 0
    one = Recognizer.load(str(tmp_path / "one.pt"))
    torch.testing.assert_close(one.weight, Recognizer.load(str(exported / "reference.pt")).weight, rtol=0, atol=1e-6)
    assert torch.load(tmp_path / "one.pt", weights_only=True)["format"] == "sicot.recognizer/1"


def test_blockwise_topk_equals_the_full_softmax():
    gen = torch.Generator().manual_seed(0)
    weight, features = torch.randn(37, 5, generator=gen), torch.randn(9, 5, generator=gen) * 3
    full = torch.softmax(features @ weight.T, dim=-1).topk(4, dim=-1)
    for rows in (1, 2, 7, 36, 37, 100):
        blocks = ((lo, weight[lo:lo + rows]) for lo in range(0, 37, rows))
        assert_same_topk(blockwise_topk(features, blocks, 4, 37), full)
    assert blockwise_topk(features, [(0, weight)], 50, 37)[1].shape == (9, 37)


def test_a_one_file_model_over_the_limit_is_scored_from_its_file(exported):
    whole = Recognizer.load(str(exported / "reference.pt"))
    streamed = Recognizer.load(str(exported / "reference.pt"), max_classifier_mb=TINY_MB)
    assert streamed.weight is None and len(streamed.stored_weight.files) == 1
    batch = images()
    assert_same_topk(streamed.topk(batch, 3), whole.topk(batch, 3))
    with pytest.raises(RecognizerError, match="block by block"):
        streamed(batch)


def test_the_service_answers_the_same_under_any_classifier_limit(exported):
    from sicot.serving import Recognition
    from tests.test_model import png

    uploads = [png("RGB"), png("L")]
    answers = [Recognition(model_pt(exported), None, top_k=3, min_score=0.0, max_classifier_mb=limit
                           ).recognise(uploads) for limit in (4096.0, TINY_MB)]
    assert answers[0] == answers[1] and answers[0][0]["matches"]


def test_the_logged_service_carries_the_shards(exported, tmp_path, monkeypatch):
    import mlflow

    from sicot.config import Params
    from sicot.serving import log_service

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = Params.from_dict({"paths": {"index": str(tmp_path / "index")}})
    # An explicit experiment of this store: an active experiment set by an earlier test names another store's.
    with mlflow.start_run(experiment_id=mlflow.create_experiment("sharded-service")):
        info = log_service(model_pt(exported), params)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download")))
    served = Recognizer.load(str(local / "artifacts/model.pt"), max_classifier_mb=TINY_MB)
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == \
        ["model-classifier-0-of-2.pt", "model-classifier-1-of-2.pt", "model.pt"]
    assert_same_topk(served.topk(images(), 3), Recognizer.load(str(exported / "reference.pt")).topk(images(), 3))


# --- bad shard sets --------------------------------------------------------------------------------

def copy_model(exported: Path, dst: Path, change=None) -> str:
    """The sharded model copied to `dst`, its model.pt's classifier entry passed through `change`."""
    dst.mkdir()
    for f in (exported / "models/baseline").glob("*.pt"):
        (dst / f.name).write_bytes(f.read_bytes())
    if change:
        blob = torch.load(dst / "model.pt", weights_only=True)
        change(blob["classifier"])
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        (dst / "model.pt").write_bytes(buffer.getvalue())
    return str(dst / "model.pt")


def set_rows(index, rows):
    def change(layout):
        layout["shards"][index]["rows"] = rows
    return change


@pytest.mark.parametrize("change,message", [
    (set_rows(1, [5, EXPORT_CLASSES]), r"model-classifier-1-of-2\.pt starts at row 5 .* the shards overlap"),
    (set_rows(1, [7, EXPORT_CLASSES]), r"model-classifier-1-of-2\.pt starts at row 7 .* the shards leave a gap"),
    (set_rows(1, [6, 10]), r"model\.pt: the classifier shards end at row 10, the model has 11 classes"),
    (lambda layout: layout.update(world_size=3), r"model\.pt: lists 2 classifier shard\(s\) for 3 ranks"),
    (lambda layout: layout.update(export="another"), r"model-classifier-0-of-2\.pt: written by another export"),
], ids=["overlap", "gap", "short", "count", "export"])
def test_a_bad_shard_layout_is_named(exported, tmp_path, change, message):
    with pytest.raises(RecognizerError, match=message):
        Recognizer.load(copy_model(exported, tmp_path / "m", change))


def test_a_missing_or_foreign_shard_is_named(exported, tmp_path):
    missing = copy_model(exported, tmp_path / "missing")
    Path(tmp_path / "missing/model-classifier-1-of-2.pt").unlink()
    with pytest.raises(RecognizerError, match=r"model-classifier-1-of-2\.pt: classifier shard missing \(.*model\.pt"):
        Recognizer.load(missing, max_classifier_mb=TINY_MB)

    three = copy_model(exported, tmp_path / "three")
    shard = torch.load(tmp_path / "three/model-classifier-0-of-2.pt", weights_only=True) | {"world_size": 3}
    torch.save(shard, tmp_path / "three/model-classifier-0-of-2.pt")
    with pytest.raises(RecognizerError, match=r"model-classifier-0-of-2\.pt: a shard of 3 ranks, the model lists 2"):
        Recognizer.load(three)

    damaged = copy_model(exported, tmp_path / "damaged")
    Path(tmp_path / "damaged/model-classifier-0-of-2.pt").write_bytes(b"not a torch file")
    with pytest.raises(RecognizerError, match=r"model-classifier-0-of-2\.pt: the classifier shard is damaged"):
        Recognizer.load(damaged)


@pytest.mark.slow
def test_a_two_rank_training_run_exports_and_logs_a_sharded_model(tiny_world, tmp_path):
    """torchrun, 2 ranks, class-sharded SICoT with title-word rows (class means plus title words): each training
    photo is counted once, the model directory and the MLflow run hold model.pt and both shards, and evaluation
    under a tiny memory setting scores what the consolidated model scores."""
    import mlflow

    from sicot.evaluate import evaluate_model_file
    from sicot.model.consolidate import consolidate
    from tests.torchrun_nodes import train_on_nodes

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tiny_world.params(tmp_path, "train.mode=sicot", "train.fc=sharded",
                               "train.classifier_rows=title_words", "train.title_words_weight=0.3", "train.epochs=1")
    node, = train_on_nodes(params, [tmp_path / "node"], nproc_per_node=2, track=True,
                           env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert node.returncode == 0, node.stderr[-3000:]
    photos = len(load_prepared(params.paths.prepared).train)
    assert f"class means of {photos} training photos plus 0.3 x their title words (0 classes without" in node.stderr
    out = tmp_path / "models/sicot"
    shards = ["model-classifier-0-of-2.pt", "model-classifier-1-of-2.pt"]
    assert all((out / name).is_file() for name in shards)

    mlflow.set_tracking_uri(tracking_uri)
    run, = mlflow.search_runs(search_all_experiments=True, output_format="list")
    logged = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "model")}
    assert {"model.pt", *shards} <= logged

    consolidate(str(out / "model.pt"), str(tmp_path / "one.pt"))
    params.evaluate.max_classifier_mb = TINY_MB
    sharded = evaluate_model_file(str(out / "model.pt"), params)
    assert sharded == evaluate_model_file(str(tmp_path / "one.pt"), params)
