"""Pretrain the visual stream on a demo world of other products, for `train.backbone_weights: pretrained`.

The world is the demo world's generator (`data.*`) with `pretrain.seed` (other brands and products than
`data.seed`'s) and `pretrain.skus` products of `pretrain.max_images` photos each; the visual stream alone is
trained on it with the `train` section's architecture and optimiser for `pretrain.epochs`. It stands in for the
checkpoint a catalogue is trained from (last season's model, ImageNet weights at 224 px): training from it is
the regime where title-word rows pay (docs/method.md). Writes `paths.pretrained/backbone.pt` (the ResNet's
state_dict) and then `pretrain.json`; the world and its model live in a temporary directory.
With any other `train.backbone_weights` it trains nothing and writes only `pretrain.json`, saying so.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import sys
import tempfile
import time

from sicot import storage
from sicot.config import PRETRAINED, ConfigError, Params, runtime


def world_overrides(params: Params) -> dict[str, dict]:
    """What the pretraining run sets over the params: the world's seed and sizes (every product as many
    photos), and a visual-only training with trained rows from random weights on the pretrain schedule."""
    pretrain = params.pretrain
    return {"data": {"source": "synthetic", "seed": pretrain.seed, "skus": pretrain.skus,
                     "max_images": pretrain.max_images, "imbalance": 1.0, "profile": "exponential",
                     "val_per_class": 2, "test_per_class": 1, "holdout_skus": 0},
            "train": {"mode": "baseline", "classifier_rows": "trained", "backbone_weights": "",
                      "logit_adjust_tau": 0.0, "epochs": pretrain.epochs, "lr": pretrain.lr,
                      "lr_gamma": pretrain.lr_gamma, "resume": False, "nproc": 1,
                      "threads": 0}}  # it runs before the trainings, alone: every core


# Read by a visual-only run without effect.
TITLES_ONLY = {("train", key) for key in ("text_encoder", "max_title_len", "cotrain_weight", "cotrain_rampup",
                                          "title_words_weight")}


def recipe(params: Params) -> dict:
    """What the pretrained stream depends on (the Prefect task's cache key, dvc.yaml's params of the
    stage): the pretrain section, the data and train keys the run does not set itself, except those that
    only change how it runs, and where it writes. data.seed and train.backbone_weights count: they decide
    whether it may run and must."""
    settings, overridden = params.to_dict(), world_overrides(params)
    decisive = {"data": {"seed"}, "train": {"backbone_weights"}}
    kept = {section: {key: value for key, value in settings[section].items()
                      if (key not in overridden[section] or key in decisive[section])
                      and not runtime(section, key) and (section, key) not in TITLES_ONLY}
            for section in ("data", "train")}
    return {"pretrain": settings["pretrain"], **kept, "paths": {"pretrained": params.paths.pretrained}}


def world_params(params: Params, root: str) -> Params:
    """The pretraining run's params, every location under `root` (values already checked: set, not parsed)."""
    world = copy.deepcopy(params)
    for section, values in world_overrides(params).items():
        for key, value in values.items():
            setattr(getattr(world, section), key, value)
    world.paths = dataclasses.replace(world.paths, raw=f"{root}/raw", prepared=f"{root}/prepared",
                                      models=f"{root}/models", reports=f"{root}/reports")
    return world


def run(params: Params, track: bool = True) -> dict:
    out = params.paths.pretrained
    summary_uri = storage.join(out, "pretrain.json")
    if params.train.backbone_weights != PRETRAINED:
        summary = {"pretrained": False, "reason": f"train.backbone_weights is {params.train.backbone_weights!r}"}
        storage.write_text(summary_uri, json.dumps(summary, indent=2) + "\n")
        print(f"pretrain_visual: nothing to do ({summary['reason']}, not {PRETRAINED!r})", file=sys.stderr)
        return summary
    if params.pretrain.seed == params.data.seed:
        raise ConfigError(f"pretrain.seed: {params.pretrain.seed} is data.seed's: the pretraining world would hold "
                          "the very products it is meant to differ from; pick another seed")
    import torch

    from components import prepare_data
    from sicot.model.backbone import trunk
    from sicot.model.recognizer import Recognizer
    from sicot.train import run_training

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sicot-pretrain-") as tmp:
        world = world_params(params, tmp)
        prepare_data.run(world, track=False)
        trained = run_training(world, track=False)
        backbone = trunk(Recognizer.load(trained["model"]).backbone)
    buffer = io.BytesIO()
    torch.save(backbone.state_dict(), buffer)
    backbone_uri = storage.join(out, "backbone.pt")
    storage.write_bytes(backbone_uri, buffer.getvalue())
    summary = {"pretrained": True, "backbone": backbone_uri, "skus": params.pretrain.skus,
               "photos": params.pretrain.skus * params.pretrain.max_images, "epochs": params.pretrain.epochs,
               "val_top1": trained["val_top1"], "seconds": round(time.perf_counter() - started, 1)}
    storage.write_text(summary_uri, json.dumps(summary, indent=2) + "\n")  # last: it marks completion
    if track:
        from sicot import tracking

        with tracking.step_run("pretrain_visual", params, sections=("pretrain",), reads_data=False) as run_:
            tracking.log_metrics({k: summary[k] for k in ("photos", "val_top1", "seconds")})
            summary["run_id"] = run_.info.run_id
    print(f"pretrain_visual: {params.train.backbone} on {summary['skus']} other products ({summary['photos']} photos, "
          f"{summary['epochs']} epochs, val top-1 {summary['val_top1']:.3f}) in {summary['seconds']} s -> "
          f"{backbone_uri}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    cli_main(run, __doc__.splitlines()[0], argv, sections=("pretrain", "data", "train", "evaluate", "paths"),
             extra=lambda p: p.add_argument("--no-track", dest="track", action="store_false",
                                            help="do not log to MLflow"))


if __name__ == "__main__":
    main()
