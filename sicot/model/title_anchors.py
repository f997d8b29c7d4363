"""Title words as supervision of the visual stream, and classifier rows built from them.

Two options of SICoT mode, each usable alone:

- **Title-word prediction** (`train.word_loss` = β > 0): word detectors U [V, d] predict from the
  visual feature v which vocabulary words the photo's title holds (multi-label BCE). A brand, category
  or variant word is shared by head and tail products, so v learns to see it from every product that
  has it in its titles, most of them head products.
- **Title anchors** (`train.title_anchors`): each class's row of W is offset by its words' detectors,

      row_c = W_c + Σ_w T_cw U_w        T_cw = share of c's titles holding w · idf(w), rows summing to 1

  so a tail product with a handful of photos gets a row composed of detectors trained on thousands.
  idf(w) = log(C / classes whose titles hold w) gives words every product has (promotional noise)
  no weight. U starts at zero: the first step is the plain model's.

The deployed model stays image-only: after training the offsets are folded into W (`Recognizer` holds
W + T U). Cost per step: T is sparse (a class has tens of distinct words), so the offsets of a rank's
C / N rows cost C / N · words · d; the detectors cost B · V · d.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sicot.text.word2vec import PAD, UNK


def class_word_weights(labels: Iterable[int], token_ids: Iterable[list[int]], num_classes: int,
                       vocab_size: int) -> torch.Tensor:
    """T, sparse [num_classes, vocab_size]: per class, the share of its titles holding each word times
    the word's idf over classes, normalised to sum 1 (a class with no informative word: an empty row).
    PAD and UNK are never words."""
    holding: list[Counter] = [Counter() for _ in range(num_classes)]
    titles = [0] * num_classes
    for label, ids in zip(labels, token_ids):
        titles[label] += 1
        holding[label].update({w for w in ids if w > UNK})
    classes_with = Counter(w for counter in holding for w in counter)
    rows, cols, vals = [], [], []
    for c, counter in enumerate(holding):
        weights = {w: n / titles[c] * math.log(num_classes / classes_with[w]) for w, n in counter.items()}
        total = sum(weights.values())
        for w, value in sorted(weights.items()):
            if value > 0:
                rows.append(c)
                cols.append(w)
                vals.append(value / total)
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                   torch.tensor(vals, dtype=torch.float32), (num_classes, vocab_size),
                                   check_invariants=True).coalesce()


def title_word_targets(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Multi-hot [B, V] of the words in each title (PAD and UNK left out)."""
    targets = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    targets.scatter_(1, tokens, 1.0)
    targets[:, PAD] = 0.0
    targets[:, UNK] = 0.0
    return targets


class TitleWords(nn.Module):
    """Word detectors U [V, d] over the visual feature: title-word logits when `predict` (with a bias per
    word for its base rate), and the title anchors' offsets of this rank's rows when `class_words` (T's
    rows for the classes this rank holds, sparse) is given. Only parameters the loss uses exist, as
    DDP requires."""

    def __init__(self, dim: int, vocab_size: int, class_words: torch.Tensor | None = None, predict: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, dim))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if predict else None
        # A plain attribute, not a buffer: rebuilt from the data on every run (also on resume), and its
        # rows differ between the ranks of a sharded W, which DDP's buffer broadcast would overwrite.
        self.class_words = class_words

    def logits(self, v: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else F.linear(v, self.weight, self.bias)

    def row_offsets(self) -> torch.Tensor | None:
        if self.class_words is None:
            return None
        if self.class_words.device != self.weight.device:
            self.class_words = self.class_words.to(self.weight.device)
        return torch.sparse.mm(self.class_words, self.weight.float()).to(self.weight.dtype)


def word_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE of the word detectors against the titles' words, summed over the vocabulary and averaged
    over the titles' words, over titled rows only (0, still in the graph, when there is none). Like
    any data-parallel loss, each rank's mean is averaged by DDP."""
    targets = title_word_targets(tokens, logits.shape[1])[mask]
    per_word = F.binary_cross_entropy_with_logits(logits[mask].float(), targets, reduction="sum")
    return per_word / targets.sum().clamp_min(1.0)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x, with its gradient multiplied by `factor` on the way back."""
    return x if factor == 1 else x.detach() + factor * (x - x.detach())
