"""The deployable model: images in, SKU scores out. Titles are a training-time aid only.

One file holds everything needed to rebuild it: the architecture (backbone name, feature size), the
input size, the class list (index -> SKU) and the weights. Loading checks the file is a recognizer and
that the weights fit the architecture it names, and says which of the two failed.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sicot import storage, torchfile
from sicot.data.images import decode_image, to_tensor
from sicot.model.backbone import create_backbone

FORMAT = "sicot.recognizer/1"


class RecognizerError(ValueError):
    pass


class Recognizer(nn.Module):
    """`arch` = {"backbone": name, "feature_dim": d}: how `load` rebuilds the backbone module."""

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, classes: Sequence[str], image_size: int,
                 arch: dict):
        super().__init__()
        if weight.shape[0] != len(classes):
            raise RecognizerError(f"classifier has {weight.shape[0]} rows but {len(classes)} classes")
        self.backbone = backbone
        self.register_buffer("weight", weight.detach().float().clone())
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.arch = {"backbone": arch["backbone"], "feature_dim": int(arch["feature_dim"])}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for normalised images [B, 3, S, S]."""
        return self.backbone(images) @ self.weight.t()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised visual features [B, d], for similarity search."""
        return F.normalize(self.backbone(images), dim=-1)

    def prepare(self, images: Sequence[bytes], max_pixels: int | None = None) -> torch.Tensor:
        """Encoded uploads (any mode: grayscale, palette, RGBA, 16-bit...) to the model's input batch,
        decoded and normalised exactly as in training."""
        return torch.stack([to_tensor(decode_image(data, max_pixels=max_pixels), self.image_size)
                            for data in images])

    @torch.no_grad()
    def topk(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, class indices) [B, k], best first."""
        return torch.softmax(self(images).float(), dim=-1).topk(min(k, len(self.classes)), dim=-1)

    @torch.no_grad()
    def topk_and_embed(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`topk` and `embed` from one backbone pass: (probabilities, class indices, features)."""
        features = self.backbone(images)
        probs = torch.softmax((features @ self.weight.t()).float(), dim=-1)
        scores, classes = probs.topk(min(k, len(self.classes)), dim=-1)
        return scores, classes, F.normalize(features.float(), dim=-1)

    def save(self, uri: str) -> None:
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "arch": self.arch, "image_size": self.image_size,
                    "classes": self.classes, "state_dict": self.state_dict()}, buffer)
        storage.write_bytes(uri, buffer.getvalue())

    @classmethod
    def load(cls, uri: str, map_location: str | torch.device = "cpu") -> Recognizer:
        try:
            blob = torchfile.load(uri, "model file", map_location)
        except FileNotFoundError:
            raise RecognizerError(f"{uri}: model file not found") from None
        except torchfile.TorchFileError as exc:
            raise RecognizerError(str(exc)) from None
        if not is_saved_recognizer(blob):
            found = blob.get("format", "no format tag") if isinstance(blob, dict) else type(blob).__name__
            raise RecognizerError(f"{uri}: not a sicot recognizer (expected format {FORMAT!r}, found {found!r})")
        return cls.from_saved(blob, uri)

    @classmethod
    def from_saved(cls, blob: dict, uri: str) -> Recognizer:
        """The model in `save`'s contents, already read from `uri` (named in errors)."""
        arch, state = blob["arch"], blob["state_dict"]
        backbone, dim = create_backbone(arch["backbone"], out_dim=arch["feature_dim"])
        weight = state.get("weight")
        if weight is None or weight.ndim != 2 or weight.shape[1] != dim:
            shape = None if weight is None else tuple(weight.shape)
            raise RecognizerError(f"{uri}: classifier weight {shape} does not fit {arch['backbone']} "
                                  f"features of size {dim}")
        model = cls(backbone, weight, blob["classes"], blob["image_size"], arch)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1:4]
            raise RecognizerError(f"{uri}: weights do not fit the architecture the file names "
                                  f"({arch['backbone']}, feature_dim {arch['feature_dim']}): "
                                  + " ".join(line.strip() for line in first)) from None
        return model.eval()


def is_saved_recognizer(blob) -> bool:
    """Whether the contents of a torch file are a `Recognizer.save`."""
    return isinstance(blob, dict) and blob.get("format") == FORMAT
