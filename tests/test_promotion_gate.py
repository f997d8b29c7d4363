"""The registry gate against embedded MLflow (SQLite): concurrent promotions, forged metrics, an alias
that moves mid-promotion.

One tiny model is trained per module. Its "decoy" copy names, for every photo, a SKU the shop does not
sell (top-1 exactly 0), so which of two candidates is better never depends on training luck. Both live
under one `paths.models` as the `sicot` (good) and `baseline` (decoy) candidates, as two pods sharing a
store would see them.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from tests.test_promotion import write_decoy
from tests.workflow import FOREIGN

NAME = "sicot"
GOOD, DECOY = "sicot", "baseline"  # promote.candidate of each model


@pytest.fixture(scope="module")
def models(tiny_world, tmp_path_factory) -> dict[str, Path]:
    from components import train_model

    root = tmp_path_factory.mktemp("gate-models")
    trained = Path(train_model.run(tiny_world.params(root, "train.mode=baseline"), track=False)["model"])
    good, decoy = root / "good.pt", root / "decoy.pt"
    shutil.copy(trained, good)
    write_decoy(good, decoy)
    return {GOOD: good, DECOY: decoy}


@pytest.fixture
def world(tiny_world, models, tmp_path, monkeypatch):
    """Both candidates trained and evaluated under tmp_path; a fresh embedded registry."""
    import mlflow.models

    from components import evaluate_model

    # Requirement inference imports the model in a fresh interpreter: ~16 s a registration, beside the point here.
    monkeypatch.setattr(mlflow.models, "infer_pip_requirements", lambda *args, **kwargs: ["torch", "torchvision"])
    monkeypatch.chdir(tmp_path)
    for key in FOREIGN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for mode, source in models.items():
        (tmp_path / "models" / mode).mkdir(parents=True)
        shutil.copy(source, tmp_path / "models" / mode / "model.pt")
    params = {mode: tiny_world.params(tmp_path, f"promote.candidate={mode}") for mode in models}
    metrics = evaluate_model.run(params[GOOD], track=False)["models"]
    assert metrics[DECOY]["top1"] == 0.0
    assert metrics[GOOD]["top1"] > 0.0, "the tiny trained model got no test image right"
    return {"params": params, "metrics": metrics, "root": tmp_path}


def registry():
    import mlflow

    from sicot import tracking

    return mlflow.MlflowClient(tracking.tracking_uri())


def aliases() -> dict[str, str]:
    return {alias: str(version) for alias, version in registry().get_registered_model(NAME).aliases.items()}


def on_first_champion_lookup(monkeypatch, hook):
    """Run `hook()` in each thread right after its first lookup of the champion alias."""
    from sicot import tracking

    real, seen = tracking.alias_version, set()

    def alias_version(name, alias):
        found = real(name, alias)
        if alias == "champion" and threading.current_thread().name not in seen:
            seen.add(threading.current_thread().name)
            hook()
        return found

    monkeypatch.setattr(tracking, "alias_version", alias_version)


def test_metrics_file_names_the_bytes_it_describes(world):
    from sicot.evaluate import model_sha256

    for mode in (GOOD, DECOY):
        model_file = world["root"] / "models" / mode / "model.pt"
        assert world["metrics"][mode]["model_sha256"] == model_sha256(str(model_file))
        stored = json.loads((world["root"] / "reports" / mode / "metrics.json").read_text())
        assert stored["model_sha256"] == model_sha256(str(model_file))


def test_forged_metrics_do_not_promote_a_bad_model(world, capsys):
    from components import promote_model
    from sicot.evaluate import model_sha256

    params, good_top1 = world["params"], world["metrics"][GOOD]["top1"]
    assert promote_model.run(params[GOOD])["promote"]
    forged = world["metrics"][GOOD] | {"model": DECOY, "top1": 0.99, "top3": 1.0}
    (world["root"] / "reports" / DECOY / "metrics.json").write_text(json.dumps(forged))

    dry = promote_model.run(params[DECOY], dry_run=True)
    assert not dry["promote"] and dry["candidate_top1"] == 0.0 and "below champion's" in dry["reason"]
    assert "model_sha256" in dry["warning"] and "metrics.json" in dry["warning"]
    assert len(registry().search_model_versions(f"name='{NAME}'")) == 1

    outcome = promote_model.run(params[DECOY])
    assert not outcome["promote"] and outcome["candidate_top1"] == 0.0
    assert outcome["champion_top1"] == pytest.approx(good_top1)
    assert "metrics.json" in outcome["warning"] and "metrics.json" in capsys.readouterr().err
    assert aliases() == {"champion": "1", "challenger": "2"}
    tags = registry().get_model_version(NAME, "2").tags
    assert tags["promotion.decision"] == "rejected" and float(tags["top1"]) == 0.0
    assert tags["model_sha256"] == model_sha256(str(world["root"] / "models" / DECOY / "model.pt"))


@pytest.mark.parametrize("first", [GOOD, DECOY])
def test_concurrent_promotions_leave_the_better_model_champion(world, monkeypatch, first):
    """Each promotion, once it has looked up the champion, waits a while for the other to look it up too,
    so without serialisation both compare against the old champion. When both did, the decoy then lets
    the good model finish first and moves the alias last: the outcome the race used to produce."""
    from components import promote_model

    params = world["params"]
    assert promote_model.run(params[DECOY])["promote"]  # version 1: champion with top-1 0
    looked_up = {mode: threading.Event() for mode in params}
    done = {mode: threading.Event() for mode in params}

    def widen_the_window():
        me = threading.current_thread().name
        other = GOOD if me == DECOY else DECOY
        looked_up[me].set()
        if looked_up[other].wait(timeout=3) and me == DECOY:
            done[GOOD].wait(timeout=120)

    on_first_champion_lookup(monkeypatch, widen_the_window)
    outcomes, errors = {}, []

    def promote(mode):
        try:
            outcomes[mode] = promote_model.run(params[mode])
        except BaseException as exc:
            errors.append(exc)
        finally:
            looked_up[mode].set()
            done[mode].set()

    threads = {mode: threading.Thread(target=promote, args=(mode,), name=mode) for mode in params}
    threads[first].start()
    looked_up[first].wait(timeout=120)
    threads[GOOD if first == DECOY else DECOY].start()
    for thread in threads.values():
        thread.join(timeout=300)
    assert not errors, errors
    assert aliases()["champion"] == str(outcomes[GOOD]["version"])
    second = outcomes[GOOD if first == DECOY else DECOY]
    assert str(second["champion_version"]) == str(outcomes[first]["version"]), "compared against a stale champion"
    tags = registry().get_model_version(NAME, outcomes[DECOY]["version"]).tags
    assert tags["champion.version"] == str(outcomes[DECOY]["champion_version"])


def test_champion_alias_is_resolved_once_and_rechecked_before_it_moves(world, monkeypatch):
    """An operator moves the champion alias mid-promotion: the gate neither evaluates one version while
    recording another, nor moves the alias past the operator's choice without deciding against it."""
    import mlflow.artifacts

    from components import promote_model

    params, good_top1 = world["params"], world["metrics"][GOOD]["top1"]
    assert promote_model.run(params[DECOY])["promote"]  # version 1
    assert promote_model.run(params[GOOD])["promote"]  # version 2
    registry().set_registered_model_alias(NAME, "champion", "1")  # rolled back by hand

    downloads, real_download = [], mlflow.artifacts.download_artifacts

    def download_artifacts(artifact_uri=None, *args, **kwargs):
        downloads.append(artifact_uri)
        return real_download(artifact_uri, *args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_artifacts)
    on_first_champion_lookup(monkeypatch, lambda: registry().set_registered_model_alias(NAME, "champion", "2"))
    outcome = promote_model.run(params[DECOY])  # version 3, top-1 0: promotable over 1, not over 2

    assert not outcome["promote"] and "below champion's" in outcome["reason"]
    assert str(outcome["champion_version"]) == "2" and outcome["champion_top1"] == pytest.approx(good_top1)
    assert aliases() == {"champion": "2", "challenger": "3"}
    tags = registry().get_model_version(NAME, "3").tags
    assert tags["champion.version"] == "2" and float(tags["champion.top1"]) == pytest.approx(good_top1)
    assert not [uri for uri in downloads if "@" in str(uri)], downloads
    assert f"models:/{NAME}/1" in downloads and f"models:/{NAME}/2" in downloads and f"models:/{NAME}/3" in downloads


def test_a_promotion_waits_its_turn_then_gives_up_naming_the_holder(world):
    from components import promote_model
    from sicot.lease import LeaseTimeout, lease

    params = world["params"][GOOD]
    with lease(promote_model.lock_uri(params, NAME), "operator on host-a"):
        with pytest.raises(LeaseTimeout, match="held by operator on host-a"):
            promote_model.run(params, lock_wait_s=0.5)
    assert registry().search_model_versions(f"name='{NAME}'") == []
