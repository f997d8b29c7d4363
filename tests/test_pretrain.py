"""The pretrain step: a visual stream trained on a demo world of other products, which training starts from
with `train.backbone_weights: pretrained`."""
from __future__ import annotations

import json

import pytest
import torch

from components import pretrain_visual
from sicot.config import ConfigError

PRETRAIN = ["train.backbone_weights=pretrained", "pretrain.skus=4", "pretrain.max_images=3", "pretrain.epochs=1"]


def test_training_starts_from_the_pretrained_stream(tiny_world, tmp_path, capsys):
    from sicot.model.backbone import trunk
    from sicot.model.recognizer import Recognizer
    from sicot.train import run_training

    params = tiny_world.params(tmp_path, *PRETRAIN, f"paths.pretrained={tmp_path / 'pretrained'}")
    summary = pretrain_visual.run(params, track=False)
    written = json.loads((tmp_path / "pretrained" / "pretrain.json").read_text())
    assert written == summary and summary["pretrained"] and summary["photos"] == 4 * 3 and summary["epochs"] == 1
    state = torch.load(tmp_path / "pretrained" / "backbone.pt", weights_only=True)
    assert state and not any(key.startswith("fc.") for key in state)  # the ResNet without its head

    # One epoch at learning rate ~0 leaves the convolutions where they started: at the pretrained weights.
    trained = run_training(tiny_world.params(tmp_path, *PRETRAIN, f"paths.pretrained={tmp_path / 'pretrained'}",
                                             "train.mode=baseline", "train.epochs=1", "train.lr=1e-12"), track=False)
    assert f"starting the backbone from {tmp_path / 'pretrained' / 'backbone.pt'}" in capsys.readouterr().err
    resnet = trunk(Recognizer.load(trained["model"]).backbone).state_dict()
    assert torch.allclose(resnet["conv1.weight"], state["conv1.weight"], atol=1e-6)


def test_nothing_to_pretrain_for_another_starting_point(tiny_world, tmp_path):
    params = tiny_world.params(tmp_path, f"paths.pretrained={tmp_path / 'pretrained'}", "train.backbone_weights=")
    summary = pretrain_visual.run(params, track=False)
    assert summary["pretrained"] is False and "train.backbone_weights is ''" in summary["reason"]
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == ["pretrain.json"]  # DVC's output


def test_the_pretraining_world_must_hold_other_products(tiny_world, tmp_path):
    params = tiny_world.params(tmp_path, *PRETRAIN, "pretrain.seed=3", "data.seed=3",
                               f"paths.pretrained={tmp_path / 'pretrained'}")
    with pytest.raises(ConfigError, match="pretrain.seed: 3 is data.seed's"):
        pretrain_visual.run(params, track=False)
    assert not (tmp_path / "pretrained").exists()


def test_training_from_a_missing_pretrained_stream_says_what_to_run(tiny_world, tmp_path):
    from sicot.model.starting_point import StartingPointError
    from sicot.train import run_training

    params = tiny_world.params(tmp_path, "train.backbone_weights=pretrained", f"paths.pretrained={tmp_path / 'none'}")
    with pytest.raises(StartingPointError, match=r"pretrained: .*none/backbone.pt does not exist; run the pretrain "
                                                 r"step first \(python -m components.pretrain_visual\)"):
        run_training(params, track=False)
    assert not (tmp_path / "models").exists()


def test_the_recipe_is_what_the_pretrained_stream_depends_on():
    """Its cache key: the models trained from it and the demo world's own size do not pretrain again."""
    from sicot.config import load_params

    def recipe(*overrides):
        return pretrain_visual.recipe(load_params("params.yaml", overrides))

    same = ("train.epochs=3", "train.lr=0.3", "train.cotrain_weight=0.5", "train.classifier_rows=title_words",
            "train.threads=2", "data.skus=50", "data.imbalance=10", "evaluate.head_threshold=5")
    assert all(recipe(o) == recipe() for o in same)
    other = ("pretrain.epochs=3", "pretrain.lr=0.1", "train.backbone=resnet34", "train.image_size=48", "data.seed=4",
             "data.world=apparel", "train.backbone_weights=", "paths.pretrained=elsewhere")
    assert all(recipe(o) != recipe() for o in other)
