"""A recognizer with random weights and random photos: what the serving tests need besides a trained model."""
from __future__ import annotations

import io

import numpy as np


def save_random_recognizer(path: str, classes: list[str], dim: int) -> str:
    """A resnet18 recognizer of `classes` with a `dim`-wide feature, seeded, saved as `model.pt` at `path`."""
    import torch

    from sicot.model.backbone import create_backbone
    from sicot.model.recognizer import Recognizer

    torch.manual_seed(0)
    backbone, dim = create_backbone("resnet18", out_dim=dim)
    Recognizer(backbone, torch.randn(len(classes), dim), classes, 16, {"backbone": "resnet18", "feature_dim": dim}
               ).save(path)
    return path


def random_photos(count: int) -> list[bytes]:
    """`count` 24×24 PNGs of seeded noise."""
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out
