"""Image–title contrastive alignment (`train.title_contrast` = γ > 0, SICoT mode): the visual feature v of
a photo is pulled toward the title feature s of its product and pushed from the batch's other products'.

    loss = γ · ½ (NCE(v → s) + NCE(s → v)),   logits = cos(v_i, s_j) / T,   T = 0.1

A batch holds several photos of a head product, whose titles are near-duplicates: every title of the
same SKU counts as a positive (supervised-contrastive form), so they are not pushed apart. Photos
without a title take no part. Negatives are the rank's own batch (no gather: the term is per photo and
its cost B² · d stays small next to the backbone's). Unlike max-fusion, this makes v and s one space, so
a class's titles also give it a prototype where v lives (`sicot.model.class_means`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.1  # CLIP's learned temperature settles near 0.01–0.1; fixed here, one knob fewer


def title_contrast_loss(v: torch.Tensor, s: torch.Tensor, labels: torch.Tensor,
                        has_title: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE between the titled photos' v [B, d] and s [B, d] (0 without any)."""
    v, s, labels = v[has_title], s[has_title], labels[has_title]
    if v.shape[0] < 2:
        return v.sum() * 0 + s.sum() * 0
    logits = F.normalize(v.float(), dim=-1) @ F.normalize(s.float(), dim=-1).T / TEMPERATURE
    positive = labels[:, None] == labels[None, :]
    return (_multi_positive_nce(logits, positive) + _multi_positive_nce(logits.T, positive)) / 2


def _multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −log(Σ_pos exp / Σ_all exp)."""
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).mean()
