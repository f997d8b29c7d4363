"""The last fully connected layer split by class over the ranks of a process group.

At a million SKUs and more, W [C, d] with its gradient and momentum no longer fits one GPU. Rank r of
N owns the contiguous class range of `torch.chunk(W, N)[r]` (chunks of ceil(C / N) rows, the last ones
shorter) — the layout of a DTensor `Shard(0)`, so checkpoints re-shard to any world size.

Fewer classes than ranks (C < N), or an unlucky ceil split such as C = 4 over 3 ranks (2, 2, 0): the
trailing ranks own no class. They still take part in every collective and contribute nothing; loss,
gradients and top-k stay exact.

The backbone and text encoder stay data-parallel. `loss()` all-gathers the features of the global batch,
so every rank returns the same global mean loss and its weight shard gets the exact gradient of it. The
backbone's rows get their exact gradient multiplied by N (`ddp_average=True`): DDP then averages over
the N ranks what must be a sum over the ranks' rows, and the result equals single-process training on
the global batch. Pass `ddp_average=False` when the backbone's gradients are not averaged.

The interface matches the single-process classifier: `loss`, `topk`, `full_weight`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from sicot.parallel.cross_entropy import (
    GatherRows,
    global_softmax_stats,
    local_softmax_stats,
    no_autocast,
    row_chunks,
    shard_logits,
    sharded_cross_entropy,
)
from sicot.parallel.dist import all_gather_rows, gather_sizes, require_group

INIT_BLOCK_ROWS = 4096


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the classes rank `rank` owns; `torch.chunk` layout, possibly empty."""
    size = -(-num_classes // world_size)
    start = min(rank * size, num_classes)
    return start, min(start + size, num_classes)


def init_rows(start: int, stop: int, dim: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rows [start, stop) of the initial weight, U(-1/sqrt(d), 1/sqrt(d)) like `nn.Linear`.

    Each block of INIT_BLOCK_ROWS rows draws from its own seed, so a class gets the same initial
    vector whatever the world size, without ever materialising the full [C, d] matrix.
    """
    bound = 1.0 / math.sqrt(dim)
    out = torch.empty(stop - start, dim, device=device, dtype=dtype)
    gen = torch.Generator(device=out.device)
    for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        lo = block * INIT_BLOCK_ROWS
        gen.manual_seed((seed * 1_000_003 + block) % (2**63))
        rows = torch.empty(INIT_BLOCK_ROWS, dim, device=out.device, dtype=dtype).uniform_(-bound, bound, generator=gen)
        a, b = max(start, lo), min(stop, lo + INIT_BLOCK_ROWS)
        out[a - start:b - start] = rows[a - lo:b - lo]
    return out


class ShardedClassifier(nn.Module):
    """W [C, d] split by class over `group` (default: the world); no bias.

    chunk_rows: > 0 bounds the logit memory to [chunk_rows, C/N] per rank (same results, one more matmul).
    sample_rate: < 1 turns on Partial-FC class sampling in training mode: each rank keeps every class of
        its shard that is a label in the global batch, plus random other classes up to
        ceil(sample_rate * shard size). The softmax then runs over the kept classes only, a biased but
        cheap estimate of the full loss; classes left out get no gradient that step. Evaluation
        (`topk`, and `loss` in eval mode) always uses every class.
    seed: initial weight (independent of the world size) and the sampling generator.
    ddp_average: multiply the feature gradients by N because DDP averages the backbone's gradients.
    logits_dtype: matmul/logit precision, e.g. torch.bfloat16; None follows an enclosing autocast,
        else the weight's dtype. Softmax statistics are always accumulated in float32.
    """

    def __init__(self, dim: int, num_classes: int, group=None, chunk_rows: int = 0, sample_rate: float = 1.0,
                 seed: int = 0, ddp_average: bool = True, logits_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if dim <= 0 or num_classes <= 0:
            raise ValueError(f"dim and num_classes must be positive, got dim={dim}, num_classes={num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if chunk_rows < 0:
            raise ValueError(f"chunk_rows must be >= 0 (0 = all rows at once), got {chunk_rows}")
        self.group = require_group(group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.dim, self.num_classes = dim, num_classes
        self.chunk_rows, self.sample_rate, self.seed = chunk_rows, sample_rate, seed
        self.ddp_average, self.logits_dtype = ddp_average, logits_dtype
        self.class_range = shard_range(num_classes, self.world_size, self.rank)
        if device is None and dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        self.weight = nn.Parameter(init_rows(*self.class_range, dim, seed, device=device))
        self._sampler: torch.Generator | None = None

    def extra_repr(self) -> str:
        lo, hi = self.class_range
        return (f"dim={self.dim}, num_classes={self.num_classes}, rank {self.rank}/{self.world_size} owns "
                f"[{lo}, {hi}), chunk_rows={self.chunk_rows}, sample_rate={self.sample_rate}")

    # -- training --------------------------------------------------------------------------------

    def forward(self, features, labels, mask=None, log_prior=None, tau: float = 0.0):
        return self.loss(features, labels, mask, log_prior, tau)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
             log_prior: torch.Tensor | None = None, tau: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy over the global batch's rows where `mask` is true (every rank gets the
        same value). `tau * log_prior[class]` is added to the logits (logit adjustment). No row left
        anywhere gives 0 with zero gradients."""
        self._check_features(features)
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must have shape [{features.shape[0]}], got {list(labels.shape)}")
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != labels.shape:
                raise ValueError(f"mask must be a bool tensor of shape [{labels.shape[0]}], "
                                 f"got {mask.dtype} {list(mask.shape)}")
            features, labels = features[mask], labels[mask]
        adjust = self._adjustment(log_prior, tau)
        device = self.weight.device
        sizes = gather_sizes(features.shape[0], device, self.group)
        weight = self.weight
        if sum(sizes) == 0:
            return features.sum() * 0.0 + weight.sum() * 0.0
        labels = all_gather_rows(labels.to(device=device, dtype=torch.int64), sizes, self.group)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():  # every rank sees the same gathered labels, so every rank raises together
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {bad[:5].tolist()}")
        x = GatherRows.apply(features, sizes, self.rank, self.group,
                             self.world_size if self.ddp_average else 1)
        lo, hi = self.class_range
        owned = (labels >= lo) & (labels < hi)
        local = torch.where(owned, labels - lo, -1)
        cols = self._sample_columns(labels[owned] - lo) if self.training else None
        if cols is not None:
            remap = torch.full((hi - lo,), -1, dtype=torch.int64, device=device)
            remap[cols] = torch.arange(len(cols), device=device)
            local = torch.where(owned, remap[local.clamp(min=0)], -1)
            weight = weight.index_select(0, cols)
            adjust = adjust[cols] if adjust is not None else None
        return sharded_cross_entropy(x, weight, local, adjust, self.chunk_rows,
                                     self._dtype(), self.group)

    def _check_features(self, features):
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape [batch, {self.dim}], got {list(features.shape)}")

    def _adjustment(self, log_prior, tau):
        if not tau:
            return None
        if log_prior is None:
            raise ValueError(f"tau={tau} needs log_prior, a [{self.num_classes}] tensor of log class priors")
        if log_prior.shape != (self.num_classes,):
            raise ValueError(f"log_prior must have shape [{self.num_classes}], got {list(log_prior.shape)}")
        lo, hi = self.class_range
        return tau * log_prior[lo:hi].to(device=self.weight.device, dtype=torch.float32)

    def _dtype(self) -> torch.dtype:
        if self.logits_dtype is not None:
            return self.logits_dtype
        kind = self.weight.device.type
        if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.weight.dtype

    def _sample_columns(self, positives: torch.Tensor) -> torch.Tensor | None:
        """Sorted local columns to keep (every positive plus random negatives); None keeps all."""
        size = self.class_range[1] - self.class_range[0]
        if self.sample_rate >= 1.0 or size == 0:
            return None
        positives = torch.unique(positives)
        keep = max(math.ceil(self.sample_rate * size), positives.numel())
        if keep >= size:
            return None
        if self._sampler is None or self._sampler.device != self.weight.device:
            self._sampler = torch.Generator(device=self.weight.device)
            self._sampler.manual_seed((self.seed * 1_000_003 + 7919 * (self.rank + 1)) % (2**63))
        score = torch.rand(size, generator=self._sampler, device=self.weight.device)
        score[positives] = 2.0  # above any uniform draw: positives are always kept
        return score.topk(keep).indices.sort().values

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and global class indices of the min(k, C) best classes of each local
        row, best first.

        Exact: each rank takes its shard's top k and the softmax denominator over all shards; the
        N * k candidates of a row are merged. No rank ever holds a C-wide row of logits.
        """
        self._check_features(features)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self.num_classes)
        device = self.weight.device
        sizes = gather_sizes(features.shape[0], device, self.group)
        rows = sum(sizes)
        if rows == 0:
            return (torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.int64, device=device))
        x = all_gather_rows(features.to(device), sizes, self.group)
        lo, hi = self.class_range
        kept = min(k, hi - lo)
        top = torch.full((rows, k), float("-inf"), device=device)
        idx = torch.full((rows, k), -1, dtype=torch.int64, device=device)
        m, s = torch.empty(rows, device=device), torch.empty(rows, device=device)
        with no_autocast(device):
            w = self.weight.to(self._dtype())
            for sl in row_chunks(rows, self.chunk_rows):
                logits = shard_logits(x[sl], w, None, w.dtype)
                if kept:
                    v, i = logits.topk(kept, dim=1)
                    top[sl, :kept], idx[sl, :kept] = v.float(), i + lo
                m[sl], s[sl] = local_softmax_stats(logits)
        big_m, big_s, _, _ = global_softmax_stats(m, s, self.group)
        probs = torch.exp(top - big_m[:, None]) / big_s[:, None]
        probs[:, kept:] = -1.0  # padding for shards with fewer than k classes: never beats a probability
        n = self.world_size
        cand_p = all_gather_rows(probs, [rows] * n, self.group).view(n, rows, k).permute(1, 0, 2).reshape(rows, n * k)
        cand_i = all_gather_rows(idx, [rows] * n, self.group).view(n, rows, k).permute(1, 0, 2).reshape(rows, n * k)
        best, pos = cand_p.topk(k, dim=1)
        start = sum(sizes[:self.rank])
        mine = slice(start, start + sizes[self.rank])
        return best[mine], cand_i.gather(1, pos)[mine]

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole W [C, d] on every rank (all-gather): only when it fits one device."""
        sizes = [b - a for a, b in (shard_range(self.num_classes, self.world_size, r) for r in range(self.world_size))]
        return all_gather_rows(self.weight.detach(), sizes, self.group)
