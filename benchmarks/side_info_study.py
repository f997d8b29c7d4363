"""Do titles teach the image model what training longer cannot? The paper's co-training against the
strongest visual-only baseline, on two generators.

    python -m benchmarks.side_info_study --workdir .bench/side-info                 # the whole table
    python -m benchmarks.side_info_study --workdir .bench/side-info --sets informative --configs baseline sicot_2x
    python -m benchmarks.side_info_study --report .bench/side-info/results.jsonl    # the tables again

Every run starts from a visual stream pretrained on a world of other products of the same generator
(`cotrain_study.SOURCE`), the regime the method is meant for, and is trained for the same budget; "2x"
runs train twice as many epochs with the learning rate ending where the 1x schedule ends; "scratch" runs
start from a random visual stream at the demo pipeline's budget. Methods: `baseline` (the visual stream
alone) and `sicot` (co-training, λ = 2 ramped up, max-fusion of v and s), each also with logit adjustment
(`_la`, τ = 1), and every run also scored with class-mean rows (`<config>+means`,
`train.classifier_rows: class_means`).

Screened here too and removed (docs/method.md): distilling the mixed stream's soft labels into the visual
stream (commit 161bb7e: it lost to the plain baseline), image–title contrastive alignment with rows from
the title encoder's class prototypes (commit 34133a3: with class means it tied the baseline, and the
prototypes cost tail points), and title-word prediction with classifier rows anchored in the word
detectors (`train.word_loss`, `train.title_anchors`, removed after commit e0ea52a: with class means both
lost to the baseline).

The verdict picks each method's variant (± logit adjustment, ± class means) on validation; test is
reported. Results stream to `<workdir>/results.jsonl`, so an interrupted study resumes. Benchmarks
measure, they assert nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from benchmarks.cotrain_study import (
    LA,
    SETS,
    _ms,
    load_results,
    prepare_set,
    run_jobs,
    world_source,
)

# 1x: six epochs from the pretrained stream, λ ramped up over two; 2x: twelve, the ramp over four, the
# per-epoch decay slowed so both schedules end at the same learning rate (0.1 · 0.7^5); scratch: from a
# random visual stream at the demo pipeline's budget (params.yaml: 12 epochs, decay 0.8, ramp over four).
BUDGETS = {"": ["train.epochs=6", "train.lr_gamma=0.7", "train.cotrain_rampup=2"],
           "_2x": ["train.epochs=12", "train.lr_gamma=0.8503", "train.cotrain_rampup=4"],
           "_scratch": ["train.backbone_weights=", "train.epochs=12", "train.lr_gamma=0.8", "train.cotrain_rampup=4"]}
METHODS = {"baseline": ["train.mode=baseline"], "sicot": ["train.mode=sicot"]}


def configs(names, budget: str = "") -> dict[str, list[str]]:
    """{name + budget: overrides} for names like `sicot` or `sicot_la`."""
    out = {}
    for name in names:
        method, la = (name[:-3], LA) if name.endswith("_la") else (name, [])
        out[name + budget] = [*METHODS[method], *la, *BUDGETS[budget]]
    return out


def best(runs: list[dict], method: str, budget: str) -> tuple[str, list[dict]] | None:
    """(config, its runs): the method's best on mean validation top-1, with or without logit adjustment and
    class-mean rows."""
    candidates = {}
    for la in ("", "_la"):
        for rows in ("", "+means"):
            name = method + la + budget + rows
            if mine := [r for r in runs if r["config"] == name]:
                candidates[name] = mine
    return max(candidates.items(), key=lambda c: statistics.fmean(r["val"]["top1"] for r in c[1]), default=None)


def mean_top1(runs: list[dict]) -> str:
    """Mean test top-1 overall / head / tail, in %."""
    groups = [[r["test"]["top1"] for r in runs], *([r["test"][g]["top1"] for r in runs] for g in ("head", "tail"))]
    return " / ".join(f"{100 * statistics.fmean(g):.1f}" for g in groups)


def grid(rows: list[dict]) -> str:
    """Markdown: per set, every method with its trained rows (`W`) and its class means, test top-1 overall /
    head / tail (means over seeds) at each budget."""
    out = []
    for set_name in sorted({r["set"] for r in rows}):
        mine = [r for r in rows if r["set"] == set_name]
        out += [f"\n#### {set_name}: test top-1 overall / head / tail (%), mean over seeds\n",
                "| method | rows | " + " | ".join(b.strip("_") or "1x" for b in BUDGETS) + " |",
                "|---|---|" + "---|" * len(BUDGETS)]
        for method in (m + la for m in METHODS for la in ("", "_la")):
            for rows_, label in (("", "`W`"), ("+means", "class means")):
                cells = [[r for r in mine if r["config"] == method + b + rows_] for b in BUDGETS]
                if any(cells):
                    out.append(f"| {method} | {label} | " + " | ".join(mean_top1(c) if c else "–" for c in cells)
                               + " |")
    return "\n".join(out)


def verdict(rows: list[dict]) -> str:
    """Markdown: per set and budget, the strongest visual-only configuration and the best co-training one,
    test top-1 overall / head / tail (means over seeds), and the tail paired (same seed) against that
    baseline."""
    out = ["| set | budget | strongest baseline | test | best co-training | test | tail vs baseline |",
           "|---|---|---|---|---|---|---:|"]
    for set_name in sorted({r["set"] for r in rows}):
        mine = [r for r in rows if r["set"] == set_name]
        for budget in BUDGETS:
            base, cot = best(mine, "baseline", budget), best(mine, "sicot", budget)
            if not (base and cot):
                continue
            by_seed = {r["seed"]: r for r in base[1]}
            gain = [r["test"]["tail"]["top1"] - by_seed[r["seed"]]["test"]["tail"]["top1"]
                    for r in cot[1] if r["seed"] in by_seed]
            out.append(f"| {set_name} | {budget.strip('_') or '1x'} | {base[0]} | {mean_top1(base[1])} | {cot[0]} | "
                       f"{mean_top1(cot[1])} | {_ms(gain)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".bench/side-info")
    p.add_argument("--sets", nargs="+", default=["informative", "apparel"], choices=sorted(SETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", metavar="NAME", help="run just these (e.g. sicot_la, baseline_2x, "
                   "sicot_scratch), not the whole table")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--set", dest="common", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="applies to every run (e.g. train.device=cuda)")
    p.add_argument("--report", metavar="RESULTS", help="print the tables of a stored results.jsonl and exit")
    args = p.parse_args(argv)
    if args.report:
        rows = load_results(Path(args.report))
        print(grid(rows) + "\n\n" + verdict(rows))
        return
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    common: dict[str, list[str]] = {}
    for set_name in args.sets:
        common[set_name] = [*args.common, f"train.backbone_weights={world_source(workdir, set_name, args.common)}"]
        prepare_set(workdir, set_name, common[set_name])
    results_path = workdir / "results.jsonl"

    def jobs(table: dict[str, list[str]], seeds) -> list[dict]:
        return [{"workdir": str(workdir), "set": s, "config": name, "seed": seed, "overrides": overrides,
                 "common": common[s], "threads": threads, "means": True}
                for name, overrides in table.items() for seed in seeds for s in args.sets]

    names = args.configs or [m + la + budget for budget in BUDGETS for m in METHODS for la in ("", "_la")]
    table = {}
    for name in names:
        budget = next((b for b in BUDGETS if b and name.endswith(b)), "")
        table.update(configs([name.removesuffix(budget)], budget))
    rows = run_jobs(jobs(table, args.seeds), results_path, args.workers)
    print(grid(rows) + "\n\n" + verdict(rows))


if __name__ == "__main__":
    main()
