"""The shared classifier W [C, d] (no bias) that scores visual and mixed features alike.

This is the interface every classifier honours, the class-sharded one in `sicot.parallel` included:
`loss`, `topk`, `full_weight`, and `weight` holding the rows of `class_range`. The replicated form keeps
all of W on every rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sicot.parallel.sharded_classifier import init_rows


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over the rows where `mask` is True; 0 (still in the graph) when no row is."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if mask is None:
        return ce.mean()
    return torch.where(mask, ce, torch.zeros_like(ce)).sum() / mask.sum().clamp_min(1)


class ReplicatedClassifier(nn.Module):
    """`seed` fixes the initial W, row for row the same as the sharded classifier's, so both forms start
    from one model. `logits_dtype`: the logits' precision, e.g. torch.float32 inside a bf16 autocast;
    None follows an enclosing autocast, as the sharded classifier does."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0, logits_dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(init_rows(0, num_classes, dim, seed))
        self.logits_dtype = logits_dtype

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def class_range(self) -> tuple[int, int]:
        """[start, stop) of the classes whose rows `weight` holds: all of them."""
        return 0, self.num_classes

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.logits_dtype is None:
            return features @ self.weight.t()
        with torch.autocast(features.device.type, enabled=False):
            return features.to(self.logits_dtype) @ self.weight.to(self.logits_dtype).t()

    def loss(self, features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
             log_prior: torch.Tensor | None = None, tau: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy over rows where `mask` is True (all rows when None).

        Logit adjustment (Menon et al., 2021): tau * log class prior is added to the logits inside the
        loss only, so the head classes' easy margin is taken away in training while prediction
        (`logits`, `topk`) stays plain.
        """
        logits = self.logits(features).float()
        if tau and log_prior is not None:
            logits = logits + tau * log_prior.to(logits)
        return masked_cross_entropy(logits, labels, mask)

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, class indices) of the k best classes, best first."""
        probs = torch.softmax(self.logits(features).float(), dim=-1)
        return probs.topk(min(k, self.num_classes), dim=-1)

    def full_weight(self) -> torch.Tensor:
        return self.weight
