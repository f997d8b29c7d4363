"""Post-hoc classifiers on a trained visual stream: class means (NCM) as a re-balancing baseline, and
tail products' means predicted from their titles.

    python -m benchmarks.prototype_study --workdir .bench/prototypes                 # informative, seed 0
    python -m benchmarks.prototype_study --workdir .bench/prototypes --sets apparel --seeds 0 1 2
    python -m benchmarks.prototype_study --report .bench/prototypes/results.json      # the tables again
    python -m benchmarks.prototype_study --report A/results.json B/results_2x.json   # several runs' tables
    python -m benchmarks.prototype_study --budget _2x ...   # visual streams trained twice as long: results_2x.json

Per set and seed: the visual-only baseline and the baseline with logit adjustment are trained as in
`benchmarks/side_info_study.py` (six epochs from the source pretrained on its own world, its 1x budget; kept under
`<workdir>/<set>/keep/`, so a second run only scores), then each classifier is scored on the same
features of the validation and test photos (top-1 overall / head / tail, %):

- `W`: the trained classifier (of the baseline, the baseline with logit adjustment, or co-training as shipped,
  `--configs`); `W - log prior`: post-hoc logit adjustment (baseline only);
- `NCM`: cosine to each class's mean normalised training feature;
- `title tail`: NCM whose tail classes' means are predicted from their titles alone: word detectors U fitted
  by ridge regression (weighted by photos, `--ridge`) from the head classes' idf-weighted title words
  (`class_word_weights`) to their means;
- `shrunk kK`: tail means pulled toward those predictions with the weight of K photos;
- `title words`: title words read as visual attributes (as in direct attribute prediction): logistic detectors
  of each training photo's own title words on its frozen feature, every class weighing the same; a class scores
  the mean log-probability of its idf-weighted words. `balanced classes`: the same regression with the photo's
  class as its only word (no titles: the control). `NCM + w ...`: either added to the class means as rows
  (`unit mean + w · Σ_word T · detector`, biases left out: an ordinary linear classifier an export could hold);
- `shipped w λr title words`: the same idea as shipped (`train.classifier_rows: title_words`,
  sicot.model.title_words): class-balanced ridge detectors in closed form (λ = r · mean feature variance), rows
  = unit mean + w · the class's idf-weighted detectors scaled to a mean norm of 1; `shipped w λr balanced
  classes` is its control;
- `NCM + val photos` (test only): each tail class's mean also over its validation photos (10 more per
  product): what a far better estimate of the tail's rows is worth, whatever it is estimated from.

Beside each classifier's test top-1, where its wrong answers on tail photos go: the share naming a product of
the same line (the same brand and category, from the catalog's tags), and of those the share naming a sibling
with the same variant words (scent, flavour; colour, fabric), i.e. one that differs only in its package size or
label pattern, each against what a wrong answer drawn at random would give.

The last table sets the shipped rows (params.yaml's train.title_words_weight, sicot.model.title_words.RIDGE)
against the strongest title-free classifier per set and budget (the baseline's or, with `--configs baseline
baseline_la`, logit adjustment's trained rows or class means, picked on validation top-1).

Benchmarks measure, they assert nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.cotrain_study import LA, _params, prepare_set, world_source
from benchmarks.side_info_study import BUDGETS

CONFIGS = {"baseline": ["train.mode=baseline"], "baseline_la": ["train.mode=baseline", *LA],
           "sicot": ["train.mode=sicot"], "sicot_la": ["train.mode=sicot", *LA]}


def features(recognizer, manifest, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader

    from sicot.data.dataset import ProductImages, collate
    from sicot.data.stream import ShardStream

    index = {sku: i for i, sku in enumerate(recognizer.classes)}
    stream = ShardStream(ProductImages(index, recognizer.image_size), manifest.root, manifest.shards[split], 256)
    found, labels = [], []
    recognizer.eval()
    with torch.no_grad():
        for batch in DataLoader(stream, batch_size=256, collate_fn=collate):
            found.append(recognizer.backbone(batch["image"]))
            labels.append(batch["label"])
    return torch.cat(found), torch.cat(labels)


def top1(scores: torch.Tensor, labels: torch.Tensor, head: torch.Tensor) -> dict:
    hit = (scores.argmax(1) == labels).float() * 100
    in_head = head[labels]
    return {"all": hit.mean().item(), "head": hit[in_head].mean().item(), "tail": hit[~in_head].mean().item()}


def class_word_weights(labels: list[int], token_ids: list[list[int]], num_classes: int,
                       vocab_size: int) -> torch.Tensor:
    """T [num_classes, vocab_size]: per class, the share of its titles holding each word times the word's
    idf over classes (a word every product has weighs nothing), rows normalised to sum 1. PAD and UNK are
    never words."""
    from sicot.text.word2vec import UNK

    holding, titles = torch.zeros(num_classes, vocab_size), torch.zeros(num_classes, 1)
    for label, ids in zip(labels, token_ids):
        titles[label] += 1
        holding[label, sorted({w for w in ids if w > UNK})] += 1
    idf = torch.log(num_classes / (holding > 0).sum(0).clamp_min(1).float())
    weights = holding / titles.clamp_min(1) * idf
    return weights / weights.sum(1, keepdim=True).clamp_min(1e-12)


def product_lines(manifest, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, an id of its product line (its catalog tags' category and brand) and of the variant words
    of its catalog tags (the packaged world's scent or flavour, the apparel world's colour and fabric)."""
    tags = {r.sku: tuple(r.tags) for r in manifest.catalog}
    ids: dict[tuple, int] = {}
    lines = [ids.setdefault(tags[c][:3], len(ids)) for c in classes]
    return torch.tensor(lines), torch.tensor([ids.setdefault(tags[c][3:], len(ids)) for c in classes])


def sibling_errors(scores: torch.Tensor, labels: torch.Tensor, head: torch.Tensor, lines: torch.Tensor,
                   variants: torch.Tensor) -> dict:
    """Of the wrong answers on tail photos: the share (%) naming a product of the same line, and the share a
    wrong answer drawn uniformly from the other classes would give; of those sibling errors, the share naming
    a sibling with the same variant words in its catalog tags (they differ in size or pattern only), and the
    share a sibling drawn uniformly would give."""
    predicted = scores.argmax(1)
    wrong = (predicted != labels) & ~head[labels]
    truth, guess = labels[wrong], predicted[wrong]
    sibling = lines[truth][:, None] == lines[None, :]
    same_line = lines[guess] == lines[truth]
    alike = sibling & (variants[truth][:, None] == variants[None, :])
    t, g = truth[same_line], guess[same_line]
    return {"sibling errors": 100 * same_line.float().mean().item(),
            "sibling chance": 100 * ((sibling.sum(1) - 1) / (len(lines) - 1)).float().mean().item(),
            "alike errors": 100 * (variants[g] == variants[t]).float().mean().item(),
            "alike chance": 100 * ((alike[same_line].sum(1) - 1) / (sibling[same_line].sum(1) - 1)).float()
            .mean().item()}


# Unit features are scaled by this before the detectors' logistic regression: cosines in [-1, 1] are too flat
# a start for a few hundred Adam steps.
DETECTOR_SCALE = 10.0
ATTRIBUTE_WEIGHTS = (0.01, 0.03, 0.1)  # w: how much of the detectors goes into the class-mean rows
# The shipped form's train.title_words_weight and ridge (sicot.model.title_words.RIDGE) screened.
SHIPPED_WEIGHTS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
SHIPPED_RIDGES = (0.01, 0.1, 1.0)


def detectors(unit: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, weight_decay: float = 1e-4,
              steps: int = 400) -> torch.nn.Linear:
    """Logistic detectors of the columns of `targets` [n, k] on frozen unit features [n, d], photo i weighted
    by `weights[i]` (1 / its class's photos: every class counts the same, as in its class mean)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(unit.shape[1], targets.shape[1])
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(layer(DETECTOR_SCALE * unit), targets, reduction="none")
        (loss.sum(1) * weights).sum().backward()
        optimizer.step()
    return layer.requires_grad_(False)


def classifiers(recognizer, manifest, params, ridge: float) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """({name: unit rows [C, d], scored against unit features}, {name: unit features -> scores [n, C]},
    training photos per class, head mask)."""
    from sicot.model.class_means import class_mean_rows
    from sicot.model.title_words import TitleWordSums
    from sicot.text.word2vec import UNK, Vocabulary

    train, labels = features(recognizer, manifest, "train")
    classes = len(recognizer.classes)
    counts = torch.bincount(labels, minlength=classes).float()[:, None]
    head = counts[:, 0] >= params.evaluate.head_threshold
    means = torch.zeros(classes, train.shape[1]).index_add_(0, labels, F.normalize(train, dim=1)) / counts
    val, val_labels = features(recognizer, manifest, "val")
    tail_val = ~head[val_labels]
    with_val = (counts * means).index_add_(0, val_labels[tail_val], F.normalize(val[tail_val], dim=1))
    vocab = Vocabulary.load(params.paths.word2vec)
    titles = [vocab.encode(r.title, params.train.max_title_len) for r in manifest.train]  # in shard order
    words = class_word_weights(labels.tolist(), titles, classes, len(vocab))
    Th, nh = words[head], counts[head]
    word_looks = torch.linalg.solve(Th.t() @ (nh * Th) + ridge * torch.eye(words.shape[1]), Th.t() @ (nh * means[head]))
    predicted = F.normalize(words @ word_looks, dim=1)
    rows = {"NCM": means, "NCM + val photos": with_val, "title tail": torch.where(head[:, None], means, predicted)}
    for k in (1, 3):
        rows[f"shrunk k{k}"] = torch.where(head[:, None], means, (counts * means + k * predicted) / (counts + k))
    # Title words as attributes: detectors of each photo's own title words, and of its class alone (the same
    # re-balanced logistic regression without titles, the control); a class scores the mean log-probability of
    # its idf-weighted title words, or of itself.
    unit, balance = F.normalize(train, dim=1), 1 / (classes * counts[labels, 0])  # each class weighs 1/C
    holds = torch.zeros(len(titles), len(vocab))
    for i, ids in enumerate(titles):
        holds[i, [w for w in ids if w > UNK]] = 1
    word_detectors = detectors(unit, holds, balance)
    class_detectors = detectors(unit, F.one_hot(labels, classes).float(), balance)
    scorers = {"title words": lambda u: F.logsigmoid(word_detectors(DETECTOR_SCALE * u)) @ words.t(),
               "balanced classes": lambda u: F.logsigmoid(class_detectors(DETECTOR_SCALE * u))}
    # Added to the class means as rows, without the detectors' biases: an ordinary linear classifier to export.
    looks = {"title words": words @ word_detectors.weight, "balanced classes": class_detectors.weight}
    for name, look in looks.items():
        for weight in ATTRIBUTE_WEIGHTS:
            combined = F.normalize(means, dim=1) + weight * DETECTOR_SCALE * look
            scorers[f"NCM + {weight} {name}"] = lambda u, r=combined: u @ r.t()
    # As shipped (`train.classifier_rows: title_words`, sicot.model.title_words): ridge detectors in closed form,
    # scored as exported rows; and the same with the photo's class as its only word (the control).
    tokens = torch.zeros(len(titles), params.train.max_title_len, dtype=torch.long)
    for i, ids in enumerate(titles):
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    for ridge in SHIPPED_RIDGES:
        for name, (ids, size) in {"title words": (tokens, len(vocab)),
                                  "balanced classes": ((labels + UNK + 1)[:, None], classes + UNK + 1)}.items():
            sums = TitleWordSums(counts[:, 0], (0, classes), size, ids.shape[1], train.shape[1], torch.device("cpu"),
                                 ridge=ridge)
            sums.add_photos(unit, labels, ids)
            sums.add_titles(labels, ids)
            attributes = sums.attribute_rows()
            for weight in SHIPPED_WEIGHTS:
                shipped = class_mean_rows(means, counts * means, counts[:, 0], attributes=attributes,
                                          weight=weight)
                scorers[f"shipped {weight} λ{ridge} {name}"] = lambda u, r=shipped: u @ r.t()
    return {name: F.normalize(r, dim=1) for name, r in rows.items()}, scorers, counts[:, 0], head


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".bench/prototypes")
    p.add_argument("--sets", nargs="+", default=["informative"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="whose features: the visual-only baseline, with logit adjustment, co-trained (as shipped)")
    p.add_argument("--budget", default="", choices=list(BUDGETS), help="the side-information study's budget "
                   "the visual streams are trained at: 1x (default) or _2x (twice as long)")
    p.add_argument("--report", metavar="RESULTS_JSON", nargs="+",
                   help="print the tables of stored results.json files (sets, budgets) together and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report([r for path in args.report for r in json.loads(Path(path).read_text())]))
        return
    torch.set_num_threads(1)
    from sicot.data.prepared import load_prepared
    from sicot.model.recognizer import Recognizer
    from sicot.train import run_training

    workdir = Path(args.workdir)
    results = []
    for set_name in args.sets:
        common = [f"train.backbone_weights={world_source(workdir, set_name, [])}", "train.threads=1"]
        prepare_set(workdir, set_name, common)
        for seed in args.seeds:
            for config in args.configs:
                overrides = CONFIGS[config]
                out = workdir / set_name / "keep" / f"{config}{args.budget}-s{seed}"
                params = _params(workdir, set_name, [*common, *overrides, *BUDGETS[args.budget], f"train.seed={seed}",
                                                     f"paths.models={out}"])
                model = out / params.train.mode / "model.pt"
                if not model.exists():
                    run_training(params, track=False)
                recognizer = Recognizer.load(str(model))
                manifest = load_prepared(params.paths.prepared)
                rows, scorers, counts, head = classifiers(recognizer, manifest, params, args.ridge)
                lines, variants = product_lines(manifest, recognizer.classes)
                weight, log_prior = recognizer.weight.float(), torch.log(counts / counts.sum())
                for split in ("val", "test"):
                    feats, labels = features(recognizer, manifest, split)
                    scored = {"W": feats @ weight.t()}
                    if config == "baseline":
                        scored["W - log prior"] = feats @ weight.t() - log_prior
                    unit = F.normalize(feats, dim=1)
                    scored |= {name: unit @ r.t() for name, r in rows.items()}
                    scored |= {name: score(unit) for name, score in scorers.items()}
                    for name, scores in scored.items():
                        if split == "val" and name == "NCM + val photos":
                            continue  # its rows hold the validation photos
                        results.append({"set": set_name, "seed": seed, "features": config + args.budget,
                                        "classifier": name, "split": split, **top1(scores, labels, head),
                                        **sibling_errors(scores, labels, head, lines, variants)})
    (workdir / f"results{args.budget}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


def report(results: list[dict]) -> str:
    from sicot.config import load_params
    from sicot.model.title_words import RIDGE

    shipped = f"shipped {load_params('params.yaml').train.title_words_weight} λ{RIDGE} title words"
    return (table(results) + "\n\n" + paired(results) + "\n\n" + pick(results) + "\n\n"
            + final(results, shipped))


def pick(results: list[dict], max_head_drop: float = 1.0) -> str:
    """The shipped settings picked on validation at the 1x budget: the largest mean tail gain over the class
    means (averaged over sets) among those whose mean head drop is at most `max_head_drop` points in every set."""
    by = {(r["set"], r["seed"], r["classifier"]): r for r in results
          if r["split"] == "val" and r["features"] == "baseline"}
    sets = sorted({k[0] for k in by})
    gains: dict[str, list[tuple[float, float]]] = {}
    for name in dict.fromkeys(k[2] for k in by if k[2].startswith("shipped") and k[2].endswith("title words")):
        for set_name in sets:
            seeds = [k[1] for k in by if k[0] == set_name and k[2] == name]
            diff = [(by[(set_name, s, name)]["head"] - by[(set_name, s, "NCM")]["head"],
                     by[(set_name, s, name)]["tail"] - by[(set_name, s, "NCM")]["tail"]) for s in seeds]
            head, tail = zip(*diff)
            gains.setdefault(name, []).append((sum(head) / len(head), sum(tail) / len(tail)))
    eligible = {n: sum(t for _, t in g) / len(g) for n, g in gains.items() if all(h >= -max_head_drop for h, _ in g)}
    if not eligible:
        return f"no shipped setting keeps the validation head within {max_head_drop} point of the class means"
    best = max(eligible, key=eligible.get)
    return (f"picked on validation (1x, head within {max_head_drop} point in {', '.join(sets)}): {best}, "
            f"mean tail {eligible[best]:+.1f} points over the class means")


def table(results: list[dict]) -> str:
    """Mean over seeds per (set, features, classifier): validation top-1, test top-1 / head / tail."""
    lines = ["| set | features | classifier | seeds | validation | test | head | tail | tail errors on siblings "
             "(chance) | of which same variant words (chance) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["set"], r["features"], r["classifier"]), []).append(r)
    for (set_name, config, name), rows in groups.items():
        val = [r for r in rows if r["split"] == "val"]
        test = [r for r in rows if r["split"] == "test"]
        mean = [f"{sum(r[k] for r in split) / len(split):.1f}" if split else "–" for split, k in
                ((val, "all"), (test, "all"), (test, "head"), (test, "tail"), (test, "sibling errors"),
                 (test, "sibling chance"), (test, "alike errors"), (test, "alike chance"))]
        lines.append(f"| {set_name} | {config} | {name} | {len(test)} | " + " | ".join(mean[:5])
                     + f" ({mean[5]}) | {mean[6]} ({mean[7]}) |")
    return "\n".join(lines)

def paired(results: list[dict]) -> str:
    """Markdown: top-1 head / tail of the class means plus title words (screened and shipped forms), minus NCM
    (the strongest baseline; on validation and test) and minus the title-free control at the same settings
    (test), paired by set and seed, mean ± std."""
    from benchmarks.cotrain_study import _ms

    by = {(r["set"], r["seed"], r["features"], r["classifier"], r["split"]): r for r in results}
    lines = ["| set | features | rows | seeds | val head vs NCM | val tail vs NCM | head vs NCM | tail vs NCM "
             "| head vs control | tail vs control |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for set_name, config, name in dict.fromkeys((k[0], k[2], k[3]) for k in by if k[3].endswith("title words")):
        runs = [seed for (s, seed, c, n, split) in by if (s, c, n, split) == (set_name, config, name, "test")]
        cells, control = [], name.replace("title words", "balanced classes")
        for split, against in (("val", "NCM"), ("test", "NCM"), ("test", control)):
            for k in ("head", "tail"):
                cells.append(_ms([(by[(set_name, seed, config, name, split)][k]
                                   - by[(set_name, seed, config, against, split)][k]) / 100 for seed in runs]))
        lines.append(f"| {set_name} | {config} | {name.removesuffix(' title words')} | {len(runs)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def final(results: list[dict], shipped: str) -> str:
    """Markdown: per set and budget, the strongest title-free classifier (the trained rows or class means of
    the baseline or logit adjustment) against the class means plus title words at the shipped settings
    (`shipped`, a classifier name) on the features of the baseline, logit adjustment or co-training, each
    picked on mean validation top-1; test top-1 overall / head / tail (means over seeds), head and tail paired
    by seed."""
    from benchmarks.cotrain_study import _ms

    by = {(r["set"], r["seed"], r["features"], r["classifier"], r["split"]): r for r in results}
    budget_of = lambda features: next((b for b in BUDGETS if b and features.endswith(b)), "")  # noqa: E731
    mean = lambda runs, k: sum(r[k] for r in runs) / len(runs)  # noqa: E731
    top = lambda runs: " / ".join(f"{mean(runs, k):.1f}" for k in ("all", "head", "tail"))  # noqa: E731
    lines = ["| set | budget | strongest baseline | test | title-word rows on | test | head vs baseline | "
             "tail vs baseline |", "|---|---|---|---|---|---|---:|---:|"]
    for set_name, budget in dict.fromkeys((k[0], budget_of(k[2])) for k in by):
        seeds = sorted({k[1] for k in by if k[0] == set_name})
        runs = lambda features, name, split, s=set_name, b=budget, seeds=seeds: (  # noqa: E731
            found if all(found := [by.get((s, seed, features + b, name, split)) for seed in seeds]) else None)
        baselines = {(f, n): r for f in ("baseline", "baseline_la") for n in ("W", "NCM") if (r := runs(f, n, "val"))}
        ours = {(f, shipped): r for f in CONFIGS if (r := runs(f, shipped, "val"))}
        if not (baselines and ours):
            continue
        base = max(baselines, key=lambda c: mean(baselines[c], "all"))
        mine = max(ours, key=lambda c: mean(ours[c], "all"))
        base_test, mine_test = runs(*base, "test"), runs(*mine, "test")
        gains = [_ms([(o[k] - b[k]) / 100 for o, b in zip(mine_test, base_test)]) for k in ("head", "tail")]
        lines.append(f"| {set_name} | {budget.strip('_') or '1x'} | {base[0]} {base[1]} | {top(base_test)} | "
                     f"{mine[0]} | {top(mine_test)} | {gains[0]} | {gains[1]} |")
    return "\n".join(lines) + f"\n\n(title-word rows: {shipped})"


if __name__ == "__main__":
    main()
