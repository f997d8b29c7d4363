"""Sharded checkpoints of a `ShardedClassifier`, loadable at any world size.

The weight and its weight-shaped optimizer state (SGD momentum, Adam moments) are saved with
`torch.distributed.checkpoint` as DTensors `Shard(0)` over the classifier's group: every rank writes only
its shard, and a later run with another world size reads back exactly the rows it now owns. Scalar
optimizer state (Adam's step) is saved once. `meta.json` records the class count, dimension, world size
and class ranges; it is checked before anything is loaded, so a checkpoint of another model fails with
a clear error and leaves the classifier and optimizer untouched.

The directory is a local path or an `s3://` URI. Every rank writes its own shard there through
`torch.distributed.checkpoint` (s3fs for S3, which finds the endpoint and credentials where boto3 does:
`AWS_ENDPOINT_URL`, `AWS_*` keys), so ranks on different machines need no shared disk. `meta.json` is
removed first and written last, once every rank's shard and DCP's own `.metadata` are complete: a
directory without it is no checkpoint. S3 has no directory rename, so a caller that switches between
checkpoints writes each to a new directory and names it afterwards in one atomic write (as
`sicot.train`'s checkpoint.pt does).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from sicot import storage
from sicot.parallel.sharded_classifier import ShardedClassifier, shard_range

FORMAT = "sicot.sharded_classifier/1"
META = "meta.json"


def _as_dtensor(local: torch.Tensor, clf: ShardedClassifier, mesh: DeviceMesh) -> DTensor:
    shape = (clf.num_classes, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _meta_uri(ckpt_dir: str | Path) -> str:
    return storage.join(str(ckpt_dir), META)


def _mesh(clf: ShardedClassifier) -> DeviceMesh:
    return DeviceMesh.from_group(clf.group, clf.weight.device.type)


def _optimizer_entries(clf: ShardedClassifier, optimizer) -> dict[str, torch.Tensor]:
    if optimizer is None:
        return {}
    state = optimizer.state.get(clf.weight, {})
    return {k: v for k, v in state.items()
            if torch.is_tensor(v) and (v.shape == clf.weight.shape or v.dim() == 0)}


def save(ckpt_dir: str | Path, clf: ShardedClassifier, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: every rank of the classifier's group calls it with the same `ckpt_dir`."""
    mesh = _mesh(clf)
    state = {"weight": _as_dtensor(clf.weight.detach(), clf, mesh)}
    kinds = {}
    for key, value in _optimizer_entries(clf, optimizer).items():
        sharded = value.dim() > 0
        state[f"optimizer.{key}"] = _as_dtensor(value, clf, mesh) if sharded else value
        kinds[key] = "sharded" if sharded else "replicated"
    meta = {
        "format": FORMAT, "num_classes": clf.num_classes, "dim": clf.dim, "world_size": clf.world_size,
        "class_ranges": [shard_range(clf.num_classes, clf.world_size, r) for r in range(clf.world_size)],
        "dtype": str(clf.weight.dtype).removeprefix("torch."), "optimizer_state": kinds,
    }
    ckpt_dir = str(ckpt_dir)
    if clf.rank == 0:  # nothing of an earlier save (its meta.json above all) may outlive this one's start
        storage.delete_tree(ckpt_dir)
    dist.barrier(clf.group)
    with warnings.catch_warnings():  # an S3 object is durable once its upload returns: no fsync to do
        warnings.filterwarnings("ignore", message="fsync not supported")
        dcp.save(state, checkpoint_id=ckpt_dir, process_group=clf.group)
    if clf.rank == 0:  # dcp.save returns on rank 0 after every rank's shard and .metadata are written
        storage.write_text(_meta_uri(ckpt_dir), json.dumps(meta, indent=1) + "\n")
    dist.barrier(clf.group)  # nobody returns before the checkpoint is complete


def read_metadata(ckpt_dir: str | Path) -> dict:
    path = _meta_uri(ckpt_dir)
    try:
        meta = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a sharded classifier checkpoint (no {META})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: damaged ({exc}); the sharded checkpoint cannot be used") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    return meta


def _check_compatible(ckpt_dir, meta: dict, clf: ShardedClassifier) -> None:
    for field, have in (("num_classes", clf.num_classes), ("dim", clf.dim)):
        if meta[field] != have:
            raise ValueError(f"{_meta_uri(ckpt_dir)}: {field} is {meta[field]}, the classifier has {have}; "
                             "nothing was loaded")


def load(ckpt_dir: str | Path, clf: ShardedClassifier, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Collective: fill `clf`'s shard (and the optimizer's state for it) from a checkpoint written at
    any world size. Everything is read into new buffers first; only then copied in. Returns the metadata."""
    meta = read_metadata(ckpt_dir)
    _check_compatible(ckpt_dir, meta, clf)
    mesh = _mesh(clf)
    state = {"weight": _as_dtensor(torch.empty_like(clf.weight.detach()), clf, mesh)}
    kinds = meta["optimizer_state"] if optimizer is not None else {}
    for key, kind in kinds.items():  # scalar state (Adam's step) lives on CPU, as torch.optim keeps it
        target = torch.empty_like(clf.weight.detach())
        state[f"optimizer.{key}"] = _as_dtensor(target, clf, mesh) if kind == "sharded" else torch.empty(())
    try:
        dcp.load(state, checkpoint_id=str(ckpt_dir), process_group=clf.group)
    except Exception as exc:  # every rank reads the same files, so every rank fails alike
        raise ValueError(f"{ckpt_dir}: the sharded classifier checkpoint is damaged ({type(exc).__name__}: "
                         f"{str(exc).strip()[:200]}); nothing was loaded") from None
    with torch.no_grad():
        clf.weight.copy_(state["weight"].to_local())
    for key in kinds:
        value = state[f"optimizer.{key}"]
        optimizer.state[clf.weight][key] = value.to_local() if isinstance(value, DTensor) else value
    return meta


def consolidate(ckpt_dir: str | Path) -> torch.Tensor:
    """The whole W [C, d] on CPU, for serving; needs no process group."""
    meta = read_metadata(ckpt_dir)
    full = torch.empty(meta["num_classes"], meta["dim"], dtype=getattr(torch, meta["dtype"]))
    with warnings.catch_warnings():  # torch warns that no_dist means one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"weight": full}, checkpoint_id=str(ckpt_dir), no_dist=True)
    return full
