"""Process-group lifecycle and the few collectives the sharded classifier needs.

One code path for every world size: under `torchrun` the rank and world size come from the environment;
without it a 1-process group is started on a free localhost port, so a single-GPU or CPU run exercises
exactly the collectives a multi-rank run does.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# torch 2.14 deprecates the `*_tensor` forms in favour of `*_single`; older releases only have the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _info() -> DistInfo:
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group `torchrun` describes, or start a 1-process group when there is none.

    Backend: nccl when CUDA is available, else gloo. Calling it again returns the existing group's info.
    """
    if dist.is_initialized():
        return _info()
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if present and len(present) < len(_TORCHRUN_VARS):
        missing = sorted(set(_TORCHRUN_VARS) - set(present))
        raise RuntimeError(f"incomplete torchrun environment: {present} set but {missing} missing")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if present:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        # Port 0: the store binds a free port itself, so two single-process runs on one host never collide.
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return _info()


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0, and in a process that never joined a group."""
    return rank() == 0


def barrier() -> None:
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def require_group(group=None):
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call sicot.parallel.dist.init_from_env() first "
            "(it starts a 1-process group when not launched by torchrun)"
        )
    return group if group is not None else dist.group.WORLD


def gather_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's row count, in rank order."""
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = torch.empty(world_size(group), dtype=torch.int64, device=device)
    _all_gather_single(out, local, group=group)
    return out.tolist()


def padded_rows(sizes: list[int], device: torch.device) -> torch.Tensor | None:
    """Row indices of the real rows inside a gather padded to max(sizes) per rank (None: no padding)."""
    top = max(sizes)
    if all(s == top for s in sizes):
        return None
    return torch.cat([torch.arange(r * top, r * top + s, device=device) for r, s in enumerate(sizes)])


def all_gather_rows(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different row counts. No autograd.

    gloo's all-gather takes equal sizes only, so each rank pads to the largest count and the padding
    is dropped after the gather."""
    top = max(sizes)
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((len(sizes) * top, *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    keep = padded_rows(sizes, x.device)
    return out if keep is None else out.index_select(0, keep)


def reduce_scatter_rows(grad: torch.Tensor, sizes: list[int], rank_: int, group=None) -> torch.Tensor:
    """Inverse of `all_gather_rows` for gradients: sum every rank's copy, return this rank's rows."""
    top = max(sizes)
    keep = padded_rows(sizes, grad.device)
    if keep is not None:
        full = grad.new_zeros((len(sizes) * top, *grad.shape[1:]))
        full.index_copy_(0, keep, grad)
        grad = full
    out = grad.new_empty((top, *grad.shape[1:]))
    _reduce_scatter_single(out, grad.contiguous(), group=group)
    return out[: sizes[rank_]]
