"""How much of the title-word rows' tail gain is the titles', and how much is re-balancing any row could do.

    python -m benchmarks.rebalancing --workdir .bench/rebalancing-demo --seeds 0 1 2
    python -m benchmarks.rebalancing --workdir .bench/rebalancing-apparel --seeds 0 1 2 --set data.world=apparel
    python -m benchmarks.rebalancing --report .bench/rebalancing-demo/results.json

The demo regime as params.yaml makes it (its world, or another generator's with `--set data.world=apparel`;
the pretrain step's visual stream; benchmarks/demo_regime.py): per training seed the visual-only baseline is
trained once (kept under `<workdir>/demo/keep/`, its features cached), then classifiers built on the same
features are scored on validation and test (top-1 overall / head / tail, %):

- `trained`: its trained rows; `means`: class means (`train.classifier_rows: class_means`);
- `means − τ log prior`: cosine to the class means minus τ times the log of the class's share of training
  photos: post-hoc logit adjustment on the class means, a title-free re-balancing whose τ buys tail for head;
- `words w`: title-word rows as shipped (`train.classifier_rows: title_words`, weight w); `words w − τ log
  prior`: the same adjusted; `words 0.5, direction only`: those rows at the class means' length;
  `words 0.5 k/(k+n)`: a title weight of 0.5 · k / (k + the class's training photos).

The comparison that matters is at equal head cost: for each head budget b (the validation head may drop at
most b points below the class means'), the title-free and the title-word classifier with the best validation
tail are picked and their test top-1 reported, paired against the class means by seed. Benchmarks measure,
they assert nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

TAUS = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02)
WORD_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
SHRINK_PHOTOS = (3, 10)
HEAD_BUDGETS = (0.5, 1.0, 2.0, 3.0)
PARTS = ("all", "head", "tail")


def title_word_attributes(recognizer, manifest, params, unit, labels, counts) -> torch.Tensor:
    """The shipped rows' title part (sicot.model.title_words) from the cached unit features, in shard order."""
    from sicot.model.title_words import TitleWordSums
    from sicot.text.word2vec import Vocabulary

    vocab, length = Vocabulary.load(params.paths.word2vec), params.train.max_title_len
    tokens = torch.zeros(len(labels), length, dtype=torch.long)
    for i, record in enumerate(manifest.train):
        ids = vocab.encode(record.title, length)
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    sums = TitleWordSums(counts, (0, len(recognizer.classes)), len(vocab), length, unit.shape[1], torch.device("cpu"))
    sums.add_photos(unit, labels, tokens)
    sums.add_titles(labels, tokens)
    return sums.attribute_rows()


def score_seed(workdir: Path, common: list[str], seed: int) -> list[dict]:
    from benchmarks.cotrain_study import _params
    from benchmarks.demo_regime import BASELINE, SET
    from benchmarks.prototype_study import features, top1
    from sicot.data.prepared import load_prepared
    from sicot.model.recognizer import Recognizer
    from sicot.train import run_training

    out = workdir / SET / "keep" / f"baseline-s{seed}"
    params = _params(workdir, SET, [*common, *BASELINE, f"train.seed={seed}", f"paths.models={out}"])
    model = out / "baseline" / "model.pt"
    if not model.exists():
        run_training(params, track=False)
    recognizer, manifest = Recognizer.load(str(model)), load_prepared(params.paths.prepared)
    cached = out / "features.pt"
    if not cached.exists():
        torch.save({split: features(recognizer, manifest, split) for split in ("train", "val", "test")}, cached)
    feats = torch.load(cached)
    train, labels = feats["train"]
    counts = torch.bincount(labels, minlength=len(recognizer.classes)).float()
    head = counts >= params.evaluate.head_threshold
    unit = F.normalize(train, dim=1)
    means = F.normalize(torch.zeros(len(counts), unit.shape[1]).index_add_(0, labels, unit), dim=1)
    attributes = title_word_attributes(recognizer, manifest, params, unit, labels, counts)
    log_prior = torch.log(counts / counts.sum())
    # Every classifier as (unit rows, bias): score = unit feature · row + bias.
    classifiers = {"trained": (recognizer.weight.float(), 0.0)}
    for tau in TAUS:
        classifiers[f"means − {tau} log prior" if tau else "means"] = (means, -tau * log_prior)
        for weight in WORD_WEIGHTS:
            name = f"words {weight}" + (f" − {tau} log prior" if tau else "")
            classifiers[name] = (means + weight * attributes, -tau * log_prior)
    # Screened, not kept: the title words' direction alone (rows back at the class means' length), and a title
    # weight falling with the class's photos (the fewer photos, the more title).
    classifiers["words 0.5, direction only"] = (F.normalize(means + 0.5 * attributes, dim=1), 0.0)
    for k in SHRINK_PHOTOS:
        classifiers[f"words 0.5 k/(k+n), k = {k}"] = (means + 0.5 * k / (k + counts[:, None]) * attributes, 0.0)
    rows = []
    for name, (weights, bias) in classifiers.items():
        row = {"seed": seed, "classifier": name, "titles": name.startswith("words")}
        for split in ("val", "test"):
            found, truth = feats[split]
            row[split] = top1(F.normalize(found, dim=1) @ weights.t() + bias, truth, head)
        rows.append(row)
    return rows


def _ms(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def report(results: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in results})
    by = {(r["seed"], r["classifier"]): r for r in results}
    names = list(dict.fromkeys(r["classifier"] for r in results))

    def gain(name, split, part):
        return [by[(s, name)][split][part] - by[(s, "means")][split][part] for s in seeds]

    out = ["| classifier | test overall | head | tail | vs class means: overall | head | tail |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        cells = [_ms([by[(s, name)]["test"][p] for s in seeds]) for p in PARTS]
        out.append(f"| {name} | " + " | ".join(cells + [_ms(gain(name, "test", p)) for p in PARTS]) + " |")
    out += ["", "At equal head cost, picked on validation (mean over seeds), test paired against the class means:", "",
            "| validation head cost ≤ | title-free | overall | head | tail | title words | overall | head | tail |"
            " words − title-free: tail |", "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for budget in HEAD_BUDGETS:
        picks = []
        for titles in (False, True):
            allowed = [n for n in names if by[(seeds[0], n)]["titles"] == titles and n != "trained"
                       and statistics.fmean(gain(n, "val", "head")) >= -budget]
            picks.append(max(allowed, key=lambda n: statistics.fmean(gain(n, "val", "tail"))))
        cells = []
        for name in picks:
            cells += [name, *(_ms(gain(name, "test", p)) for p in PARTS)]
        extra = [a - b for a, b in zip(gain(picks[1], "test", "tail"), gain(picks[0], "test", "tail"))]
        out.append(f"| {budget} | " + " | ".join(cells) + f" | {_ms(extra)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".bench/rebalancing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="on top of params.yaml, for every run (data.world=apparel: the second generator)")
    p.add_argument("--report", type=Path, help="print the tables of a stored results.json and stop")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    from benchmarks.cotrain_study import prepare_set
    from benchmarks.demo_regime import SET, pretrained

    torch.set_num_threads(2)
    workdir = Path(args.workdir).resolve()
    common = [*args.overrides, "train.threads=2", f"paths.pretrained={workdir / 'pretrained'}"]
    prepare_set(workdir, SET, common)
    pretrained(workdir, common)
    results = [row for seed in args.seeds for row in score_seed(workdir, common, seed)]
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
