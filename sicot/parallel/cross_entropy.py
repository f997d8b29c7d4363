"""Softmax cross-entropy when the classes are split over the ranks of a process group.

Two explicit autograd functions:

- `GatherRows`: all-gather the features of the global batch (ranks may hold different row counts).
  Backward is the only collective of the backward pass: a reduce-scatter that sums every rank's partial
  gradient of the gathered rows and hands each rank the rows it produced.
- `ShardedSoftmaxCE`: logits of the gathered rows against this rank's classes only; the softmax
  denominator comes from an all-reduce of the row max and of the row sum of exponentials, the target
  logit from its owner through the same all-reduce. Backward needs no collective.

Why not `torch.distributed.tensor.parallel.loss_parallel`: it needs logits laid out as a DTensor in
`torch.chunk` order, backward must run inside its context, and any other log_softmax consumer inside
that context silently gets wrong gradients (pytorch#190746). These two functions have none of that.

Memory: with `chunk_rows == 0` one [B, C_local] buffer holds logits, then exponentials, then the
probabilities that backward reuses in place (autograd's own graph would keep 3-5 such buffers).
With `chunk_rows > 0` nothing of that size is kept: backward recomputes each chunk's logits, so the
peak is [chunk_rows, C_local] at the price of one more matmul. A logit dtype below the weight's
(bf16) holds a copy of the weight shard in that dtype during each pass.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from sicot.parallel.dist import all_gather_rows, reduce_scatter_rows


class GatherRows(torch.autograd.Function):
    """[b_r, d] on each rank -> [sum b_r, d] on every rank; gradients return to the rank that owns each row.

    `grad_scale` multiplies the returned gradient: pass the world size when the module that produced
    the rows is wrapped in DDP, which averages over ranks what must be a sum here.
    """

    @staticmethod
    def forward(ctx, x, sizes, rank, group, grad_scale):
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_scale = sizes, rank, group, grad_scale
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        mine = reduce_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group)
        if ctx.grad_scale != 1:
            mine = mine * ctx.grad_scale
        return mine, None, None, None, None


def no_autocast(device: torch.device):
    # Precision is chosen explicitly (`dtype`); an enclosing autocast must not re-cast inside.
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def row_chunks(n: int, chunk_rows: int):
    step = chunk_rows if 0 < chunk_rows < n else max(n, 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def shard_logits(x, weight, adjust, dtype):
    """x @ weight.T (+ adjust) in `dtype`; pass `weight` already cast, once per pass, not once per chunk."""
    out = x.to(dtype) @ weight.to(dtype).T
    if adjust is not None:
        out += adjust.to(dtype)
    return out


def _mm_float32(a, b):
    """a @ b as float32. On CUDA, bf16/fp16 inputs accumulate straight into a float32 result, which
    saves a half-precision [c, d] temporary of the size of half the weight shard."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm(out_dtype=)
            pass
    return (a @ b).float()


def local_softmax_stats(logits: torch.Tensor):
    """Row max and row sum of exp(logit - max) over this rank's classes, in float32; turns `logits`
    into those exponentials in place. An empty shard gives max = -inf and sum = 0."""
    if logits.shape[1] == 0:
        rows = logits.shape[0]
        return (torch.full((rows,), float("-inf"), device=logits.device),
                torch.zeros(rows, device=logits.device))
    m = logits.max(dim=1).values
    logits.sub_(m[:, None]).exp_()
    return m.float(), logits.sum(dim=1, dtype=torch.float32)


def global_softmax_stats(m, s, group, extra: torch.Tensor | None = None):
    """Combine per-rank (max, sum-exp) into the global (max M, denominator S); `extra` [B] is summed
    over ranks in the same all-reduce (the target logit, contributed by its owner only)."""
    big_m = m.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    rescale = torch.exp(m - big_m)  # exp(-inf) = 0 for an empty shard
    packed = torch.stack([s * rescale] + ([extra] if extra is not None else []))
    dist.all_reduce(packed, group=group)
    return big_m, packed[0], rescale, (packed[1] if extra is not None else None)


class ShardedSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of the gathered rows x [B, d] over all classes, holding only weight [c, d].

    target [B] int64: the column of the row's class in `weight`, -1 where another rank owns it.
    adjust [c] or None: added to the logits (logit adjustment); constant for autograd.
    """

    @staticmethod
    def forward(ctx, x, weight, target, adjust, chunk_rows, dtype, group):
        rows = x.shape[0]
        keep = chunk_rows <= 0 or chunk_rows >= rows
        m = torch.empty(rows, device=x.device)
        s = torch.empty(rows, device=x.device)
        t = torch.zeros(rows, device=x.device)
        with no_autocast(x.device):
            w = weight.to(dtype)  # a copy only for a lower precision; freed before backward, which recasts
            for sl in row_chunks(rows, chunk_rows):
                logits = shard_logits(x[sl], w, adjust, dtype)
                tc = target[sl]
                owned = (tc >= 0).nonzero().squeeze(1)
                t[sl][owned] = logits[owned, tc[owned]].float()
                m[sl], s[sl] = local_softmax_stats(logits)
            del w
            big_m, big_s, rescale, t = global_softmax_stats(m, s, group, extra=t)
            losses = torch.log(big_s) + big_m - t
            saved = [x, weight, target, big_m, big_s]
            if keep:  # the one chunk's buffer holds exp(l - m): scale it into the probabilities for backward
                saved.append(logits.mul_((rescale / big_s).to(logits.dtype)[:, None]))
        ctx.save_for_backward(*saved)
        ctx.adjust, ctx.chunk_rows, ctx.dtype, ctx.keep = adjust, chunk_rows, dtype, keep
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, target, big_m, big_s, *probs = ctx.saved_tensors
        rows = x.shape[0]
        scale = grad_loss.float() / rows
        need_x = ctx.needs_input_grad[0]
        grad_x = torch.empty(x.shape, dtype=ctx.dtype, device=x.device) if need_x else None
        grad_w = None
        with no_autocast(x.device):
            w = weight.to(ctx.dtype)
            for sl in row_chunks(rows, ctx.chunk_rows):
                if ctx.keep:
                    p = probs[0]
                else:
                    p = shard_logits(x[sl], w, ctx.adjust, ctx.dtype)
                    p.sub_(big_m[sl, None].to(p.dtype)).exp_().div_(big_s[sl, None].to(p.dtype))
                tc = target[sl]
                owned = (tc >= 0).nonzero().squeeze(1)
                p[owned, tc[owned]] -= 1
                p.mul_(scale.to(p.dtype))
                if need_x:
                    grad_x[sl] = p @ w
                xs = x[sl].to(ctx.dtype)
                if grad_w is None:
                    grad_w = _mm_float32(p.T, xs).to(weight.dtype)
                elif grad_w.dtype == p.dtype:
                    grad_w.addmm_(p.T, xs)  # accumulates without a second [c, d] temporary
                else:
                    grad_w += p.T @ xs
        return (grad_x.to(x.dtype) if need_x else None), grad_w, None, None, None, None, None


def sharded_cross_entropy(x, weight, target, adjust=None, chunk_rows=0, dtype=None, group=None):
    """Functional form of `ShardedSoftmaxCE` on already gathered rows (see the class)."""
    dtype = dtype or weight.dtype
    return ShardedSoftmaxCE.apply(x, weight, target, adjust, int(chunk_rows), dtype, group)
