"""Step time and peak memory of the class-sharded classifier on one GPU (world size 1, nccl).

One step = loss (distributed softmax cross-entropy through a 1-rank group), backward, SGD step
(momentum 0.9, weight decay 5e-4; fused on CUDA). Peak memory: torch.cuda.max_memory_allocated per
variant; on CPU (a dry check) the resident-set high-water mark instead. Prints one JSON object.

    python benchmarks/fc_gpu.py                                   # C = 1M, d = 2048, on the GPU
    python benchmarks/fc_gpu.py --classes 10000 --steps 2         # dry check, runs on CPU too

Variants: `bf16` (bf16 logits), `fp32`, `tf32` (fp32 logits, TF32 matmuls), and options after a colon:
`bf16:chunk=64` (chunk_rows), `bf16:sample=0.1` (Partial-FC sample rate).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sicot.parallel import ShardedClassifier  # noqa: E402
from sicot.parallel import dist as pdist

GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_hwm_gib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 2**20


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else _cpu_hwm_gib()


def parse_variant(text):
    name, _, opts = text.partition(":")
    if name not in DTYPES:
        raise ValueError(f"variant {text!r}: logits dtype must be one of {sorted(DTYPES)}")
    cfg = {"name": text, "logits_dtype": DTYPES[name], "tf32": name == "tf32", "chunk_rows": 0, "sample_rate": 1.0}
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        if key == "chunk":
            cfg["chunk_rows"] = int(value)
        elif key == "sample":
            cfg["sample_rate"] = float(value)
        else:
            raise ValueError(f"variant {text!r}: unknown option {key!r} (chunk=, sample=)")
    return cfg


def correctness(device, classes=4096, dim=256, batch=64):
    """Loss and gradients against F.cross_entropy (fp32) on this device: max error / max reference."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, dim, device=device, generator=gen)
    y = torch.randint(0, classes, (batch,), device=device, generator=gen)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        clf = ShardedClassifier(dim, classes, logits_dtype=dtype, device=device)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        w = clf.weight.detach().clone().requires_grad_()
        loss = clf.loss(xs, y)
        loss.backward()
        ref = F.cross_entropy(xr @ w.T, y)
        ref.backward()
        def rel(a, b):
            return ((a - b).abs().max() / b.abs().max()).item()
        out[name] = {"loss_rel": rel(loss.detach(), ref.detach()), "feature_grad_rel": rel(xs.grad, xr.grad),
                     "weight_grad_rel": rel(clf.weight.grad, w.grad)}
    return out


def run_variant(cfg, args, device):
    _reset_peak(device)
    base = _peak_gib(device)
    clf = ShardedClassifier(args.dim, args.classes, chunk_rows=cfg["chunk_rows"], sample_rate=cfg["sample_rate"],
                            logits_dtype=cfg["logits_dtype"], device=device)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          fused=device.type == "cuda" or None)
    gen = torch.Generator(device=device).manual_seed(0)
    if cfg["tf32"]:
        torch.set_float32_matmul_precision("high")
    times = []
    for i in range(args.warmup + args.steps):
        # a fresh batch each step, so the loss stays that of an untrained classifier (~ log C)
        x = torch.randn(args.batch, args.dim, device=device, generator=gen).requires_grad_()
        y = torch.randint(0, args.classes, (args.batch,), device=device, generator=gen)
        _sync(device)
        t0 = time.perf_counter()
        loss = clf.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    torch.set_float32_matmul_precision("highest")
    step = statistics.median(times)
    out = {**{k: v for k, v in cfg.items() if k != "logits_dtype"},
           "step_ms": 1000 * step, "rows_per_s": args.batch / step, "peak_gib": _peak_gib(device) - base,
           "weight_gib": clf.weight.numel() * clf.weight.element_size() / GIB, "loss": loss.detach().item()}
    del clf, opt, x, y, loss
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="bf16,bf16:chunk=64,bf16:sample=0.1,fp32,tf32")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(",")]
    info = pdist.init_from_env()
    device = info.device
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "backend": info.backend, "world_size": info.world_size, "torch": torch.__version__,
              "classes": args.classes, "dim": args.dim, "batch": args.batch, "steps": args.steps,
              "correctness": correctness(device), "variants": []}
    for cfg in variants:
        result["variants"].append(run_variant(cfg, args, device))
    pdist.cleanup()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
