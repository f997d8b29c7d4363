"""Per-rank peak memory and step time of the class-sharded classifier alone, on CPU ranks (gloo).

Measured, not asserted; results go to docs/benchmarks.md. One training step = loss (all-gather,
distributed softmax cross-entropy), backward, SGD step (momentum 0.9, weight decay 5e-4, fused by
default), for a fixed
global batch split over N ranks, so every term of the per-rank memory should fall as 1/N.

How memory is measured: each rank is a fresh process. Before each phase (forward, backward, optimizer
step) the kernel's resident-set high-water mark is reset (`/proc/self/clear_refs` <- 5) and read after
it (`VmHWM` in /proc/self/status, the counter behind getrusage's ru_maxrss); the resident set before
the classifier exists (torch + process group) is subtracted. glibc serves tensors this large with mmap
and returns them on free, so the high-water mark follows live tensors; torch keeps no CPU allocator
statistics to ask instead. tracemalloc does not see torch's allocations at all.

    python benchmarks/fc_memory.py                      # the default grid (under 10 min on 2 cores)
    python benchmarks/fc_memory.py --classes 1000000 --dims 512 --worlds 1 --chunk-rows 32
    python benchmarks/fc_memory.py --model              # the memory model table for docs/benchmarks.md
    python benchmarks/fc_memory.py --scoring --classes 1000000 --dims 512 --limit-mb 256

`--scoring` measures inference instead: exact softmax top-k of a batch of features against a W stored
as two shard files (a 2-rank export), in a fresh process per path: W loaded whole (`full`, today's
one-matrix path) or read a block at a time under `max_classifier_mb` (`blocks`, sicot.model.block_topk).
The peak counts what the path adds to the process, W's mapped file pages included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
RESERVE_GIB = 8.0  # backbone, activations and workspace left beside the classifier in the --model table
GPUS = {"V100-32G": 31.7, "H100-80G": 79.1, "H200-141G": 139.0}  # usable GiB


def fc_bytes(classes, dim, world, rows, chunk_rows=0, sample_rate=1.0, logit_bytes=4, optimizer_temp=False):
    """Model of one rank's peak classifier memory (bytes).

    Backward holds weight, momentum and weight gradient (3 W/N), the [rows, C/N] logit buffer (rows =
    gathered batch, or chunk_rows), the gathered features and their gradient; with class sampling also
    the sampled weight rows and their gradient. A non-fused SGD step with weight decay then briefly
    holds a fourth W/N (grad + wd * weight) after the logits are gone.
    """
    shard = math.ceil(classes / world)
    weight = 4 * shard * dim
    kept = math.ceil(shard * sample_rate)
    logit_rows = min(chunk_rows, rows) if chunk_rows > 0 else rows
    backward = 3 * weight + logit_rows * kept * logit_bytes + 2 * 4 * rows * dim
    if sample_rate < 1:
        backward += 2 * 4 * kept * dim
    return max(backward, 4 * weight if optimizer_temp else 0)


# -- measurement (one rank) ------------------------------------------------------------------------

def _hwm_reset():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _status_kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _rank(rank, world, port, cfg, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from sicot.parallel import ShardedClassifier
    from sicot.parallel import dist as pdist

    pdist.init_from_env(backend="gloo")
    base = _status_kib("VmRSS")
    _hwm_reset()
    t0 = time.perf_counter()
    clf = ShardedClassifier(cfg["dim"], cfg["classes"], chunk_rows=cfg["chunk_rows"], sample_rate=cfg["sample_rate"])
    init_s = time.perf_counter() - t0
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          fused=cfg["optimizer"] == "fused")
    rows = torch.arange(cfg["batch"]).chunk(world)
    local = len(rows[rank]) if rank < len(rows) else 0
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(local, cfg["dim"], generator=gen).requires_grad_()
    y = torch.randint(0, cfg["classes"], (local,), generator=gen)
    peaks = {"forward": 0, "backward": 0, "step": 0}
    times = []
    for i in range(1 + cfg["steps"]):  # the first step allocates the momentum buffer: not timed
        pdist.barrier()
        t0 = time.perf_counter()
        phase_peaks = {}
        _hwm_reset()
        loss = clf.loss(x, y)
        phase_peaks["forward"] = _status_kib("VmHWM")
        _hwm_reset()
        loss.backward()
        phase_peaks["backward"] = _status_kib("VmHWM")
        _hwm_reset()
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None
        phase_peaks["step"] = _status_kib("VmHWM")
        if i:
            times.append(time.perf_counter() - t0)
            peaks = {k: max(peaks[k], v) for k, v in phase_peaks.items()}
    result = {
        "rank": rank, "base_gib": base * 1024 / GIB, "init_s": init_s, "step_s": statistics.median(times),
        "loss": loss.detach().item(), **{f"{k}_gib": (v - base) * 1024 / GIB for k, v in peaks.items()},
    }
    result["peak_gib"] = max(result[f"{k}_gib"] for k in peaks)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    pdist.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _available_gib():
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) for line in fh}
    return info["MemAvailable"] * 1024 / GIB


def measure(cfg, budget_gib):
    """One configuration in fresh processes; the worst rank's numbers, or a reason it was skipped."""
    import torch.multiprocessing as mp

    world = cfg["world"]
    model = fc_bytes(cfg["classes"], cfg["dim"], world, cfg["batch"], cfg["chunk_rows"], cfg["sample_rate"],
                     optimizer_temp=cfg["optimizer"] == "plain") / GIB
    need = world * (model + 0.6)
    room = min(budget_gib, 0.9 * _available_gib())
    if need > room:
        return {**cfg, "skipped": f"needs ~{need:.1f} GiB over {world} rank(s), {room:.1f} GiB available"}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        mp.start_processes(_rank, args=(world, _free_port(), cfg, out), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    worst = {k: max(r[k] for r in ranks) for k in ranks[0] if k not in ("rank", "loss")}
    return {**cfg, **worst, "model_gib": model, "loss": ranks[0]["loss"], "wall_s": time.perf_counter() - t0}


def _table(rows):
    head = ("| C | d | N | global batch | chunk_rows | sample_rate | SGD | peak/rank GiB (fwd / bwd / step) "
            "| model GiB | ratio vs N=1 | step s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ones = {(r["classes"], r["dim"], r["chunk_rows"], r["sample_rate"]): r for r in rows
            if r["world"] == 1 and "skipped" not in r}
    for r in rows:
        key = (f"| {r['classes']:,} | {r['dim']} | {r['world']} | {r['batch']} | {r['chunk_rows']} | "
               f"{r['sample_rate']} | {r['optimizer']} |")
        if "skipped" in r:
            lines.append(f"{key} skipped: {r['skipped']} | | | |")
            continue
        one = ones.get((r["classes"], r["dim"], r["chunk_rows"], r["sample_rate"]))
        ratio = f"{r['peak_gib'] / one['peak_gib']:.2f}" if one and r["world"] > 1 else ""
        lines.append(f"{key} {r['peak_gib']:.2f} ({r['forward_gib']:.2f} / {r['backward_gib']:.2f} / "
                     f"{r['step_gib']:.2f}) | {r['model_gib']:.2f} | {ratio} | {r['step_s']:.2f} |")
    return "\n".join(lines)


# -- scoring (inference) ----------------------------------------------------------------------------

def _write_shards(classes, dim, directory):
    """W [classes, dim] as the two shard files of a 2-rank export; returns their RowFiles."""
    import torch

    from sicot.model.classifier_rows import RowFile, save_shard
    from sicot.parallel import shard_range

    files = []
    for rank in range(2):
        lo, hi = shard_range(classes, 2, rank)
        rows = torch.randn(hi - lo, dim, generator=torch.Generator().manual_seed(rank))
        entry = save_shard(str(Path(directory, "model.pt")), rows, lo, rank, 2, "bench")
        files.append(RowFile(str(Path(directory, entry["file"])), lo, hi))
    return files


def _score(_, path, cfg, files, out):
    import torch

    from sicot.model.block_topk import block_rows, blockwise_topk
    from sicot.model.classifier_rows import ClassifierRows

    torch.set_num_threads(os.cpu_count() or 1)
    features = torch.randn(cfg["batch"], cfg["dim"], generator=torch.Generator().manual_seed(7))
    stored = ClassifierRows(files, cfg["dim"])
    base = _status_kib("VmRSS")
    _hwm_reset()
    t0 = time.perf_counter()
    if path == "full":
        weight = stored.load()
        probs, idx = torch.softmax(features @ weight.T, dim=-1).topk(cfg["k"], dim=-1)
    else:
        rows = block_rows(int(cfg["limit_mb"] * 2**20), cfg["dim"], cfg["batch"])
        probs, idx = blockwise_topk(features, stored.blocks(rows), cfg["k"], stored.num_classes)
    result = {"path": path, "peak_gib": (_status_kib("VmHWM") - base) * 1024 / GIB,
              "seconds": time.perf_counter() - t0, "top1": idx[:, 0].tolist(), "p1": probs[:, 0].tolist()}
    Path(out, f"{path}.json").write_text(json.dumps(result))


def scoring(classes, dim, batch, k, limit_mb):
    """Both scoring paths on the same stored W; their peaks, times and whether their answers agree."""
    import torch.multiprocessing as mp

    cfg = {"classes": classes, "dim": dim, "batch": batch, "k": k, "limit_mb": limit_mb}
    with tempfile.TemporaryDirectory() as directory:
        files = _write_shards(classes, dim, directory)
        for path in ("full", "blocks"):
            mp.start_processes(_score, args=(path, cfg, files, directory), nprocs=1, start_method="spawn")
        full, blocks = (json.loads(Path(directory, f"{p}.json").read_text()) for p in ("full", "blocks"))
    gap = max(abs(a - b) for a, b in zip(full["p1"], blocks["p1"]))
    rows = [f"| {r['path']} | {classes:,} | {dim} | {batch} | {limit_mb if r['path'] == 'blocks' else '-'} | "
            f"{4 * classes * dim / GIB:.2f} | {r['peak_gib']:.2f} | {r['seconds']:.2f} |" for r in (full, blocks)]
    head = ["| path | C | d | batch | max_classifier_mb | W GiB | peak added GiB | seconds |", "|---" * 8 + "|"]
    return "\n".join(head + rows) + (f"\n\nsame top-1 classes: {full['top1'] == blocks['top1']}; largest top-1 "
                                      f"probability difference: {gap:.1e} (float32 matmuls of other shapes)")


# -- memory model table ------------------------------------------------------------------------------

def _min_ranks(classes, dim, capacity, per_rank_batch, chunk_rows, logit_bytes):
    for world in (2**i for i in range(13)):
        total = fc_bytes(classes, dim, world, per_rank_batch * world, chunk_rows, 1.0, logit_bytes) / GIB
        if total + RESERVE_GIB <= capacity:
            return world
    return None


def model_table(per_rank_batch=256):
    def fmt(b):
        return f"{b / GIB:,.1f}"
    out = [f"Per-rank batch {per_rank_batch}; weight, grad, momentum and logits in fp32 (a fused optimizer: no "
           f"weight-decay temporary); {RESERVE_GIB:.0f} GiB per GPU left for backbone, activations and workspace; "
           "GPU counts are powers of two.", "",
           "| C | d | W+grad+mom, all ranks (GiB) | logits/rank, unchunked fp32 (GiB) | "
           + " | ".join(f"{g}: min GPUs, unchunked / chunk_rows 256" for g in GPUS) + " |",
           "|---|---|---|---|" + "---|" * len(GPUS)]
    for classes in (10**6, 10**7, 10**8):
        for dim in (512, 2048):
            cells = []
            for cap in GPUS.values():
                a = _min_ranks(classes, dim, cap, per_rank_batch, 0, 4)
                b = _min_ranks(classes, dim, cap, per_rank_batch, 256, 4)
                cells.append(f"{a or 'never'} / {b or '> 4096'}")
            out.append(f"| {classes:,} | {dim} | {fmt(12 * classes * dim)} | {fmt(4 * per_rank_batch * classes)} | "
                       + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=256, help="global batch, split over the ranks")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--chunk-rows", type=int, default=0)
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--optimizer", choices=["fused", "plain"], default="fused",
                   help="SGD implementation; plain (non-fused) with weight decay needs a fourth W/N in its step")
    p.add_argument("--budget-gib", type=float, default=24.0, help="skip configurations needing more (all ranks)")
    p.add_argument("--out", default=".bench/fc_memory.jsonl", help="results, one JSON object per line")
    p.add_argument("--model", action="store_true", help="print the memory model table and exit")
    p.add_argument("--scoring", action="store_true", help="measure top-k scoring (inference), W whole vs in blocks")
    p.add_argument("--limit-mb", type=float, default=256.0, help="--scoring: max_classifier_mb of the block path")
    p.add_argument("--k", type=int, default=3, help="--scoring: classes returned per row")
    args = p.parse_args(argv)
    if args.model:
        print(model_table())
        return
    if args.scoring:
        print(scoring(args.classes[0], args.dims[0], args.batch, args.k, args.limit_mb))
        return
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for classes in args.classes:
        for dim in args.dims:
            for world in args.worlds:
                cfg = {"classes": classes, "dim": dim, "world": world, "batch": args.batch, "steps": args.steps,
                       "chunk_rows": args.chunk_rows, "sample_rate": args.sample_rate, "optimizer": args.optimizer}
                row = measure(cfg, args.budget_gib)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
