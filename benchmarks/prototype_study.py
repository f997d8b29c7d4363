"""Post-hoc classifiers on a trained visual stream: class means (NCM) as a re-balancing baseline, and
tail products' means predicted from their titles.

    python -m benchmarks.prototype_study --workdir .bench/prototypes                 # informative, seed 0
    python -m benchmarks.prototype_study --workdir .bench/prototypes --sets apparel --seeds 0 1 2

Per set and seed: the visual-only baseline and the baseline with logit adjustment are trained as in
`benchmarks/side_info_study.py` (six epochs from the pretrained source, its 1x budget; kept under
`<workdir>/<set>/keep/`, so a second run only scores), then each classifier is scored on the same
features of the validation and test photos (top-1 overall / head / tail, %):

- `W`: the trained classifier (of the baseline, the baseline with logit adjustment, or co-training as shipped,
  `--configs`); `W - log prior`: post-hoc logit adjustment (baseline only);
- `NCM`: cosine to each class's mean normalised training feature;
- `title tail`: NCM whose tail classes' means are predicted from their titles alone: word detectors U fitted
  by ridge regression (weighted by photos, `--ridge`) from the head classes' idf-weighted title words
  (`class_word_weights`) to their means;
- `shrunk kK`: tail means pulled toward those predictions with the weight of K photos.

Benchmarks measure, they assert nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.cotrain_study import LA, SOURCE, _params, prepare_set, pretrain_backbone
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


def classifiers(recognizer, manifest, params, ridge: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """({name: unit rows [C, d], scored against unit features}, training photos per class, head mask)."""
    from sicot.text.word2vec import Vocabulary

    train, labels = features(recognizer, manifest, "train")
    classes = len(recognizer.classes)
    counts = torch.bincount(labels, minlength=classes).float()[:, None]
    head = counts[:, 0] >= params.evaluate.head_threshold
    means = torch.zeros(classes, train.shape[1]).index_add_(0, labels, F.normalize(train, dim=1)) / counts
    vocab = Vocabulary.load(params.paths.word2vec)
    titles = [vocab.encode(r.title, params.train.max_title_len) for r in manifest.train]  # in shard order
    words = class_word_weights(labels.tolist(), titles, classes, len(vocab))
    Th, nh = words[head], counts[head]
    detectors = torch.linalg.solve(Th.t() @ (nh * Th) + ridge * torch.eye(words.shape[1]), Th.t() @ (nh * means[head]))
    predicted = F.normalize(words @ detectors, dim=1)
    rows = {"NCM": means, "title tail": torch.where(head[:, None], means, predicted)}
    for k in (1, 3):
        rows[f"shrunk k{k}"] = torch.where(head[:, None], means, (counts * means + k * predicted) / (counts + k))
    return {name: F.normalize(r, dim=1) for name, r in rows.items()}, counts[:, 0], head


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".bench/prototypes")
    p.add_argument("--sets", nargs="+", default=["informative"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="whose features: the visual-only baseline, with logit adjustment, co-trained (as shipped)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from sicot.data.prepared import load_prepared
    from sicot.model.recognizer import Recognizer
    from sicot.train import run_training

    workdir = Path(args.workdir)
    common = [f"train.backbone_weights={pretrain_backbone(workdir, SOURCE)}", "train.threads=1"]
    results = []
    for set_name in args.sets:
        prepare_set(workdir, set_name, common)
        for seed in args.seeds:
            for config in args.configs:
                overrides = CONFIGS[config]
                out = workdir / set_name / "keep" / f"{config}-s{seed}"
                params = _params(workdir, set_name, [*common, *overrides, *BUDGETS[""], f"train.seed={seed}",
                                                     f"paths.models={out}"])
                model = out / params.train.mode / "model.pt"
                if not model.exists():
                    run_training(params, track=False)
                recognizer = Recognizer.load(str(model))
                manifest = load_prepared(params.paths.prepared)
                rows, counts, head = classifiers(recognizer, manifest, params, args.ridge)
                weight, log_prior = recognizer.weight.float(), torch.log(counts / counts.sum())
                for split in ("val", "test"):
                    feats, labels = features(recognizer, manifest, split)
                    scored = {"W": feats @ weight.t()}
                    if config == "baseline":
                        scored["W - log prior"] = feats @ weight.t() - log_prior
                    unit = F.normalize(feats, dim=1)
                    scored |= {name: unit @ r.t() for name, r in rows.items()}
                    for name, scores in scored.items():
                        results.append({"set": set_name, "seed": seed, "features": config, "classifier": name,
                                        "split": split, **top1(scores, labels, head)})
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def table(results: list[dict]) -> str:
    """Mean over seeds per (set, features, classifier): validation top-1, test top-1 / head / tail."""
    lines = ["| set | features | classifier | seeds | validation | test | head | tail |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["set"], r["features"], r["classifier"]), []).append(r)
    for (set_name, config, name), rows in groups.items():
        val = [r for r in rows if r["split"] == "val"]
        test = [r for r in rows if r["split"] == "test"]
        mean = [sum(r[k] for r in split) / len(split) for split, k in
                ((val, "all"), (test, "all"), (test, "head"), (test, "tail"))]
        lines.append(f"| {set_name} | {config} | {name} | {len(val)} | " + " | ".join(f"{m:.1f}" for m in mean) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
