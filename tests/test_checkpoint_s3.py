"""Training whose state lives in S3 (a real SeaweedFS server), as on a cluster where each step is its own
pod and pods share no disk: checkpoints outlive the processes that wrote them and resume exactly."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sicot import storage, torchfile
from sicot.train import run_training
from tests.test_train import assert_same_weights, metrics, weights
from tests.torchrun_nodes import train_on_nodes

pytestmark = pytest.mark.services


def history_of(outputs_dir: str) -> list:
    return json.loads(storage.read_text(storage.join(outputs_dir, "history.json")))


def classifier_dirs(outputs_dir: str) -> list[str]:
    """Classifier directories that hold objects (SeaweedFS also lists a prefix emptied by deletes)."""
    names = {key[len(outputs_dir) + 1:].split("/")[0] for key in storage.list_keys(outputs_dir)}
    return sorted(name for name in names if name.startswith("classifier-"))


def wait_for(uri: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not storage.exists(uri) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_resume_from_s3_after_sigkill_ends_like_an_uninterrupted_run(tiny_world, s3_bucket, tmp_path, monkeypatch):
    """One process, class-sharded classifier (DCP) and checkpoint.pt both in S3; killed after its first
    checkpoint, resumed from S3 by another process: the weights equal an uninterrupted run's, and the
    model in S3 is also what the resumed run logged to MLflow."""
    from mlflow.artifacts import download_artifacts

    setup = ("train.mode=sicot", "train.fc=sharded", "train.epochs=3")
    reference = run_training(tiny_world.params(tmp_path / "reference", *setup), track=False)

    params = tiny_world.params(tmp_path, *setup, f"paths.models={s3_bucket}/models")
    out = f"{s3_bucket}/models/sicot"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), allow_unicode=True))
    proc = subprocess.Popen([sys.executable, "-m", "components.train_model", "--no-track"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(storage.join(out, "checkpoint.pt"), proc, timeout=180)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    done = torchfile.load(storage.join(out, "checkpoint.pt"), "training checkpoint")["epoch"]
    assert 1 <= done < 3 and not storage.exists(storage.join(out, "model.pt"))

    # What a kill in the middle of a sharded save leaves: a directory that checkpoint.pt does not name.
    storage.write_bytes(storage.join(out, f"classifier-{done + 1}-killed00", "__0_0.distcp"), b"half a shard")
    params.train.resume = True
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    resumed = run_training(params, track=True)
    assert resumed["model"] == storage.join(out, "model.pt")
    logged = download_artifacts(run_id=resumed["run_id"], artifact_path=resumed["model_artifact"],
                                dst_path=str(tmp_path / "fetched"))
    assert Path(logged).read_bytes() == storage.read_bytes(resumed["model"])
    assert metrics(history_of(out)) == metrics(json.loads(Path(reference["history"]).read_text()))
    assert_same_weights(weights(resumed["model"]), weights(reference["model"]))
    named = torchfile.load(storage.join(out, "checkpoint.pt"), "training checkpoint")["classifier_dir"]
    assert classifier_dirs(out) == [named]  # earlier epochs and the killed run's leftovers are gone


def upload_tree(local: Path, uri: str) -> None:
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes())


def copy_tree(source: str, dest: str) -> None:
    for key in storage.list_keys(source):
        storage.write_bytes(dest + key[len(source):], storage.read_bytes(key))


@pytest.mark.slow
def test_two_nodes_checkpoint_to_s3_and_resume_exactly_at_any_world_size(tiny_world, s3_bucket, tmp_path):
    """Two torchrun nodes, each in its own empty working directory, class-sharded classifier, data and
    models in S3 only: a run stopped after epoch 1 and resumed on two nodes ends like an uninterrupted
    one; the same checkpoint also resumes in a single process (the classifier re-sharded from 2 to 1)."""
    upload_tree(tiny_world.root / "prepared", f"{s3_bucket}/prepared")
    upload_tree(tiny_world.root / "word2vec", f"{s3_bucket}/word2vec")
    params = tiny_world.params(tmp_path / "unused", "train.mode=sicot", "train.fc=sharded",
                               f"paths.prepared={s3_bucket}/prepared", f"paths.word2vec={s3_bucket}/word2vec")
    full, split, other = (f"{s3_bucket}/{name}" for name in ("full", "split", "other"))

    def on_two_nodes(name, models, *overrides):
        nodes = train_on_nodes(params, [tmp_path / name / "node0", tmp_path / name / "node1"],
                               f"paths.models={models}", *overrides, timeout=240)
        for node in nodes:
            assert node.returncode == 0, f"{node.workdir}: {node.stderr[-3000:]}"
            written = sorted(p.name for p in node.workdir.iterdir())
            assert written == ["params.yaml", "torchrun.err", "torchrun.out"], written  # all state is in S3

    on_two_nodes("full", full, "train.epochs=2")
    on_two_nodes("split", split, "train.epochs=1")
    copy_tree(split, other)
    on_two_nodes("resumed", split, "train.epochs=2", "train.resume=true")
    assert metrics(history_of(f"{split}/sicot")) == metrics(history_of(f"{full}/sicot"))
    assert_same_weights(weights(f"{split}/sicot/model.pt"), weights(f"{full}/sicot/model.pt"))
    assert len(classifier_dirs(f"{split}/sicot")) == 1

    # One process resumes the 2-rank checkpoint: with no epoch left to train, it writes model.pt from the
    # re-sharded state alone, which must be exactly the model the two nodes wrote after epoch 1.
    two_nodes_epoch1 = weights(f"{other}/sicot/model.pt")
    params.paths.models, params.train.resume = other, True
    params.train.epochs = 1
    assert_same_weights(weights(run_training(params, track=False)["model"]), two_nodes_epoch1)
    params.train.epochs = 2
    run_training(params, track=False)
    history = history_of(f"{other}/sicot")
    assert len(history) == 2 and metrics(history[:1]) == metrics(history_of(f"{full}/sicot")[:1])
