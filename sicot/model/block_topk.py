"""Exact softmax top-k over a classifier W read in row blocks: memory set by the block, not by C.

The math of `ShardedClassifier.topk`, with blocks in place of ranks and run one after another: each
block gives its own top k logits and its (row max, sum of exponentials); the running top k keeps the
best k of the candidates, and the running (max M, denominator S) absorbs each block's statistics
rescaled to the new max. At the end, probability = exp(logit - M) / S: the softmax over all C classes.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from sicot.parallel.cross_entropy import local_softmax_stats, no_autocast, shard_logits

FLOAT_BYTES = 4


def block_rows(max_bytes: int, dim: int, batch: int) -> int:
    """Rows of W per block so that the block [rows, d] and its logits [batch, rows] fit `max_bytes`
    (float32); at least one row."""
    return max(1, max_bytes // ((dim + batch) * FLOAT_BYTES))


@torch.no_grad()
def blockwise_topk(features: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]], k: int,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, class indices) [B, min(k, C)], best first, of softmax(features @ W.T).

    blocks: (first class index, rows [r, d]) covering W's rows 0..num_classes-1, each row once; a block
    may live on another device than `features` (it is moved there, in float32).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, num_classes)
    rows, device = features.shape[0], features.device
    x = features.float()
    top = torch.full((rows, k), float("-inf"), device=device)
    idx = torch.full((rows, k), -1, dtype=torch.int64, device=device)
    big_m = torch.full((rows,), float("-inf"), device=device)
    big_s = torch.zeros(rows, device=device)
    with no_autocast(device):
        for start, weight in blocks:
            logits = shard_logits(x, weight.to(device=device, dtype=torch.float32), None, torch.float32)
            del weight  # a memory-mapped block is unmapped once the caller lets go of it too
            v, i = logits.topk(min(k, logits.shape[1]), dim=1)
            top, pos = torch.cat([top, v], dim=1).topk(k, dim=1)
            idx = torch.cat([idx, i + start], dim=1).gather(1, pos)
            m, s = local_softmax_stats(logits)
            new_m = torch.maximum(big_m, m)
            big_s = big_s * torch.exp(big_m - new_m) + s * torch.exp(m - new_m)  # exp(-inf) = 0 at the start
            big_m = new_m
    return torch.exp(top - big_m[:, None]) / big_s[:, None], idx
