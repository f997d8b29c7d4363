"""Wall time and peak memory of every pipeline step as the catalogue grows, each step a fresh process.

    python -m benchmarks.scale --skus 1000 10000          # resumes: steps already measured are kept
    python -m benchmarks.scale --skus 10000 --fresh       # forget size 10000's results and outputs first
    python -m benchmarks.scale --report                   # the table of every size measured so far

Per size N, in `.bench/scale/<N>/` (every `paths.*` there, its own MLflow store `mlflow.db`, the step
logs in `logs/`, the results in `results.json`), on the repo's params.yaml plus `WORLD` and `PIPELINE`:
the demo world of N SKUs (max(12, N / 1000) brands) at 64 px (max 25 training images per class,
imbalance 25, exponential: ~7.4 training images per class on average, plus 1 validation, 2 test and 1
catalog image, so 100k SKUs make ~1.04M images plus 100k catalog images), then the steps as a user runs
them:

- generate: `sicot.data.worlds.generate` (what `prepare_data` runs first for `data.source: synthetic`);
- `components.prepare_data` on the generated directory (validation decodes every image);
- `components.train_word2vec`;
- `components.train_model` SICoT under `torchrun --standalone --nproc-per-node=2`, `train.fc=sharded`,
  bounded (the engine has no step limit) to 1 epoch over a subset holding `--train-per-class` training
  images of every class (`train_subset/`: the same classes, validation and test; not measured);
- `components.evaluate_model`, `components.promote_model` (registers the model and makes it champion),
  `components.publish_index`;
- query: `mlflow.pyfunc.load_model("models:/sicot@champion")` answers one test photo from the index.

Per step: wall time; CPU time (user + system of the step's whole process tree, from `os.wait4`), which
the shared machine's load disturbs less; peak RSS from `os.wait4` (`ru_maxrss`: the largest single
process of the tree, so one rank under torchrun, not their sum) and the largest RSS summed over the tree,
sampled every 0.5 s (torchrun plus both ranks); the 1-minute load average before and after.
Benchmarks measure, they assert nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

from sicot.config import load_params
from sicot.data.prepared import load_prepared
from sicot.data.shards import INDEX, ShardWriter, split_images, write_index

PROJECT = Path(__file__).resolve().parents[1]
ROOT = PROJECT / ".bench" / "scale"
WORLD = ["data.source=synthetic", "data.max_images=25", "data.imbalance=25", "data.profile=exponential",
         "data.val_per_class=1", "data.test_per_class=2", "data.image_size=64"]
PIPELINE = ["train.mode=sicot", "train.fc=sharded", "train.nproc=2", "train.epochs=1", "train.threads=1",
            "train.workers=0", "promote.candidate=sicot"]
PATHS = ("raw", "prepared", "word2vec", "models", "reports", "index")

GENERATE = """import json, sys
from sicot.config import load_params
from sicot.data.worlds import generate
params = load_params(sys.argv[1])
print(json.dumps(generate(params.paths.raw, params.data)))
"""
QUERY = """import json, sys
import mlflow, pandas as pd
from sicot import storage
from sicot.config import load_params
params = load_params(sys.argv[1])
from sicot.data.shards import INDEX, Shard, split_images
with open(storage.join(params.paths.prepared, "test.jsonl"), encoding="utf-8") as lines:
    record = json.loads(next(lines))
first = Shard(**json.loads(storage.read_text(storage.join(params.paths.prepared, INDEX)))["splits"]["test"][0])
photo = next(split_images(params.paths.prepared, [first]))[2]
service = mlflow.pyfunc.load_model(f"models:/{params.promote.model_name}@champion")
print(json.dumps({"sku": record["sku"], "answer": service.predict(pd.DataFrame({"image": [photo]}))[0]}))
"""


def steps(params_file: Path, workdir: Path) -> dict[str, list[str]]:
    """Each step's command line, run from the size's directory."""
    py, pf = sys.executable, ["--params", str(params_file)]
    raw, subset = workdir / "raw", workdir / "train_subset"
    return {
        "generate": [py, "-c", GENERATE, str(params_file)],
        "prepare_data": [py, "-m", "components.prepare_data", *pf, "--set", f"data.source={raw}"],
        "train_word2vec": [py, "-m", "components.train_word2vec", *pf],
        "train_model": [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "components.train_model", *pf, "--set", f"paths.prepared={subset}"],
        "evaluate_model": [py, "-m", "components.evaluate_model", *pf],
        "promote_model": [py, "-m", "components.promote_model", *pf],
        "publish_index": [py, "-m", "components.publish_index", *pf],
        "query": [py, "-c", QUERY, str(params_file)],
    }


def write_params(workdir: Path, skus: int) -> Path:
    """The size's params file: the repo's params.yaml, the benchmark's world and pipeline, paths in `workdir`."""
    paths = [f"paths.{name}={workdir / name}" for name in PATHS]
    # A brand's product lines offer ~150 variants each: past ~10k SKUs the world needs more brands.
    world = [*WORLD, f"data.skus={skus}", f"data.brands={max(12, skus // 1000)}"]
    params = load_params(PROJECT / "params.yaml", [*world, *PIPELINE, *paths])
    out = workdir / "params.yaml"
    out.write_text(yaml.safe_dump(params.to_dict(), allow_unicode=True), encoding="utf-8")
    return out


def write_train_subset(prepared: Path, out: Path, per_class: int) -> int:
    """The prepared dataset with at most `per_class` training images of each class (other files
    hard-linked); returns its training images."""
    manifest = load_prepared(str(prepared))
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(prepared, out, copy_function=os.link, ignore=shutil.ignore_patterns("train*"))
    kept: Counter[str] = Counter()
    writer, lines = ShardWriter(out, "train", 1000, 100 * 2 ** 20), []
    for _, record, data in split_images(str(prepared), manifest.shards["train"]):
        if kept[record.sku] < per_class:
            kept[record.sku] += 1
            writer.add(record, data)
            lines.append(record.to_json() + "\n")
    (out / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    (out / INDEX).unlink()  # a hard link to the full dataset's index
    write_index(out, {**manifest.shards, "train": writer.close()})
    return len(lines)


def measure(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run `cmd` to completion; its wall time, wait4's ru_maxrss and the sampled peak RSS of its tree."""
    load_before = os.getloadavg()[0]
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        tree_peak = [0]
        done = threading.Event()
        sampler = threading.Thread(target=sample_tree, args=(proc.pid, tree_peak, done), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed with exit code {proc.returncode} (log {log}):\n"
                           + "\n".join(tail))
    return {"seconds": round(seconds, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "maxrss_mb": round(usage.ru_maxrss / 1024),
            "tree_rss_mb": round(tree_peak[0] / 2**20), "load_before": round(load_before, 1),
            "load_after": round(os.getloadavg()[0], 1)}


def sample_tree(pid: int, peak: list[int], done: threading.Event, every_s: float = 0.5) -> None:
    """Keep in `peak[0]` the largest RSS summed over `pid` and its descendants seen until `done`."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not done.wait(every_s):
        total = 0
        try:
            for process in [root, *root.children(recursive=True)]:
                total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a child ended between the listing and the read
            continue
        peak[0] = max(peak[0], total)


def run_size(skus: int, fresh: bool, train_per_class: int) -> dict:
    workdir = ROOT / str(skus)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    measured_with = results.get("train_subset", {}).get("per_class", train_per_class)
    if measured_with != train_per_class:
        raise SystemExit(f"{results_file}: trained with --train-per-class {measured_with}; add --fresh to measure "
                         f"{skus} SKUs again with {train_per_class}")
    params_file = write_params(workdir, skus)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    for name, cmd in steps(params_file, workdir).items():
        if name in results:
            continue  # measured by an earlier run; --fresh measures again
        if name == "train_model":
            images = write_train_subset(workdir / "prepared", workdir / "train_subset", train_per_class)
            results["train_subset"] = {"per_class": train_per_class, "images": images}
        print(f"{skus} SKUs: {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(cmd, workdir, env, workdir / "logs" / f"{name}.log")
        if name == "generate":
            results[name]["images"] = sum(json.loads((workdir / "raw" / "world.json").read_text())
                                          ["stats"]["images"].values())
        print(f"  {results[name]}", file=sys.stderr, flush=True)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    return results


def report() -> str:
    """A markdown table of every size under ROOT: per step, time and memory per size, growth between the
    two largest sizes."""
    sizes = sorted(int(p.name) for p in ROOT.glob("*") if (p / "results.json").is_file())
    if not sizes:
        return "no results yet"
    measured = {n: json.loads((ROOT / str(n) / "results.json").read_text()) for n in sizes}
    head = "| step | " + " | ".join(f"{n:,} SKUs: wall (CPU) s / MB (tree MB) / load" for n in sizes)
    grow = len(sizes) > 1
    if grow:
        small, large = sizes[-2:]
        head += f" | growth {small:,}→{large:,}: wall (CPU) / memory"
    lines = [head + " |", "|---" + "|---:" * (len(sizes) + grow) + "|"]
    for name in steps(Path(), Path()):
        cells = []
        for n in sizes:
            r = measured[n].get(name)
            cells.append(f"{r['seconds']:,} ({r.get('cpu_s', '?')}) / {r['maxrss_mb']:,} ({r['tree_rss_mb']:,}) / "
                         f"{r['load_before']}–{r['load_after']}" if r else "—")
        if grow:
            a, b = measured[small].get(name), measured[large].get(name)
            cpu = f"{b['cpu_s'] / a['cpu_s']:.1f}×" if a and b and "cpu_s" in a and "cpu_s" in b else "?"
            cells.append(f"{b['seconds'] / a['seconds']:.1f}× ({cpu}) / {b['maxrss_mb'] / a['maxrss_mb']:.1f}×"
                         if a and b else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skus", type=int, nargs="*", default=[], help="catalogue sizes to measure, smallest first")
    p.add_argument("--fresh", action="store_true", help="delete each size's directory and measure it again")
    p.add_argument("--train-per-class", type=int, default=1,
                   help="training images of each class in the one training epoch (default 1)")
    p.add_argument("--report", action="store_true", help="only print the table of the sizes measured")
    args = p.parse_args()
    if not args.report:
        for skus in args.skus:
            run_size(skus, args.fresh, args.train_per_class)
    print(report())


if __name__ == "__main__":
    main()
