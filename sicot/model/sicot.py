"""SICoT: a visual stream v, a title stream s, their fusion, and one classifier W over both.

    v = backbone(image)            s = text_encoder(title)          mixed = fuse(v, s) = max(v, s)
    loss = CE(W v) + λ · CE(W mixed)

Titles exist only in training: the deployable model is the backbone and W (`Recognizer`). Without a
text encoder this is the visual-only baseline, loss = CE(W v).

The formulation is kept in small pieces so variants are one-line changes: `fuse` (e.g. normalise v and
s before the max, or stop the gradient into s), `cotrain_weight` (a schedule can set it per epoch), and
`Streams` (what runs the two encoders, the part data-parallel training wraps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sicot.text.word2vec import PAD


@dataclass
class CoTraining:
    """The weight λ of CE(W·mixed) over training (`train.cotrain_weight`, `train.cotrain_rampup`).

    λ is 0 in the first epoch and grows linearly to `weight` over `rampup` epochs. The title stream,
    whose word vectors already separate products, would otherwise capture the shared classifier before
    the visual stream has learned the products (docs/method.md): the naive form, rampup 0, loses to the
    visual-only baseline from a pretrained backbone and collapses from a random one.
    """
    weight: float = 1.0
    rampup: int = 0

    def weight_at(self, epoch: int) -> float:
        return self.weight * min(1.0, epoch / self.rampup) if self.rampup > 0 else self.weight


def fuse(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The mixed feature: element-wise max of the visual and title features (both non-negative)."""
    return torch.maximum(v, s)


class Streams(nn.Module):
    """Every trained part but W in one module (what data-parallel training wraps): images [B,3,S,S],
    tokens [B,L] -> (v [B,d], s [B,d] or None)."""

    def __init__(self, backbone: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None):
        v = self.backbone(images)
        if self.text_encoder is None:
            return v, None
        s, _ = self.text_encoder(tokens, tokens != PAD)
        return v, s


class SICoT(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, classifier: nn.Module,
                 text_encoder: nn.Module | None = None, cotrain_weight: float = 1.0,
                 cotraining: CoTraining | None = None):
        super().__init__()
        self.dim = dim
        self.streams = Streams(backbone, text_encoder)
        self.classifier = classifier
        self.cotraining = cotraining or CoTraining(weight=cotrain_weight)
        self.cotrain_weight = self.cotraining.weight  # λ now; the training engine follows the ramp-up

    def start_epoch(self, epoch: int) -> None:
        self.cotrain_weight = self.cotraining.weight_at(epoch)

    @property
    def backbone(self) -> nn.Module:
        return self.streams.backbone

    @property
    def text_encoder(self) -> nn.Module | None:
        return self.streams.text_encoder

    def training_loss(self, images, labels, tokens=None, log_prior=None, tau: float = 0.0, streams=None):
        """(loss, parts) for one batch; parts holds the detached loss terms and visual features
        ("features", for training accuracy). `streams` runs the encoders in place of `self.streams`
        when given: the data-parallel wrapper of the same module."""
        v, s = (self.streams if streams is None else streams)(images, tokens)
        visual = self.classifier.loss(v, labels, log_prior=log_prior, tau=tau)
        parts = {"visual": visual.detach(), "features": v.detach()}
        if s is None:
            return visual, parts
        # A product with an empty title has no side information: max(v, s) would then be v mixed with
        # the projection of nothing, a feature that says nothing about the product. Such samples keep
        # the visual loss and are left out of the mixed term (its mean runs over titled samples only).
        has_title = (tokens != PAD).any(dim=1)
        cotrain = self.classifier.loss(fuse(v, s), labels, mask=has_title, log_prior=log_prior, tau=tau)
        parts["cotrain"] = cotrain.detach()
        return visual + self.cotrain_weight * cotrain, parts
