"""Visual backbones: torchvision ResNets without their classification head, from a small registry.

Weights are random, or a torchvision state_dict read from a local file or s3:// URI: nothing is ever
downloaded, so training runs the same offline, in CI and in a pod.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from sicot import torchfile

_REGISTRY: dict[str, tuple[Callable[[], nn.Module], int]] = {}


class BackboneError(ValueError):
    pass


def register(name: str, dim: int):
    def wrap(builder: Callable[[], nn.Module]):
        _REGISTRY[name] = (builder, dim)
        return builder
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


@register("resnet18", 512)
def _resnet18() -> nn.Module:
    from torchvision.models import resnet18  # lazy: torchvision costs ~8 s of import
    return resnet18(weights=None)


@register("resnet34", 512)
def _resnet34() -> nn.Module:
    from torchvision.models import resnet34
    return resnet34(weights=None)


@register("resnet50", 2048)
def _resnet50() -> nn.Module:
    from torchvision.models import resnet50
    return resnet50(weights=None)


def _load_weights(model: nn.Module, name: str, uri: str) -> None:
    try:
        state = torchfile.load(uri, "backbone weights file")
    except FileNotFoundError:
        raise BackboneError(f"backbone weights {uri}: file not found") from None
    except torchfile.TorchFileError as exc:
        raise BackboneError(str(exc)) from None
    if not isinstance(state, dict):
        raise BackboneError(f"backbone weights {uri}: expected a state_dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet head is not used
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise BackboneError(f"backbone weights {uri} do not fit {name}: {detail[:300]}") from None


def create_backbone(name: str, weights: str = "", out_dim: int = 0) -> tuple[nn.Module, int]:
    """(module mapping images [B,3,S,S] to features [B,d], d).

    `out_dim` > 0 and different from the ResNet's width adds Linear+ReLU to that size: a narrower
    feature keeps a classifier over very many classes affordable, and ReLU keeps the features
    non-negative like the pooled ResNet output, the range the max fusion with the title stream assumes.
    """
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r} (known: {', '.join(available())})")
    builder, dim = _REGISTRY[name]
    model = builder()
    model.fc = nn.Identity()
    if weights:
        _load_weights(model, name, weights)
    if out_dim and out_dim != dim:
        return nn.Sequential(model, nn.Linear(dim, out_dim), nn.ReLU(inplace=True)), out_dim
    return model, dim
