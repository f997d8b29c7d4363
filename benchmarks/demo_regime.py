"""What the demo pipeline's comparison shows, over training seeds: its gain in units of its seed spread.

    python -m benchmarks.demo_regime --workdir .bench/demo-regime --seeds 0 1 2
    python -m benchmarks.demo_regime --report .bench/demo-regime/results.jsonl

The demo world exactly as params.yaml makes it (its validation and test photos included), its word vectors
and its pretrained visual stream (the pretrain step) are made once; then every training seed trains what the
pipeline trains, the baseline (visual only, trained rows, also scored with class means) and the co-trained
model with title-word rows (params.yaml's default), beside the same models with the other rows, and the
two from a random visual stream (the demo's regime before the pretrain step). Each is scored on validation
and test. The strongest baseline of a seed is the baseline's rows or its class means, whichever has the
higher validation top-1; gains are paired by seed. Results stream to `<workdir>/results.jsonl`, so an
interrupted run resumes. Benchmarks measure, they assert nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchmarks.cotrain_study import _get, _params, load_results, prepare_set, run_jobs

SET = "demo"
BASELINE = ["train.mode=baseline", "train.classifier_rows=trained"]
SCRATCH = ["train.backbone_weights="]
COTRAINED = ["train.mode=sicot", "train.cotrain_weight=2.0", "train.cotrain_rampup=4"]  # the paper's, as tuned
CONFIGS = {
    "baseline": BASELINE,
    "sicot": ["train.mode=sicot", "train.cotrain_weight=0", "train.classifier_rows=title_words"],  # the default
    "co-training": [*COTRAINED, "train.classifier_rows=trained"],
    "co-training, title words": [*COTRAINED, "train.classifier_rows=title_words"],
    "baseline, scratch": BASELINE + SCRATCH,
    "sicot, scratch": ["train.mode=sicot", "train.cotrain_weight=0", "train.classifier_rows=title_words", *SCRATCH],
}
PARTS = ("overall", "head", "tail")


def pretrained(workdir: Path, common: list[str]) -> None:
    from components import pretrain_visual

    params = _params(workdir, SET, common)
    if not Path(params.paths.pretrained, "backbone.pt").exists():
        print(pretrain_visual.run(params, track=False), file=sys.stderr)


def strongest(rows: list[dict], seed: int, suffix: str = "") -> dict | None:
    """The seed's baseline rows or class means, whichever scores higher on validation."""
    base = next((r for r in rows if r["config"] == "baseline" + suffix and r["seed"] == seed), None)
    means = next((r for r in rows if r["config"] == "baseline" + suffix + "+means" and r["seed"] == seed), None)
    candidates = [r for r in (base, means) if r is not None]
    return max(candidates, key=lambda r: r["val"]["top1"]) if candidates else None


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def report(rows: list[dict]) -> str:
    configs = [c for c in (*CONFIGS, *(c + "+means" for c in CONFIGS)) if any(r["config"] == c for r in rows)]
    out = ["| model | seeds | test top-1 overall | head | tail | vs strongest baseline: overall | head | tail |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        suffix = ", scratch" if "scratch" in config else ""
        pairs = [(r, s) for r in mine if (s := strongest(rows, r["seed"], suffix)) is not None]
        cells = [_ms([_get(r["test"], part, "top1") for r in mine]) for part in PARTS]
        gains = [_ms([_get(r["test"], part, "top1") - _get(s["test"], part, "top1") for r, s in pairs])
                 for part in PARTS]
        out.append(f"| {config} | {len(mine)} | " + " | ".join(cells + gains) + " |")
    picked = [s["config"] for seed in sorted({r["seed"] for r in rows}) if (s := strongest(rows, seed))]
    out.append(f"\nstrongest baseline per seed, picked on validation: {', '.join(picked)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".bench/demo-regime")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--workers", type=int, default=2, help="trainings at once, one CPU thread each")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="on top of params.yaml, for every run")
    p.add_argument("--report", type=Path, help="print the table of stored results and stop")
    args = p.parse_args(argv)
    if args.report:
        print(report(load_results(args.report)))
        return
    workdir = Path(args.workdir).resolve()
    common = [*args.overrides, "train.threads=1", f"paths.pretrained={workdir / 'pretrained'}"]
    prepare_set(workdir, SET, common)
    pretrained(workdir, common)
    jobs = [{"set": SET, "config": config, "seed": seed, "overrides": CONFIGS[config], "common": common,
             "workdir": str(workdir), "threads": 1, "means": config.startswith("baseline") and "title" not in config}
            for seed in args.seeds for config in args.configs]
    print(report(run_jobs(jobs, workdir / "results.jsonl", args.workers)))


if __name__ == "__main__":
    main()
