"""Ranks spawned by tests/test_parallel.py: each rank runs named scenarios against a single-process
reference (`nn.Linear(bias=False)` + `F.cross_entropy` on the same global batch) and records failures.

A scenario runs all its collectives before it asserts, so a failed assertion on one rank never leaves
the others waiting in a collective; it is reported per scenario and the ranks go on to the next one.
"""
from __future__ import annotations

import json
import math
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

RTOL, ATOL = 1e-5, 1e-6
DIM, CLASSES = 8, 11
SIZES = {1: [9], 2: [5, 4], 3: [4, 2, 3]}  # uneven local batches: the last batch of an epoch


def close(actual, expected, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def batch(sizes, dim=DIM, classes=CLASSES, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), dim, generator=gen)
    y = torch.randint(0, classes, (sum(sizes),), generator=gen)
    return x, y


def mine(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def reference(x, y, weight, mask=None, log_prior=None, tau=0.0):
    """Single-process loss and gradients (w.r.t. the global features and the full weight)."""
    x = x.clone().requires_grad_()
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        fc.weight.copy_(weight)
    logits = fc(x)
    if tau:
        logits = logits + tau * log_prior
    if mask is not None:
        logits, y = logits[mask], y[mask]
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), x.grad, fc.weight.grad


def sharded_step(clf, x, y, sizes, rank, mask=None, log_prior=None, tau=0.0):
    xl = x[mine(sizes, rank)].clone().requires_grad_()
    ml = mask[mine(sizes, rank)] if mask is not None else None
    loss = clf.loss(xl, y[mine(sizes, rank)], ml, log_prior, tau)
    loss.backward()
    return loss.detach(), xl.grad, clf.weight.grad


def check_against_reference(clf, x, y, sizes, rank, world, mask=None, log_prior=None, tau=0.0, rtol=RTOL, atol=ATOL):
    from sicot.parallel import init_rows

    loss, gx, gw = sharded_step(clf, x, y, sizes, rank, mask, log_prior, tau)
    rloss, rgx, rgw = reference(x, y, init_rows(0, clf.num_classes, clf.dim, clf.seed), mask, log_prior, tau)
    lo, hi = clf.class_range
    scale = world if clf.ddp_average else 1
    close(loss, rloss, "loss", rtol, atol)
    close(gw, rgw[lo:hi], f"weight grad of classes [{lo}, {hi})", rtol, atol)
    close(gx / scale, rgx[mine(sizes, rank)], "feature grad", rtol, atol)


def make(**kw):
    from sicot.parallel import ShardedClassifier

    return ShardedClassifier(kw.pop("dim", DIM), kw.pop("num_classes", CLASSES), **kw)


# -- scenarios: fn(rank, world, root) ------------------------------------------------------------


def loss_and_grads(rank, world, root):
    sizes = SIZES[world]
    x, y = batch(sizes)
    check_against_reference(make(), x, y, sizes, rank, world)


def grads_without_ddp_scaling(rank, world, root):
    sizes = SIZES[world]
    x, y = batch(sizes)
    check_against_reference(make(ddp_average=False), x, y, sizes, rank, world)


def mask_and_logit_adjustment(rank, world, root):
    sizes = SIZES[world]
    x, y = batch(sizes, seed=2)
    mask = torch.ones(sum(sizes), dtype=torch.bool)
    if world > 1:
        mask[mine(sizes, world - 1)] = False  # one rank contributes no row at all
    mask[0] = False
    log_prior = torch.log_softmax(torch.randn(CLASSES, generator=torch.Generator().manual_seed(3)), 0)
    check_against_reference(make(), x, y, sizes, rank, world, mask, log_prior, tau=1.0)


def all_rows_masked(rank, world, root):
    sizes = SIZES[world]
    x, y = batch(sizes)
    loss, gx, gw = sharded_step(make(), x, y, sizes, rank, mask=torch.zeros(sum(sizes), dtype=torch.bool))
    assert loss.item() == 0.0 and not gx.any() and not gw.any(), "no row left must give 0 and zero gradients"


def labels_on_one_rank(rank, world, root):
    from sicot.parallel import shard_range

    sizes = SIZES[world]
    x, _ = batch(sizes)
    lo, hi = shard_range(CLASSES, world, world - 1)  # every label belongs to the last rank's shard
    y = torch.randint(lo, hi, (sum(sizes),), generator=torch.Generator().manual_seed(4))
    check_against_reference(make(), x, y, sizes, rank, world)


def chunked_equals_unchunked(rank, world, root):
    sizes = SIZES[world]
    x, y = batch(sizes)
    whole, parts = make(), make(chunk_rows=2)
    a, b = sharded_step(whole, x, y, sizes, rank), sharded_step(parts, x, y, sizes, rank)
    ta, tb = whole.topk(x[mine(sizes, rank)], 3), parts.topk(x[mine(sizes, rank)], 3)
    for name, u, v in zip(["loss", "feature grad", "weight grad"], a, b):
        close(v, u, f"chunked {name}", rtol=1e-6, atol=1e-7)
    close(tb[0], ta[0], "chunked top-k scores", rtol=1e-6, atol=1e-7)
    assert torch.equal(ta[1], tb[1]), "chunked top-k indices differ"


def topk_matches_softmax(rank, world, root):
    from sicot.parallel import init_rows

    sizes = SIZES[world]
    x, _ = batch(sizes, seed=5)
    clf = make()
    probs = torch.softmax(x @ init_rows(0, CLASSES, DIM).T, dim=1)[mine(sizes, rank)]
    for k in (1, 3, CLASSES, CLASSES + 5):  # k >= C: shards hold fewer than k classes and pad candidates
        scores, idx = clf.topk(x[mine(sizes, rank)], k)
        ref_scores, ref_idx = probs.topk(min(k, CLASSES), dim=1)
        close(scores, ref_scores, f"top-{k} scores")
        assert torch.equal(idx, ref_idx), f"top-{k} indices {idx.tolist()} != {ref_idx.tolist()}"


def full_weight_is_world_size_independent(rank, world, root):
    from sicot.parallel import init_rows

    clf = make(num_classes=5000)  # spans two init blocks
    assert torch.equal(clf.full_weight(), init_rows(0, 5000, DIM)), "initial weight depends on the world size"


def empty_shard(rank, world, root):
    from sicot.parallel import checkpoint, init_rows, shard_range

    classes = 2 if world == 3 else 1  # 3 ranks: (1, 1, 0); 2 ranks: (1, 0)
    assert shard_range(classes, world, world - 1) == (classes, classes)
    sizes = SIZES[world]
    x, _ = batch(sizes)
    y = torch.randint(0, classes, (sum(sizes),), generator=torch.Generator().manual_seed(6))
    clf = make(num_classes=classes)
    check_against_reference(clf, x, y, sizes, rank, world)
    if clf.class_range[0] == clf.class_range[1]:
        assert clf.weight.shape == (0, DIM), f"empty shard has weight {list(clf.weight.shape)}"
    scores, idx = clf.topk(x[mine(sizes, rank)], classes)
    ref = torch.softmax(x @ init_rows(0, classes, DIM).T, 1)[mine(sizes, rank)].topk(classes, 1)
    close(scores, ref.values, "empty-shard top-k scores")
    assert torch.equal(idx, ref.indices), "empty-shard top-k indices"
    checkpoint.save(root / f"empty-{world}", clf)
    again = make(num_classes=classes, seed=5)
    checkpoint.load(root / f"empty-{world}", again)
    assert torch.equal(again.weight, clf.weight), "empty-shard checkpoint round trip"
    assert torch.equal(checkpoint.consolidate(root / f"empty-{world}"), init_rows(0, classes, DIM))


def class_sampling(rank, world, root):
    from sicot.parallel import shard_range

    classes, rate = 60, 0.25
    sizes = SIZES[world]
    x, y = batch(sizes, classes=classes, seed=7)
    clf = make(num_classes=classes, sample_rate=rate)
    loss, _, gw = sharded_step(clf, x, y, sizes, rank)
    lo, hi = clf.class_range
    positives = {c - lo for c in y.tolist() if lo <= c < hi}
    touched = set(gw.abs().sum(1).nonzero().squeeze(1).tolist())
    assert positives <= touched, f"positive classes {sorted(positives - touched)} were not sampled"
    keep = min(max(math.ceil(rate * (hi - lo)), len(positives)), hi - lo)
    assert len(touched) == keep, f"{len(touched)} classes got a gradient, expected {keep}"
    assert torch.isfinite(loss), "sampled loss is not finite"
    clf.eval()  # evaluation uses every class: the exact loss again
    clf.weight.grad = None
    check_against_reference(clf, x, y, sizes, rank, world)
    assert shard_range(classes, world, rank) == (lo, hi)


def bf16_logits(rank, world, root):
    sizes = SIZES[world]
    x, y = batch(sizes)
    check_against_reference(make(logits_dtype=torch.bfloat16), x, y, sizes, rank, world, rtol=3e-2, atol=3e-3)


def bad_labels_fail_everywhere(rank, world, root):
    sizes = SIZES[world]
    x, y = batch(sizes)
    y[-1] = CLASSES  # only the last rank holds the bad label; every rank must raise, none may hang
    try:
        make().loss(x[mine(sizes, rank)], y[mine(sizes, rank)])
    except ValueError as exc:
        assert f"[0, {CLASSES})" in str(exc), str(exc)
    else:
        raise AssertionError("a label out of range was accepted")


def _train_one_step(clf, sizes, rank):
    x, y = batch(sizes, seed=8)
    opt = torch.optim.SGD(clf.parameters(), lr=0.5, momentum=0.9)
    clf.loss(x[mine(sizes, rank)], y[mine(sizes, rank)]).backward()
    opt.step()
    return opt


def checkpoint_save(rank, world, root):
    from sicot.parallel import checkpoint, shard_range
    from sicot.parallel.dist import all_gather_rows

    clf = make()
    opt = _train_one_step(clf, SIZES[world], rank)
    checkpoint.save(root / "ckpt", clf, opt)
    x, _ = batch([6], seed=9)
    scores, idx = clf.topk(x, 3)  # every rank asks about the same 6 rows
    shard_sizes = [b - a for a, b in (shard_range(CLASSES, world, r) for r in range(world))]
    momentum = all_gather_rows(opt.state[clf.weight]["momentum_buffer"], shard_sizes)
    expected = {"weight": clf.full_weight(), "momentum": momentum, "scores": scores, "idx": idx}
    if rank == 0:
        torch.save(expected, root / "expected.pt")
    assert (root / "ckpt" / "meta.json").is_file(), "meta.json missing after save"


def checkpoint_load(rank, world, root):
    from sicot.parallel import checkpoint

    clf = make(seed=123)  # a different init: everything must come from the checkpoint
    opt = torch.optim.SGD(clf.parameters(), lr=0.5, momentum=0.9)
    meta = checkpoint.load(root / "ckpt", clf, opt)
    x, _ = batch([6], seed=9)
    scores, idx = clf.topk(x, 3)
    expected = torch.load(root / "expected.pt")
    lo, hi = clf.class_range
    assert meta["world_size"] == 2
    assert torch.equal(clf.weight.detach(), expected["weight"][lo:hi]), "re-sharded weight differs"
    assert torch.equal(opt.state[clf.weight]["momentum_buffer"], expected["momentum"][lo:hi]), "momentum differs"
    assert torch.equal(checkpoint.consolidate(root / "ckpt"), expected["weight"]), "consolidated weight differs"
    assert torch.equal(idx, expected["idx"]), "predictions differ after re-sharding"
    close(scores, expected["scores"], "re-sharded top-k scores")


def checkpoint_mismatch(rank, world, root):
    from sicot.parallel import checkpoint

    for kw, field in (({"num_classes": CLASSES + 1}, "num_classes"), ({"dim": DIM + 1}, "dim")):
        clf = make(**kw)
        before = clf.weight.detach().clone()
        try:
            checkpoint.load(root / "ckpt", clf)
        except ValueError as exc:
            assert field in str(exc) and "meta.json" in str(exc), str(exc)
        else:
            raise AssertionError(f"a checkpoint with another {field} was loaded")
        assert torch.equal(clf.weight.detach(), before), "a failed load changed the weight"


def ddp_sgd_matches_single_process(rank, world, root):
    """A few SGD steps of backbone (DDP) + sharded FC equal one process on the same global batches."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sicot.parallel import init_rows

    sizes = SIZES[world]

    def backbone():
        torch.manual_seed(10)
        return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, DIM))

    ref_net, ref_w = backbone(), nn.Parameter(init_rows(0, CLASSES, DIM))
    ref_opt = torch.optim.SGD([*ref_net.parameters(), ref_w], lr=0.2, momentum=0.9, weight_decay=5e-4)
    net, clf = DDP(backbone()), make()
    opt = torch.optim.SGD([*net.parameters(), *clf.parameters()], lr=0.2, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        images, y = torch.randn(sum(sizes), 6, generator=gen), torch.randint(0, CLASSES, (sum(sizes),), generator=gen)
        ref_opt.zero_grad()
        F.cross_entropy(ref_net(images) @ ref_w.T, y).backward()
        ref_opt.step()
        opt.zero_grad()
        clf.loss(net(images[mine(sizes, rank)]), y[mine(sizes, rank)]).backward()
        opt.step()
    weight = clf.full_weight()
    for (name, p), q in zip(net.module.named_parameters(), ref_net.parameters()):
        close(p.detach(), q.detach(), f"backbone {name}")
    close(weight, ref_w.detach(), "classifier weight")


def class_means_match_single_process(rank, world, root):
    """The class-means rows of a sharded W, each rank streaming a different number of batches (one rank
    none at all on 3 ranks), equal one process's means over all photos; a class without photos keeps its
    trained row, and the scale is the mean norm of all trained rows."""
    from sicot.model.class_means import class_feature_sums, class_mean_rows
    from sicot.parallel.sharded_classifier import shard_range

    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(23, DIM, generator=gen), torch.randint(0, CLASSES - 1, (23,), generator=gen)  # last class: none
    trained = torch.randn(CLASSES, DIM, generator=gen)
    cuts = {1: [0, 23], 2: [0, 15, 23], 3: [0, 23, 23, 23]}[world]  # rank r streams photos cuts[r]:cuts[r + 1]
    lo, hi = shard_range(CLASSES, world, rank)
    mine = range(cuts[rank], cuts[rank + 1])
    batches = [(x[i:min(i + 4, mine.stop)], y[i:min(i + 4, mine.stop)]) for i in range(mine.start, mine.stop, 4)]
    sums, counts = class_feature_sums(lambda images: images, batches, (lo, hi), DIM, torch.device("cpu"))
    rows = class_mean_rows(trained[lo:hi], sums, counts)

    means = torch.zeros(CLASSES, DIM).index_add_(0, y, F.normalize(x, dim=-1))
    expected = F.normalize(means, dim=1) * trained.norm(dim=1).mean()
    expected[CLASSES - 1] = trained[CLASSES - 1]
    close(counts, torch.bincount(y, minlength=CLASSES)[lo:hi], "photo counts")
    close(rows, expected[lo:hi], "class-means rows", rtol=1e-5, atol=1e-5)


def title_word_rows_reference(x, y, tokens, classes, vocab_size, ridge):
    """The title words' rows by the textbook formula over all photos at once (float64): the class-balanced,
    centred ridge regression U of each photo's held words on its unit feature, then T · U, T the classes'
    idf-weighted words, scaled to a mean norm of 1 over the classes with words."""
    unit = F.normalize(x.double(), dim=-1)
    photos = torch.bincount(y, minlength=classes).double()
    weight = 1 / ((photos > 0).sum() * photos[y])
    holds = torch.zeros(len(y), vocab_size, dtype=torch.float64)
    for i, ids in enumerate(tokens.tolist()):
        holds[i, [t for t in ids if t > 1]] = 1  # 0: padding, 1: unknown
    xc = unit - (weight[:, None] * unit).sum(0)
    yc = holds - (weight[:, None] * holds).sum(0)
    covariance = xc.t() @ (weight[:, None] * xc)
    covariance += ridge * covariance.trace() / x.shape[1] * torch.eye(x.shape[1], dtype=torch.float64)
    detectors = torch.linalg.solve(covariance, xc.t() @ (weight[:, None] * yc)).t()
    holding = torch.zeros(classes, vocab_size, dtype=torch.float64).index_add_(0, y, holds)
    idf = torch.log((photos > 0).sum() / (holding > 0).sum(0).clamp_min(1))
    looks = holding / photos.clamp_min(1)[:, None] * idf
    looks = looks / looks.sum(1, keepdim=True).clamp_min(1e-12)
    rows = looks @ detectors
    norms = rows.norm(dim=1)
    return (rows / norms[norms > 0].mean()).float()


def title_word_rows_match_single_process(rank, world, root):
    """Title-word rows of a sharded W, each rank streaming its own photos (one rank none on 3 ranks), titles
    padded to different widths per batch, equal the textbook formula over all photos; a class without photos
    keeps its trained row."""
    from sicot.model.class_means import class_feature_sums, class_mean_rows
    from sicot.model.title_words import RIDGE, TitleWordSums
    from sicot.parallel.sharded_classifier import shard_range

    gen = torch.Generator().manual_seed(11)
    n, vocab, width = 40, 9, 5
    x, y = torch.randn(n, DIM, generator=gen), torch.randint(0, CLASSES - 1, (n,), generator=gen)  # last class: none
    tokens = torch.randint(0, vocab, (n, width), generator=gen)
    tokens[::3, 3:] = 0  # shorter titles; a batch of them is sent 3 columns wide
    trained = torch.randn(CLASSES, DIM, generator=gen)
    cuts = {1: [0, n], 2: [0, 27, n], 3: [0, n, n, n]}[world]
    lo, hi = shard_range(CLASSES, world, rank)
    counts = torch.bincount(y, minlength=CLASSES)
    words = TitleWordSums(counts, (lo, hi), vocab, width, DIM, torch.device("cpu"))
    batches = []
    for i in range(cuts[rank], cuts[rank + 1], 3):
        part = slice(i, min(i + 3, cuts[rank + 1]))
        narrow = bool((tokens[part, 3:] == 0).all())
        batches.append((x[part], y[part], tokens[part, :3] if narrow else tokens[part]))
    sums, _ = class_feature_sums(lambda images: images, batches, (lo, hi), DIM, torch.device("cpu"), words=words)
    rows = class_mean_rows(trained[lo:hi], sums, counts[lo:hi], attributes=words.attribute_rows(), weight=0.5)

    means = F.normalize(torch.zeros(CLASSES, DIM).index_add_(0, y, F.normalize(x, dim=-1)), dim=1)
    attributes = title_word_rows_reference(x, y, tokens, CLASSES, vocab, RIDGE)
    expected = (means + 0.5 * attributes) * trained.norm(dim=1).mean()
    expected[CLASSES - 1] = trained[CLASSES - 1]
    close(rows, expected[lo:hi], "title-word rows", rtol=1e-4, atol=1e-5)


SCENARIOS = {
    "loss_and_grads": (loss_and_grads, (1, 2, 3)),
    "grads_without_ddp_scaling": (grads_without_ddp_scaling, (2, 3)),
    "mask_and_logit_adjustment": (mask_and_logit_adjustment, (1, 2, 3)),
    "all_rows_masked": (all_rows_masked, (1, 2)),
    "labels_on_one_rank": (labels_on_one_rank, (2, 3)),
    "chunked_equals_unchunked": (chunked_equals_unchunked, (1, 2, 3)),
    "topk_matches_softmax": (topk_matches_softmax, (1, 2, 3)),
    "full_weight_is_world_size_independent": (full_weight_is_world_size_independent, (1, 2, 3)),
    "empty_shard": (empty_shard, (2, 3)),
    "class_sampling": (class_sampling, (1, 2, 3)),
    "bf16_logits": (bf16_logits, (1, 2)),
    "bad_labels_fail_everywhere": (bad_labels_fail_everywhere, (2, 3)),
    "checkpoint_save": (checkpoint_save, (2,)),
    "checkpoint_load": (checkpoint_load, (1, 3)),
    "checkpoint_mismatch": (checkpoint_mismatch, (3,)),
    "ddp_sgd_matches_single_process": (ddp_sgd_matches_single_process, (1, 2, 3)),
    "class_means_match_single_process": (class_means_match_single_process, (1, 2, 3)),
    "title_word_rows_match_single_process": (title_word_rows_match_single_process, (1, 2, 3)),
}


def _rank_main(rank, world, port, root):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sicot.parallel import dist as pdist

    pdist.init_from_env(backend="gloo", timeout_s=60)
    results = {}
    try:
        for name, (fn, worlds) in SCENARIOS.items():
            if world not in worlds:
                continue
            try:
                fn(rank, world, Path(root))
                results[name] = None
            except AssertionError as exc:
                results[name] = f"rank {rank}: {exc}\n{traceback.format_exc(limit=3)}"
            pdist.barrier()
    finally:
        Path(root, f"results-{world}-{rank}.json").write_text(json.dumps(results))
        pdist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, root: Path) -> dict[str, str | None]:
    """Run every scenario meant for `world` ranks; {scenario: None when it passed, else the failure}."""
    mp.start_processes(_rank_main, args=(world, free_port(), str(root)), nprocs=world, start_method="spawn")
    merged: dict[str, str | None] = {}
    for rank in range(world):
        for name, failure in json.loads(Path(root, f"results-{world}-{rank}.json").read_text()).items():
            merged[name] = merged.get(name) or failure
    return merged


# -- the trained model's export (tests/test_sharded_export.py) ---------------------------------------

EXPORT_CLASSES, EXPORT_DIM = 11, 8


def export_sharded(rank, world, port, root):
    """`sicot.train.write_outputs` on `world` gloo ranks with a class-sharded W while gathering W raises;
    rank 0 also writes the one-file model of the same weights (`reference.pt`)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from types import SimpleNamespace

    from sicot.config import Params
    from sicot.model.backbone import create_backbone
    from sicot.model.recognizer import Recognizer
    from sicot.model.sicot import SICoT
    from sicot.parallel import ShardedClassifier, init_rows, sharded_classifier
    from sicot.parallel import dist as pdist
    from sicot.train import TrainingProcess, write_outputs

    def refuse(*args, **kwargs):
        raise AssertionError("the export gathered W")

    pdist.init_from_env(backend="gloo", timeout_s=60)
    outcome = {}
    try:
        classifier = ShardedClassifier(EXPORT_DIM, EXPORT_CLASSES)
        torch.manual_seed(0)
        backbone, dim = create_backbone("resnet18", out_dim=EXPORT_DIM)
        model = SICoT(backbone, dim, classifier)
        params = Params.from_dict({"train": {"mode": "baseline", "feature_dim": EXPORT_DIM, "image_size": 16},
                                   "paths": {"models": str(Path(root, "models"))}})
        training = SimpleNamespace(params=params, model=model,
                                   process=TrainingProcess(rank, world, torch.device("cpu"), owns_group=False))
        data = SimpleNamespace(classes=[f"SKU{c}" for c in range(EXPORT_CLASSES)])
        ShardedClassifier.full_weight = refuse
        sharded_classifier.all_gather_rows = refuse
        outputs = write_outputs(training, data, [], str(Path(root, "models", "baseline")))
        outcome = {"model": outputs["model"], "classifier_shards": outputs["classifier_shards"],
                   "class_range": list(classifier.class_range)}
        if rank == 0:
            Recognizer(backbone, init_rows(0, EXPORT_CLASSES, dim), data.classes, 16,
                       {"backbone": "resnet18", "feature_dim": dim}).save(str(Path(root, "reference.pt")))
    except Exception as exc:  # reported to the test, which names the rank
        outcome = {"error": f"rank {rank}: {exc}\n{traceback.format_exc(limit=4)}"}
    finally:
        Path(root, f"export-{rank}.json").write_text(json.dumps(outcome))
        pdist.cleanup()
