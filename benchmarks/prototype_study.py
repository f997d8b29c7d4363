"""Post-hoc classifiers on a trained visual stream: class means (NCM) as a re-balancing baseline, and
tail products' means predicted from their titles.

    python -m benchmarks.prototype_study --workdir .bench/prototypes                 # informative, seed 0
    python -m benchmarks.prototype_study --workdir .bench/prototypes --sets apparel --seeds 0 1 2
    python -m benchmarks.prototype_study --report .bench/prototypes/results.json      # the tables again
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
- `NCM + val photos` (test only): each tail class's mean also over its validation photos (10 more per
  product): what a far better estimate of the tail's rows is worth, whatever it is estimated from.

Beside each classifier's test top-1, where its wrong answers on tail photos go: the share naming a product of
the same line (the same brand and category, from the catalog's tags), and of those the share naming a sibling
with the same variant words (scent, flavour; colour, fabric), i.e. one that differs only in its package size or
label pattern, each against what a wrong answer drawn at random would give.

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
           "sicot": ["train.mode=sicot"]}


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
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the tables of a stored results.json and exit")
    args = p.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(table(results) + "\n\n" + paired(results))
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
    print(table(results) + "\n\n" + paired(results))


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
    """Markdown: test top-1 head / tail of the class means plus title-word detectors, minus NCM (the strongest
    baseline) and minus the title-free control at the same weight, paired by set and seed, mean ± std."""
    from benchmarks.cotrain_study import _ms

    test = {(r["set"], r["seed"], r["features"], r["classifier"]): r for r in results if r["split"] == "test"}
    lines = ["| set | features | w | seeds | head vs NCM | tail vs NCM | head vs control | tail vs control |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for set_name, config in dict.fromkeys((k[0], k[2]) for k in test):
        for weight in ATTRIBUTE_WEIGHTS:
            runs = [(r, test[(s, seed, c, "NCM")], test[(s, seed, c, f"NCM + {weight} balanced classes")])
                    for (s, seed, c, name), r in test.items()
                    if (s, c, name) == (set_name, config, f"NCM + {weight} title words")]
            if runs:
                cells = [_ms([(run[0][k] - run[against][k]) / 100 for run in runs])
                         for against in (1, 2) for k in ("head", "tail")]
                lines.append(f"| {set_name} | {config} | {weight} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
