import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sicot import storage, torchfile
from sicot.model.recognizer import Recognizer
from sicot.model.starting_point import StartingPoint
from sicot.train import (
    TrainError,
    TrainingProcess,
    TrainingSetup,
    build_model,
    fingerprint,
    fused_sgd_supported,
    load_checkpoint,
    load_data,
    make_optimizer,
    resume,
    run_training,
)

REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "images_per_s"}


def metrics(history):
    """Per-epoch numbers without the wall-clock ones."""
    return [{k: v for k, v in epoch.items() if k not in TIMING} for epoch in history]


def weights(model_uri):
    return Recognizer.load(model_uri).state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_runs_with_one_seed_are_identical(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded MLflow store lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = run_training(tiny_world.params(tmp_path / "a", "train.mode=sicot"), track=True)
    second = run_training(tiny_world.params(tmp_path / "b", "train.mode=sicot"), track=False)
    history = json.loads(Path(first["history"]).read_text())
    assert len(history) == 2 and metrics(history) == metrics(json.loads(Path(second["history"]).read_text()))
    assert_same_weights(weights(first["model"]), weights(second["model"]))
    assert {"loss", "visual_loss", "cotrain_loss", "train_top1", "val_top1", "lr"} <= history[0].keys()
    assert history[1]["lr"] == pytest.approx(history[0]["lr"] * 0.8)

    import mlflow

    logged = mlflow.MlflowClient().get_run(first["run_id"])
    assert logged.data.params["train.mode"] == "sicot" and logged.info.run_name == "train_sicot"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(first["run_id"], "val_top1")] == [1, 2]


def test_training_logs_the_model_to_its_mlflow_run(tiny_world, tmp_path, monkeypatch):
    """With tracking on, model.pt, text_encoder.pt and history.json are artifacts of the training run
    under model/, byte for byte what was written to paths.models, and the run is tagged with its mode."""
    import mlflow
    from mlflow.artifacts import download_artifacts

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = run_training(tiny_world.params(tmp_path, "train.mode=sicot", "train.epochs=1"), track=True)
    assert out["model_artifact"] == "model/model.pt"
    client = mlflow.MlflowClient()
    assert client.get_run(out["run_id"]).data.tags["sicot.mode"] == "sicot"
    assert {f.path for f in client.list_artifacts(out["run_id"], "model")} == {
        "model/model.pt", "model/text_encoder.pt", "model/history.json"}
    fetched = download_artifacts(run_id=out["run_id"], artifact_path=out["model_artifact"],
                                 dst_path=str(tmp_path / "fetched"))
    assert Path(fetched).read_bytes() == Path(out["model"]).read_bytes()


def run_cli(params, *extra, **popen):
    path = Path(params.paths.models).parent / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params.to_dict(), allow_unicode=True))
    return subprocess.Popen([sys.executable, "-m", "components.train_model", "--params", str(path), "--no-track",
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tiny_world, tmp_path):
    setup = ("train.mode=sicot", "train.epochs=5")
    reference = run_training(tiny_world.params(tmp_path / "reference", *setup), track=False)

    params = tiny_world.params(tmp_path / "killed", *setup)
    checkpoint = Path(params.paths.models, "sicot", "checkpoint.pt")
    proc = run_cli(params)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done < 5 and not Path(params.paths.models, "sicot", "model.pt").exists()

    params.train.resume = True
    resumed = run_training(params, track=False)
    history = json.loads(Path(resumed["history"]).read_text())
    assert metrics(history) == metrics(json.loads(Path(reference["history"]).read_text()))
    assert_same_weights(weights(resumed["model"]), weights(reference["model"]))


@pytest.fixture(scope="module")
def trained_sicot(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    out = run_training(tiny_world.params(tmp, "train.mode=sicot", "train.epochs=1"), track=False)
    return tmp, out


@pytest.mark.parametrize("override, named", [
    ("train.backbone=resnet34", "backbone: checkpoint 'resnet18', now 'resnet34'"),
    ("train.feature_dim=128", "feature_dim: checkpoint 512, now 128"),
    ("train.text_encoder=mean", "text_encoder"),
    ("train.image_size=24", "image_size"),
])
def test_resume_refuses_a_checkpoint_of_another_config(tiny_world, trained_sicot, override, named):
    tmp, out = trained_sicot
    before = {name: Path(out[name]).read_bytes() for name in ("checkpoint", "model", "history")}
    params = tiny_world.params(tmp, "train.mode=sicot", "train.epochs=2", "train.resume=true", override)
    with pytest.raises(TrainError, match="another configuration") as error:
        run_training(params, track=False)
    assert named in str(error.value)
    assert before == {name: Path(out[name]).read_bytes() for name in before}  # nothing overwritten


def test_checkpoint_of_other_classes_is_named(trained_sicot):
    _, out = trained_sicot
    expected = dict(torch.load(out["checkpoint"], weights_only=True)["fingerprint"], classes=7,
                    classes_sha256="0" * 64)
    with pytest.raises(TrainError, match="classes: checkpoint 6, now 7"):
        load_checkpoint(out["checkpoint"], expected)


class Pickled:
    """Any class at all: what a checkpoint crafted to run code on load would carry."""


@pytest.mark.parametrize("damage, says", [
    (lambda data: data[: len(data) // 2], "damaged or truncated"),
    (lambda data: b"", "damaged or truncated"),
    (lambda data: b"garbage, not a torch file" * 10, "damaged or not a torch file"),
    (lambda data: _torch_bytes({"format": "sicot.checkpoint/1", "payload": Pickled()}), "objects other than tensors"),
])
def test_a_damaged_checkpoint_is_a_clear_error_and_stays_as_it_was(trained_sicot, tmp_path, damage, says):
    _, out = trained_sicot
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(damage(Path(out["checkpoint"]).read_bytes()))
    before = broken.read_bytes()
    with pytest.raises(TrainError) as error:
        load_checkpoint(str(broken), {})
    message = str(error.value)
    assert str(broken) in message and says in message and "train.resume=false" in message
    assert "weights_only=False" not in message  # never advise turning the safety off
    assert broken.read_bytes() == before


def _torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_resume_without_checkpoint_says_so(tiny_world, tmp_path):
    with pytest.raises(TrainError, match="no checkpoint at .*train without resume first"):
        run_training(tiny_world.params(tmp_path, "train.mode=baseline", "train.resume=true"), track=False)
    assert not Path(tmp_path, "models", "baseline", "model.pt").exists()


def write_easy_world(root: Path, per_class: int = 16) -> None:
    """Four visually distinct products (colour and shape) with noisy photos and titles, in the dataset
    contract's format: small enough to learn in a few CPU epochs, so the test isolates the engine."""
    import numpy as np
    from PIL import Image, ImageDraw

    products = [("红色 圆罐 可乐", (200, 30, 30), "ellipse"), ("蓝色 方盒 牛奶", (30, 60, 200), "rectangle"),
                ("绿色 茶饮 瓶装", (30, 160, 60), "triangle"), ("黄色 薯片 袋装", (230, 200, 40), "ring")]
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = {"train": [], "val": [], "test": [], "catalog": []}
    for k, (title, colour, shape) in enumerate(products):
        sku = f"SKU{k}"
        for split, n in (("train", per_class), ("val", 3), ("test", 4), ("catalog", 1)):
            for i in range(n):
                background = tuple(int(c) for c in rng.integers(90, 170, 3))
                img = Image.new("RGB", (32, 32), background)
                draw = ImageDraw.Draw(img)
                x, y, r = *rng.integers(9, 23, 2), int(rng.integers(6, 9))
                fill = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in colour)
                if shape == "ellipse":
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
                elif shape == "rectangle":
                    draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
                elif shape == "triangle":
                    draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
                else:
                    draw.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=3)
                name = f"images/{sku}_{split}_{i}.png"
                img.save(root / name)
                words = title.split() + ["包邮"] * int(rng.integers(0, 2))
                lines[split].append(json.dumps({"image": name, "sku": sku, "title": " ".join(rng.permutation(words)),
                                                "tags": []}, ensure_ascii=False))
    for split, rows in lines.items():
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_trained_models_beat_chance_by_a_wide_margin(tmp_path):
    """Behaviour: a few epochs from scratch on a small world of 4 distinct products (chance = 1/4). Ten
    epochs: with the shipped λ = 2 the co-trained visual stream needs more steps than the baseline (at
    eight it sits on the threshold, where the rounding of one memory layout or another decides)."""
    from components import prepare_data, train_word2vec
    from sicot.config import load_params
    from sicot.evaluate import evaluate_model_file

    write_easy_world(tmp_path / "easy")
    params = load_params(None, [f"data.source={tmp_path / 'easy'}", f"paths.prepared={tmp_path / 'prepared'}",
                                f"paths.word2vec={tmp_path / 'w2v'}", f"paths.models={tmp_path / 'models'}",
                                f"paths.reports={tmp_path / 'reports'}", "train.image_size=32", "train.epochs=10",
                                "train.batch_size=8", "train.lr=0.01", "train.threads=1",
                                "train.cotrain_rampup=2"])  # the ramp scaled to this short schedule
    prepare_data.run(params, track=False)
    train_word2vec.run(params, track=False)
    for mode in ("baseline", "sicot"):
        params.train.mode = mode
        out = run_training(params, track=False)
        test = evaluate_model_file(out["model"], params, name=mode)
        assert test["top1"] >= 0.75, (mode, test)


def test_the_next_season_starts_from_the_registered_model(tiny_world, trained_sicot, tmp_path, monkeypatch):
    """`train.backbone_weights=models:/<name>@<alias>`: last season's visual stream and the classifier rows
    of the SKUs both catalogues hold. `models:/<name>/<version>`, `runs:/<run_id>/model` and the model.pt
    path name the same model."""
    import mlflow

    from sicot import tracking
    from sicot.model.starting_point import load_starting_point
    from sicot.parallel.sharded_classifier import init_rows

    _, first = trained_sicot
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.setup().start_run() as run:
        tracking.log_trained_model([first["model"]])
    client = mlflow.MlflowClient()
    client.create_registered_model("last-season")
    version = client.create_model_version("last-season", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("last-season", "champion", version.version)
    previous = Recognizer.load(first["model"])
    for spec in ("models:/last-season/1", f"runs:/{run.info.run_id}/model", first["model"]):
        assert_same_weights(load_starting_point(spec, "resnet18", 512).previous.state_dict(), previous.state_dict())

    # One epoch at a learning rate too small to move a weight: the run ends where it started.
    out = run_training(tiny_world.params(tmp_path, "train.mode=baseline", "train.epochs=1", "train.lr=1e-9",
                                         "train.backbone_weights=models:/last-season@champion"), track=False)
    started = Recognizer.load(out["model"])
    trained = dict(previous.backbone.named_parameters())
    for name, value in started.backbone.named_parameters():
        torch.testing.assert_close(value, trained[name])
    torch.testing.assert_close(started.weight, previous.weight)
    assert not torch.allclose(previous.weight, init_rows(0, 6, 512, seed=0))  # not where a fresh run starts


def test_channels_last_trains_like_the_default_layout(tiny_world, tmp_path, monkeypatch, capfd):
    """The layout changes only the order of float sums: at a learning rate too small for rounding to grow,
    the same losses. What cannot apply on the CPU is said once and ignored."""
    setup = ("train.mode=baseline", "train.epochs=1", "train.lr=1e-4")
    matmul_precision = torch.get_float32_matmul_precision()
    default = run_training(tiny_world.params(tmp_path / "default", *setup, "train.channels_last=false"), track=False)
    log = capfd.readouterr().err
    assert log.count("train.amp, train.tf32: CUDA only, ignored on cpu") == 1
    assert "train.fused_optimizer" not in log
    assert torch.get_float32_matmul_precision() == matmul_precision

    monkeypatch.setattr("sicot.train.fused_sgd_supported", lambda device: False)
    channels_last = run_training(tiny_world.params(tmp_path / "channels_last", *setup, "train.channels_last=true"),
                                 track=False)
    assert capfd.readouterr().err.count("has no fused SGD for cpu; ignored, its default SGD runs") == 1
    losses = [json.loads(Path(out["history"]).read_text())[0]["loss"] for out in (default, channels_last)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    Recognizer.load(channels_last["model"])  # saved from channels-last weights, loads into the plain layout


def test_fused_sgd_is_picked_per_device(tiny_world, tmp_path):
    assert fused_sgd_supported(torch.device("cpu"))
    assert not fused_sgd_supported(torch.device("meta"))  # a device torch has no fused SGD kernel for
    params = tiny_world.params(tmp_path, "train.mode=baseline", "train.fc=replicated")
    model = build_model(params, load_data(params), StartingPoint(), group=None)
    for fused in (True, False):
        optimizer, _ = make_optimizer(params, model, fused=fused)
        assert [bool(group["fused"]) for group in optimizer.param_groups] == [fused, fused]


def test_resume_keeps_this_runs_sgd_kernel(tiny_world, trained_sicot):
    """Which SGD kernel runs is the resuming run's choice, not state of the checkpoint (written fused)."""
    tmp, out = trained_sicot
    params = tiny_world.params(tmp, "train.mode=sicot", "train.fc=replicated")
    data = load_data(params)
    model = build_model(params, data, StartingPoint(), group=None)
    optimizer, scheduler = make_optimizer(params, model, fused=False)
    saved = torch.load(out["checkpoint"], weights_only=True)["optimizer"]["param_groups"]
    assert all(group["fused"] for group in saved)
    process = TrainingProcess(0, 1, torch.device("cpu"), owns_group=False)
    training = TrainingSetup(params, process, None, model, model.streams, optimizer, scheduler, None, None, None, None)
    epochs, _, _ = resume(training, storage.join(params.paths.models, "sicot"), fingerprint(params, model, data))
    assert epochs == 1 and not any(group["fused"] for group in optimizer.param_groups)


@pytest.mark.parametrize("tf32, precision", [(True, "high"), (False, "highest")])
def test_tf32_is_set_for_a_cuda_device(tiny_world, tmp_path, tf32, precision):
    """What the engine sets for a GPU run (process-wide switches, which need no GPU to be set)."""
    from sicot.train import configure_backends

    params = tiny_world.params(tmp_path, f"train.tf32={str(tf32).lower()}")
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    try:
        assert configure_backends(params, torch.device("cuda")) == []
        assert torch.get_float32_matmul_precision() == precision and torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before[1:3]
        torch.use_deterministic_algorithms(before[3], warn_only=True)


def test_class_means_are_the_exported_rows(tiny_world, tmp_path):
    """`train.classifier_rows: class_means`: each exported row is the class's mean normalised feature of its
    unaugmented training photos, at the mean norm of the trained rows the checkpoint keeps."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from sicot.data.dataset import ProductImages, collate
    from sicot.data.prepared import load_prepared
    from sicot.data.stream import ShardStream

    params = tiny_world.params(tmp_path, "train.mode=baseline", "train.classifier_rows=class_means", "train.epochs=1")
    out = run_training(params, track=False)
    recognizer = Recognizer.load(out["model"])
    trained = torchfile.load(out["checkpoint"], "checkpoint")["model"]["classifier.weight"]
    manifest = load_prepared(params.paths.prepared)
    index = {sku: i for i, sku in enumerate(recognizer.classes)}
    stream = ShardStream(ProductImages(index, params.train.image_size), manifest.root, manifest.shards["train"], 64)
    with torch.no_grad():
        batches = [(recognizer.backbone(b["image"]), b["label"]) for b in DataLoader(stream, 64, collate_fn=collate)]
    features, labels = (torch.cat(parts) for parts in zip(*batches))
    assert torch.bincount(labels, minlength=len(index)).min() > 0
    means = torch.zeros(len(index), features.shape[1]).index_add_(0, labels, F.normalize(features, dim=-1))
    expected = F.normalize(means, dim=1) * trained.norm(dim=1).mean()
    torch.testing.assert_close(recognizer.state_dict()["weight"], expected, rtol=1e-4, atol=1e-5)
    # The evaluation's post-hoc class means of a trained W (the comparison's strongest baseline) are these rows.
    from sicot.evaluate import class_mean_weight

    recognizer.weight = trained.float()
    torch.testing.assert_close(class_mean_weight(recognizer, manifest, 64, torch.device("cpu")), expected,
                               rtol=1e-4, atol=1e-5)


def test_title_word_rows_are_the_class_means_plus_what_their_words_look_like(tiny_world, tmp_path):
    """`train.classifier_rows: title_words` on the visual-only baseline: each exported row is the class mean
    plus train.title_words_weight x its title words' detectors, by the textbook formula over the unaugmented
    training photos' features and titles (tests/parallel_workers.py checks the same on 1-3 ranks)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from sicot.data.dataset import ProductImages, collate
    from sicot.data.prepared import load_prepared
    from sicot.data.stream import ShardStream
    from sicot.model.title_words import RIDGE
    from sicot.text.word2vec import Vocabulary
    from tests.parallel_workers import title_word_rows_reference

    params = tiny_world.params(tmp_path, "train.mode=baseline", "train.classifier_rows=title_words",
                               "train.title_words_weight=0.5", "train.epochs=1")
    out = run_training(params, track=False)
    recognizer = Recognizer.load(out["model"])
    trained = torchfile.load(out["checkpoint"], "checkpoint")["model"]["classifier.weight"]
    manifest = load_prepared(params.paths.prepared)
    vocab = Vocabulary.load(params.paths.word2vec)
    index = {sku: i for i, sku in enumerate(recognizer.classes)}
    images = ProductImages(index, params.train.image_size, encode_title=lambda t: vocab.encode(t, 32))
    stream = ShardStream(images, manifest.root, manifest.shards["train"], 64)
    with torch.no_grad():
        batches = [(recognizer.backbone(b["image"]), b["label"], F.pad(b["tokens"], (0, 32 - b["tokens"].shape[1])))
                   for b in DataLoader(stream, 64, collate_fn=collate)]
    features, labels, tokens = (torch.cat(parts) for parts in zip(*batches))
    means = torch.zeros(len(index), features.shape[1]).index_add_(0, labels, F.normalize(features, dim=-1))
    attributes = title_word_rows_reference(features, labels, tokens, len(index), len(vocab), RIDGE)
    assert attributes.norm(dim=1).min() > 0  # every class has words whose detectors move its row
    expected = (F.normalize(means, dim=1) + 0.5 * attributes) * trained.norm(dim=1).mean()
    torch.testing.assert_close(recognizer.state_dict()["weight"], expected, rtol=1e-3, atol=5e-4)


def test_without_a_cotraining_loss_titles_enter_through_the_rows_only(tiny_world, tmp_path):
    """`train.mode: sicot` with λ = 0 builds no title stream (it would learn nothing): the model is the
    visual-only baseline's, bit for bit, with title-word rows, and no text encoder is written."""
    rows = ("train.classifier_rows=title_words", "train.epochs=1")
    sicot = run_training(tiny_world.params(tmp_path / "sicot", "train.mode=sicot", "train.cotrain_weight=0", *rows),
                         track=False)
    baseline = run_training(tiny_world.params(tmp_path / "baseline", "train.mode=baseline", *rows), track=False)
    assert "text_encoder" not in sicot and not list((tmp_path / "sicot").rglob("text_encoder.pt"))
    ours, theirs = Recognizer.load(sicot["model"]), Recognizer.load(baseline["model"])
    assert torch.equal(ours.weight, theirs.weight)
    assert all(torch.equal(a, b) for a, b in zip(ours.backbone.state_dict().values(),
                                                 theirs.backbone.state_dict().values()))
    assert "cotrain_loss" not in json.loads(Path(sicot["history"]).read_text())[0]


def test_title_word_rows_without_word_vectors_fail_before_training(tiny_world, tmp_path):
    """The visual-only baseline needs no word vectors, except for title-word rows: then their absence is
    named before any epoch runs, and nothing is written."""
    from sicot.text.word2vec import VocabularyError

    params = tiny_world.params(tmp_path, "train.mode=baseline", "train.classifier_rows=title_words",
                               f"paths.word2vec={tmp_path / 'nowhere'}")
    with pytest.raises(VocabularyError, match="nowhere: no word vectors here .* run train_word2vec first"):
        run_training(params, track=False)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.pt"))


def test_the_exported_image_only_model_predicts_what_training_scored(tiny_world, tmp_path):
    """The deployed model has no titles: the backbone and W of a SICoT run predict the validation split
    exactly as the training run scored it."""
    from sicot.data.dataset import ProductImages
    from sicot.data.prepared import load_prepared
    from sicot.data.stream import ShardStream
    from sicot.evaluate import predict

    params = tiny_world.params(tmp_path, "train.mode=sicot")
    out = run_training(params, track=False)
    recognizer = Recognizer.load(out["model"])
    manifest = load_prepared(params.paths.prepared)
    index = {sku: i for i, sku in enumerate(recognizer.classes)}
    val = ShardStream(ProductImages(index, params.train.image_size), manifest.root, manifest.shards["val"], 64)
    top, labels = predict(recognizer, val, 64, torch.device("cpu"), k=1)
    history = json.loads(Path(out["history"]).read_text())
    assert (top[:, 0] == labels).mean() == pytest.approx(history[-1]["val_top1"])
