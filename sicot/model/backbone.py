"""Visual backbones: torchvision ResNets without their classification head, from a small registry.

They start random; `sicot.model.starting_point` loads what a training run starts from (torchvision's
ImageNet weights, last season's sicot model, a state_dict file).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

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


def create_backbone(name: str, out_dim: int = 0) -> tuple[nn.Module, int]:
    """(module mapping images [B,3,S,S] to features [B,d], d), randomly initialised.

    `out_dim` > 0 and different from the ResNet's width adds Linear+ReLU to that size: a narrower
    feature keeps a classifier over very many classes affordable, and ReLU keeps the features
    non-negative like the pooled ResNet output, the range the max fusion with the title stream assumes.
    """
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r} (known: {', '.join(available())})")
    builder, dim = _REGISTRY[name]
    model = builder()
    model.fc = nn.Identity()
    if out_dim and out_dim != dim:
        return nn.Sequential(model, nn.Linear(dim, out_dim), nn.ReLU(inplace=True)), out_dim
    return model, dim


def trunk(backbone: nn.Module) -> nn.Module:
    """The ResNet inside a backbone `create_backbone` made: torchvision's module, whose state_dict keys
    torchvision's weights use."""
    return backbone[0] if isinstance(backbone, nn.Sequential) else backbone
