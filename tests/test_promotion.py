"""The registry gate against a real `mlflow server` (SQLite store, artifacts proxied to S3 on SeaweedFS).

The client holds no S3 credentials: every model goes up and comes back through the tracking server.
Candidates are made reliably better or worse than each other: a tiny trained model, and a "decoy" built
from it that names, for every photo, a SKU the shop does not sell (top-1 exactly 0).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.workflow import FOREIGN, write_tiny_params

pytestmark = [pytest.mark.services, pytest.mark.slow]

NAME = "sicot"


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_server):
    write_tiny_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    for key in FOREIGN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return tmp_path


def write_decoy(trained: Path, out: Path) -> None:
    """`trained` with one extra class whose score beats every real one for any image: features are
    non-negative (ReLU), real rows are zeroed and the decoy row is all ones."""
    import torch

    from sicot.model.recognizer import Recognizer

    model = Recognizer.load(str(trained))
    weight = torch.cat([torch.zeros_like(model.weight), torch.ones(1, model.weight.shape[1])])
    Recognizer(model.backbone, weight, [*model.classes, "SKU-NOT-SOLD"], model.image_size, model.arch).save(str(out))


def test_champion_moves_only_through_the_gate(workdir, mlflow_server, s3_server):
    import mlflow
    from mlflow.artifacts import download_artifacts

    from components import evaluate_model, prepare_data, pretrain_visual, promote_model, train_model
    from sicot.config import load_params

    params = load_params("params.yaml", ["train.mode=baseline", "train.classifier_rows=trained",
                                         "promote.candidate=baseline"])
    prepare_data.run(params)
    pretrain_visual.run(params)  # the steps by hand, as the pipeline runs them
    model_file = Path(train_model.run(params)["model"])
    good = workdir / "good.pt"
    shutil.copy(model_file, good)
    write_decoy(good, workdir / "decoy.pt")
    client = mlflow.MlflowClient(mlflow_server.url)

    def candidate(path: Path) -> dict:
        shutil.copy(path, model_file)
        return evaluate_model.run(params)["models"]["baseline"]

    def aliases() -> dict[str, str]:
        return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}

    # 1. The first model becomes champion, whatever its numbers.
    decoy_metrics = candidate(workdir / "decoy.pt")
    assert decoy_metrics["top1"] == 0.0
    first = promote_model.run(params)
    assert first["promote"] and str(first["version"]) == "1" and "first model" in first["reason"]
    assert aliases() == {"champion": "1", "challenger": "1"}

    # 2. A better model: --dry-run decides but moves nothing; the real run moves the champion.
    good_metrics = candidate(good)
    assert good_metrics["top1"] > 0.0, "the tiny trained model got no test image right"
    dry = promote_model.run(params, dry_run=True)
    assert dry["promote"] and dry["dry_run"] and str(dry["champion_version"]) == "1" and dry["champion_top1"] == 0.0
    assert aliases() == {"champion": "1", "challenger": "1"}
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    better = promote_model.run(params)
    assert better["promote"] and str(better["version"]) == "2"
    assert aliases() == {"champion": "2", "challenger": "2"}

    # 3. A worse model is registered as challenger only; the decision and its numbers are on the version.
    candidate(workdir / "decoy.pt")
    worse = promote_model.run(params)
    assert not worse["promote"] and str(worse["version"]) == "3"
    assert aliases() == {"champion": "2", "challenger": "3"}
    tags = client.get_model_version(NAME, "3").tags
    assert tags["promotion.decision"] == "rejected"
    assert "below champion's" in tags["promotion.reason"]
    assert float(tags["top1"]) == 0.0
    assert tags["champion.version"] == "2"
    assert float(tags["champion.top1"]) == pytest.approx(good_metrics["top1"])
    # Tags tie the numbers to the bytes that were evaluated: the registered artifacts, fetched back.
    assert tags["model_sha256"] == hashlib.sha256((workdir / "decoy.pt").read_bytes()).hexdigest()
    assert tags["champion.model_sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert client.get_model_version(NAME, "2").tags["promotion.decision"] == "champion"

    # The champion's files come back through the server, byte for byte, and live in the S3 bucket.
    served = next(Path(download_artifacts(f"models:/{NAME}@champion", dst_path=str(workdir / "dl"))).rglob("model.pt"))
    assert served.read_bytes() == good.read_bytes()
    bucket = mlflow_server.artifacts.removeprefix("s3://").split("/")[0]
    keys = [o["Key"] for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert sum(key.endswith("/model.pt") for key in keys) >= 3, keys[:20]
