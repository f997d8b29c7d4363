"""When does co-training lift the tail? A seeded study of the SICoT formulation on two evaluation sets.

    python -m benchmarks.cotrain_study                      # the full study (GPU: minutes; 2 CPU cores: hours)
    python -m benchmarks.cotrain_study --quick              # a smoke run of the whole procedure
    python -m benchmarks.cotrain_study --report .bench/study/results.jsonl   # tables from stored results

Evaluation sets (the demo world generator, two configurations of its titles):
- `informative`: the default demo world (title_noise 0.3): a title-only classifier far beats images;
- `noisy`: title_noise 0.9: titles are mostly promotional noise.

Procedure, with every choice made on the validation split and the test split only reported:
1. Screen, one change at a time from the naive formulation on both sets (`--screen-seeds`): the loss
   weight and its ramp-up (epochs of visual warm-up). Stopping gradients in the mixed branch (into v,
   or into W), matching the scale of s to v before the max, word dropout and title dropout were
   screened too (commit 5bb4ac4 has them) and removed: none helped (docs/method.md).
2. Per axis, the value with the best mean validation top-1 (class-balanced, so tail-weighted) over
   both sets is kept when it brings co-training at least to the visual-only baseline; `final`
   combines the kept values.
3. Tables (`--seeds`): baseline, baseline + logit adjustment, naive, final, final + logit adjustment,
   mean ± std over seeds of overall/head/tail/many/medium/few top-1 and top-3, and the paired (same
   seed) difference against the baseline with its spread. `--encoders` adds the text-encoder
   ablation of the shipped form on the informative set (the demo world).

Results stream to `<workdir>/results.jsonl` (one line per run), so an interrupted study resumes and
`--report` rebuilds the tables. Benchmarks measure, they assert nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

SETS = {"informative": ["data.title_noise=0.3"], "noisy": ["data.title_noise=0.9"]}

BASELINE = ["train.mode=baseline"]
NAIVE = ["train.mode=sicot", "train.cotrain_weight=1.0", "train.cotrain_rampup=0", "train.text_encoder=bilinear"]
LA = ["train.logit_adjust_tau=1.0"]

# axis -> {value name: overrides on top of NAIVE}; the naive value of every axis is "naive".
AXES = {
    "weight": {"lam0.5": ["train.cotrain_weight=0.5"]},
    "rampup": {"ramp": ["train.cotrain_rampup=4"]},
}
ENCODERS = {"enc_mean": ["train.text_encoder=mean"], "enc_bilstm": ["train.text_encoder=bilstm"],
            "enc_bilstm_att": ["train.text_encoder=bilstm_attention"]}
TABLE = {"baseline": BASELINE, "baseline_la": BASELINE + LA, "naive": NAIVE}


def screen_configs() -> dict[str, list[str]]:
    out = dict(TABLE)
    for values in AXES.values():
        out.update({name: NAIVE + extra for name, extra in values.items()})
    return out


# --- one run ------------------------------------------------------------------------------------------

def _params(workdir: Path, set_name: str, overrides: list[str]):
    from sicot.config import load_params

    root = workdir / set_name
    return load_params("params.yaml", [
        f"paths.raw={root / 'raw'}", f"paths.prepared={root / 'prepared'}", f"paths.word2vec={root / 'word2vec'}",
        f"paths.reports={root / 'reports'}", *SETS[set_name], *overrides])


def prepare_set(workdir: Path, set_name: str, common: list[str]) -> None:
    params = _params(workdir, set_name, common)
    if not (Path(params.paths.prepared) / "labels.json").exists():
        from components import prepare_data

        prepare_data.run(params, track=False)
    if not (Path(params.paths.word2vec) / "vocab.json").exists():
        from components import train_word2vec

        train_word2vec.run(params, track=False)


def split_metrics(recognizer, manifest, records, params, device) -> dict:
    from sicot.data.dataset import ProductDataset
    from sicot.data.longtail import class_counts
    from sicot.evaluate import predict, summarize

    index = {sku: i for i, sku in enumerate(recognizer.classes)}
    counts = class_counts(manifest.train)
    dataset = ProductDataset(manifest.root, records, index, recognizer.image_size)
    topk, labels = predict(recognizer, dataset, params.evaluate.batch_size, device)
    return summarize("", topk, labels, [counts.get(s, 0) for s in recognizer.classes],
                     params.evaluate.head_threshold)


def run_one(job: dict) -> dict:
    """Train one (set, config, seed) and score it on val and test. Runs in a worker process."""
    import torch

    torch.set_num_threads(job["threads"])
    from sicot.data.manifest import load_manifest
    from sicot.model.recognizer import Recognizer
    from sicot.train import pick_device, train

    workdir = Path(job["workdir"])
    out = workdir / job["set"] / "runs" / f"{job['config']}-s{job['seed']}"
    params = _params(workdir, job["set"], [*job["common"], *job["overrides"], f"train.seed={job['seed']}",
                                           f"paths.models={out}"])
    start = time.perf_counter()
    result = train(params, track=False)
    seconds = time.perf_counter() - start
    device = pick_device(params.train.device)
    recognizer = Recognizer.load(result["model"])
    manifest = load_manifest(params.paths.prepared, verify_images=False)
    row = {k: job[k] for k in ("set", "config", "seed", "overrides")}
    row.update(seconds=round(seconds, 1), val=split_metrics(recognizer, manifest, manifest.val, params, device),
               test=split_metrics(recognizer, manifest, manifest.test, params, device))
    for child in out.glob("*.pt"):  # keep the disk small: the study needs the numbers, not the models
        child.unlink()
    return row


# --- the study ----------------------------------------------------------------------------------------

def load_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_jobs(jobs: list[dict], results_path: Path, workers: int, stop_at: float = float("inf")) -> list[dict]:
    """Run the jobs not yet in results.jsonl, in order; none is started after `stop_at` (time.time())."""
    done = {(r["set"], r["config"], r["seed"]) for r in load_results(results_path)}
    todo = [j for j in jobs if (j["set"], j["config"], j["seed"]) not in done]
    print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} already stored), {workers} workers", file=sys.stderr)
    if not todo:
        return load_results(results_path)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool, \
            results_path.open("a") as sink:
        futures = {pool.submit(run_one, job): job for job in todo}
        for future in as_completed(futures):
            if time.time() > stop_at:
                cancelled = sum(f.cancel() for f in futures)
                if cancelled:
                    print(f"deadline: {cancelled} runs not started", file=sys.stderr)
            if future.cancelled():
                continue
            row = future.result()
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"  {row['set']:<11} {row['config']:<16} seed {row['seed']}: val top-1 {row['val']['top1']:.3f} "
                  f"test tail top-1 {row['test']['tail']['top1']:.3f} ({row['seconds']:.0f} s)", file=sys.stderr)
    return load_results(results_path)


def mean_val(rows: list[dict], config: str) -> float | None:
    vals = [r["val"]["top1"] for r in rows if r["config"] == config]
    return statistics.fmean(vals) if vals else None


def select_final(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Per axis the best value on validation (mean over sets and seeds), kept when it lifts co-training
    to at least the visual-only baseline: a change that leaves it below the baseline cures nothing,
    however much better than the naive form it is."""
    bar = max(mean_val(rows, "naive"), mean_val(rows, "baseline"))
    kept, overrides = [], list(NAIVE)
    for axis, values in AXES.items():
        scored = [(mean_val(rows, name), name) for name in values if mean_val(rows, name) is not None]
        if scored:
            best_score, best = max(scored)
            if best_score >= bar:
                kept.append(best)
                overrides += values[best]
    return kept, overrides


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".bench/study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the reported tables")
    p.add_argument("--screen-seeds", type=int, nargs="+", help="seeds of the one-change-at-a-time screen "
                   "(default: --seeds)")
    p.add_argument("--encoders", action="store_true", help="also the text-encoder ablation (informative set)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--set", dest="common", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="applies to every run (e.g. train.device=cuda)")
    p.add_argument("--quick", action="store_true", help="a tiny world and 2 epochs: checks the procedure")
    p.add_argument("--report", metavar="RESULTS", help="print the tables of a stored results.jsonl and exit")
    p.add_argument("--prepare-only", action="store_true", help="build the evaluation sets and word vectors, then stop")
    p.add_argument("--deadline", type=float, default=float("inf"),
                   help="seconds after which no run is started (the screen stops at 60%% of it)")
    args = p.parse_args(argv)
    if args.report:
        print(render(load_results(Path(args.report))))
        return
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    common = list(args.common)
    if args.quick:
        common = ["data.skus=16", "data.brands=4", "data.categories=3", "data.max_images=20", "data.imbalance=10",
                  "data.image_size=16", "train.image_size=16", "train.epochs=2", "word2vec.epochs=2", *common]
    from sicot.config import load_params

    threads = max(1, (os.cpu_count() or 2) // args.workers)
    results_path = workdir / "results.jsonl"
    for set_name in SETS:
        prepare_set(workdir, set_name, common)
    if args.prepare_only:
        return
    start = time.time()

    def jobs(sets, configs, seeds):
        return [{"workdir": str(workdir), "set": s, "config": name, "seed": seed, "overrides": overrides,
                 "common": common, "threads": threads}
                for name, overrides in configs.items() for seed in seeds for s in sets]  # most important first

    screen = jobs(list(SETS), screen_configs(), args.screen_seeds or args.seeds)
    rows = run_jobs(screen, results_path, args.workers, start + 0.6 * args.deadline)
    kept, final = select_final([r for r in rows if r["set"] in SETS])
    print(f"kept on validation: {', '.join(kept) or 'nothing'}", file=sys.stderr)
    (workdir / "final.json").write_text(json.dumps({"kept": kept, "overrides": final}, indent=2))
    tables = jobs(list(SETS), {**TABLE, "final": final, "final_la": final + LA}, args.seeds)
    if args.encoders:
        tables += jobs(["informative"], {f"final_{n}": final + o for n, o in ENCODERS.items()}, args.seeds)
    rows = run_jobs(tables, results_path, args.workers, start + args.deadline)
    print(render(rows))


# --- tables -------------------------------------------------------------------------------------------

GROUPS = ("overall", "head", "tail", "many", "medium", "few")
TABLE_CONFIGS = ("baseline", "baseline_la", "naive", "final", "final_la")


def _get(metrics: dict, group: str, k: str) -> float:
    return metrics[k] if group == "overall" else metrics[group][k]


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def render(rows: list[dict], configs: tuple[str, ...] | None = None) -> str:
    """Markdown: per set, mean ± std (test) of every config, then paired gains against the baseline."""
    out = []
    for set_name in sorted({r["set"] for r in rows}):
        mine = [r for r in rows if r["set"] == set_name]
        names = [c for c in (configs or TABLE_CONFIGS) if any(r["config"] == c for r in mine)]
        if configs is None:
            names += sorted({r["config"] for r in mine} - set(names))
        out += [f"\n#### {set_name}: test top-1 / top-3 (%), mean ± std over seeds\n",
                "| config | n | " + " | ".join(f"{g} top-1" for g in GROUPS) + " | overall top-3 | tail top-3 |",
                "|---|---:|" + "---:|" * (len(GROUPS) + 2)]
        for name in names:
            runs = [r for r in mine if r["config"] == name]
            cells = [_ms([_get(r["test"], g, "top1") for r in runs]) for g in GROUPS]
            cells += [_ms([r["test"]["top3"] for r in runs]), _ms([r["test"]["tail"]["top3"] for r in runs])]
            out.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
        for reference in ("baseline", "baseline_la"):
            base = {r["seed"]: r for r in mine if r["config"] == reference}
            if not base:
                continue
            out += [f"\nPaired difference against `{reference}` (same seed), test top-1 points, mean ± std:\n",
                    "| config | overall | head | tail | many | medium | few | tail top-3 |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name in names:
                if name == reference:
                    continue
                pairs = [(r, base[r["seed"]]) for r in mine if r["config"] == name and r["seed"] in base]
                if not pairs:
                    continue
                cells = [_ms([_get(a["test"], g, "top1") - _get(b["test"], g, "top1") for a, b in pairs])
                         for g in GROUPS]
                cells.append(_ms([a["test"]["tail"]["top3"] - b["test"]["tail"]["top3"] for a, b in pairs]))
                out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
