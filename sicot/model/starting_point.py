"""What a training run starts from: `train.backbone_weights`.

- empty: random initialisation.
- a torchvision weights name (`IMAGENET1K_V1`, `IMAGENET1K_V2`, `DEFAULT`: upper-case, as torchvision's
  weights enums spell them): torchvision's weights for `train.backbone`, through its own API and
  torch.hub's cache, `$TORCH_HOME/hub/checkpoints/<the file name in the weights' URL>`. The file is
  downloaded once; an offline cluster pre-seeds that directory.
- a previous sicot model: `models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<run_id>/model`
  (MLflow), or the `model.pt` file/URI training writes. Its whole visual stream (the projection to
  `feature_dim` included), and the classifier rows of the SKUs both catalogues hold: a new season's
  catalogue shares most SKUs with the last, whose rows already score them; new SKUs start from the
  seeded initialisation.
- a file/URI holding a torchvision state_dict of the ResNet (its ImageNet head is ignored).
- `pretrained`: such a state_dict written by the pretrain step (components/pretrain_visual.py) to
  `paths.pretrained`/backbone.pt.

A sicot model and a state_dict are told apart by their contents, not their names.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from sicot import storage, torchfile
from sicot.config import PRETRAINED
from sicot.model.backbone import trunk
from sicot.model.recognizer import Recognizer, RecognizerError, is_saved_recognizer

KEY = "train.backbone_weights"
ACCEPTED = ("a torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT), a sicot model "
            "(models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/model, or a model.pt file/URI), "
            "a file/URI of a torchvision state_dict, or `pretrained` (the pretrain step's); empty = random "
            "initialisation")
WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
MLFLOW_SCHEMES = ("models:/", "runs:/")


class StartingPointError(ValueError):
    """`train.backbone_weights` names nothing usable; the message says what it accepts."""


@dataclass
class StartingPoint:
    """`resnet`: a state_dict of the ResNet alone (torchvision's weights or a state_dict file);
    `previous`: a sicot model whose visual stream and classifier rows carry over. At most one is set."""
    source: str = ""
    resnet: dict[str, torch.Tensor] | None = None
    previous: Recognizer | None = None

    def load_backbone(self, backbone: nn.Module) -> None:
        """Copy the starting weights into `backbone`, a module `create_backbone` made."""
        if self.previous is not None:
            backbone.load_state_dict(self.previous.backbone.state_dict())
        elif self.resnet is not None:
            try:
                trunk(backbone).load_state_dict(self.resnet)
            except RuntimeError as exc:
                detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
                raise StartingPointError(f"{KEY}={self.source}: the weights do not fit the backbone: "
                                         f"{detail[:300]}") from None

    @torch.no_grad()
    def load_classifier_rows(self, classifier: nn.Module, classes: list[str]) -> int:
        """Copy the previous model's row of every SKU in `classes` it knew into the rows `classifier`
        holds on this rank (`class_range`); returns how many rows were copied."""
        if self.previous is None:
            return 0
        known = {sku: i for i, sku in enumerate(self.previous.classes)}
        start, stop = classifier.class_range
        pairs = [(i - start, known[sku]) for i, sku in enumerate(classes[start:stop], start) if sku in known]
        if pairs:
            rows, previous_rows = (list(column) for column in zip(*pairs))
            classifier.weight[rows] = self.previous.weight[previous_rows].to(classifier.weight)
        return len(pairs)

    def describe(self, classes: list[str]) -> str:
        """One line for the training log."""
        if self.previous is not None:
            shared = len(set(classes) & set(self.previous.classes))
            return (f"starting from the sicot model {self.source}: its visual stream and the classifier rows "
                    f"of the {shared} of {len(classes)} SKUs it knew")
        if self.resnet is not None:
            return f"starting the backbone from {self.source}"
        return "starting from random weights"


def load_starting_point(spec: str, backbone: str, feature_dim: int, pretrained_dir: str = "") -> StartingPoint:
    """Resolve `train.backbone_weights` = `spec` for a run training `backbone` with `feature_dim`;
    `pretrained_dir`: `paths.pretrained`, where `pretrained` is read from."""
    if not spec:
        return StartingPoint()
    if spec == PRETRAINED:
        uri = storage.join(pretrained_dir, "backbone.pt")
        if not storage.exists(uri):
            raise StartingPointError(f"{KEY}={PRETRAINED}: {uri} does not exist; run the pretrain step first "
                                     "(python -m components.pretrain_visual)")
        return StartingPoint(uri, resnet=_read(uri, spec))
    if WEIGHTS_NAME.fullmatch(spec):
        return StartingPoint(spec, resnet=torchvision_weights(backbone, spec))
    if spec.startswith(MLFLOW_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="sicot-start-") as tmp:
            blob = _read(str(_download(spec, tmp)), spec)
    else:
        blob = _read(spec, spec)
    if is_saved_recognizer(blob):
        return StartingPoint(spec, previous=_previous_model(blob, spec, backbone, feature_dim))
    if isinstance(blob, dict) and blob and all(torch.is_tensor(v) for v in blob.values()):
        return StartingPoint(spec, resnet={k: v for k, v in blob.items() if not k.startswith("fc.")})
    raise StartingPointError(f"{KEY}={spec}: neither a sicot model nor a state_dict "
                             f"(found {type(blob).__name__}); it accepts {ACCEPTED}")


def torchvision_weights(backbone: str, name: str) -> dict[str, torch.Tensor]:
    """torchvision's weights `name` of `backbone` as a state_dict without the ImageNet head, from
    torch.hub's cache (downloaded there when missing)."""
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(backbone)[name]
    except ValueError:
        raise StartingPointError(f"{KEY}={name}: torchvision has no weights for the backbone {backbone!r}; "
                                 f"{KEY} accepts {ACCEPTED}") from None
    except KeyError:
        known = ", ".join(get_model_weights(backbone).__members__)
        raise StartingPointError(f"{KEY}={name}: not a torchvision weights name of {backbone} "
                                 f"(known: {known}); {KEY} accepts {ACCEPTED}") from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        state = weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except OSError as exc:  # URLError included: no network and nothing in the cache
        raise StartingPointError(
            f"{KEY}={name}: {weights} is not in torch.hub's cache and could not be downloaded ({exc}); "
            f"on a machine without network put the file {cached} there first") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise StartingPointError(f"{KEY}={name}: the cached {cached} is damaged ({str(exc).strip()[:200]}); "
                                 "delete it to download it again") from None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _download(model_uri: str, dst: str):
    from mlflow.exceptions import MlflowException

    from sicot import tracking

    try:
        return tracking.download_model_file(model_uri, dst)
    except (MlflowException, OSError) as exc:
        raise StartingPointError(f"{KEY}={model_uri}: cannot fetch the model ({str(exc).strip()[:300]}); "
                                 f"{KEY} accepts {ACCEPTED}") from None


def _read(uri: str, spec: str):
    try:
        return torchfile.load(uri, "starting weights")
    except FileNotFoundError:
        raise StartingPointError(f"{KEY}={spec}: file not found; it accepts {ACCEPTED}") from None
    except torchfile.TorchFileError as exc:
        raise StartingPointError(f"{KEY}: {exc}") from None


def _previous_model(blob: dict, spec: str, backbone: str, feature_dim: int) -> Recognizer:
    try:
        previous = Recognizer.from_saved(blob, spec)
    except RecognizerError as exc:
        raise StartingPointError(f"{KEY}: {exc}") from None
    found = (previous.arch["backbone"], previous.arch["feature_dim"])
    if found != (backbone, feature_dim):
        raise StartingPointError(f"{KEY}={spec}: a sicot model of {found[0]} with feature_dim {found[1]}, but this "
                                 f"run trains {backbone} with feature_dim {feature_dim}; set train.backbone="
                                 f"{found[0]} and train.feature_dim={found[1]} to start from it")
    return previous
