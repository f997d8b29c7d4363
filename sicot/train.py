"""The training engine: baseline (visual only) or SICoT (visual + title co-training), one code path.

Reads `paths.prepared` (labels.json, train/val) and, for SICoT, `paths.word2vec`; writes
`paths.models/<mode>/`, a local path or an `s3://` URI, so a run's state outlives the machine it ran on:
`checkpoint.pt` after every epoch (everything needed to resume, at the same or another world size), and
at the end `model.pt` (the image-only `Recognizer`), `history.json` and, for SICoT, `text_encoder.pt`
(for the attention view). Rank 0 writes each of these files atomically; a class-sharded classifier is
checkpointed by every rank into its own directory, which checkpoint.pt names (`save_checkpoint`).
With tracking on, the training run also carries model.pt, text_encoder.pt and history.json as artifacts
under `model/` and the tag `sicot.mode`, so a step on another machine can take the model from MLflow.

The visual stream starts from `train.backbone_weights` (`sicot.model.starting_point`). The GPU settings
that were measured to pay (docs/benchmarks.md) are params the engine applies: `train.channels_last`,
`train.fused_optimizer`, `train.tf32`, `train.fc_logits_dtype`; one that cannot apply on the device is
ignored there, and the log says so once.

Distributed the plain way: `torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; without them the same code runs
as a one-process group. `train.batch_size` is per process: the global batch is world size × batch_size.
DDP wraps the two encoders (`SICoT.streams`); the classifier stays outside it so a class-sharded
classifier can own its rows (`make_classifier`), while a replicated one has its gradient averaged
explicitly.

Reading order: `run_training` (join the process group) → `train_in_group` (build, resume, the epoch
loop) → `train_one_epoch` and `evaluate` over a `TrainingSetup`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from sicot import storage, torchfile, tracking
from sicot.config import Params
from sicot.data.dataset import ProductImages, collate
from sicot.data.stream import ShardStream
from sicot.model.backbone import create_backbone
from sicot.model.class_means import class_feature_sums, class_mean_rows
from sicot.model.classifier import ReplicatedClassifier
from sicot.model.recognizer import Recognizer, save_sharded
from sicot.model.sicot import CoTraining, SICoT
from sicot.model.starting_point import StartingPoint, load_starting_point
from sicot.model.text_encoders import create_text_encoder, save_text_encoder
from sicot.model.title_words import TitleWordSums
from sicot.text.word2vec import Vocabulary

CHECKPOINT_FORMAT = "sicot.checkpoint/1"
CLASSIFIER_GROUP = 1  # index of the classifier's parameter group in the optimizer
LOGITS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # train.fc_logits_dtype


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says what to change."""


# --- process group ---------------------------------------------------------------------------------

@dataclass
class TrainingProcess:
    """This process's place in the training group."""
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool
    store_dir: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but no CUDA device is available")
    if preference == "cuda" or preference == "auto" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def join_process_group(device_preference: str) -> TrainingProcess:
    """Join the torchrun group (WORLD_SIZE set), reuse a group the caller made, or make a 1-process one."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return TrainingProcess(dist.get_rank(), dist.get_world_size(), device, owns_group=False)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, init_method="env://")
        return TrainingProcess(dist.get_rank(), dist.get_world_size(), device, owns_group=True)
    store_dir = tempfile.mkdtemp(prefix="sicot-pg-")
    store = dist.FileStore(os.path.join(store_dir, "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    return TrainingProcess(0, 1, device, owns_group=True, store_dir=store_dir)


def leave_process_group(process: TrainingProcess) -> None:
    if process.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    if process.store_dir:
        shutil.rmtree(process.store_dir, ignore_errors=True)


# --- device settings -----------------------------------------------------------------------------------

def fused_sgd_supported(device: torch.device) -> bool:
    """Whether the installed torch has a fused SGD kernel for `device`: one tiny step tells."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.SGD([probe], lr=0.1, momentum=0.9, fused=True).step()
    except RuntimeError:
        return False
    return True


def configure_backends(params: Params, device: torch.device) -> list[str]:
    """Apply the process-wide settings for `device`; returns the keys asked for that apply on CUDA only."""
    # CPU runs repeat bit for bit (tests and resume rely on it); on a GPU the fast cuDNN kernels win.
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if device.type != "cuda":
        return [key for key, wanted in (("train.amp", params.train.amp), ("train.tf32", params.train.tf32)) if wanted]
    # torch's float32 precision API that torch.compile's autotuner reads too (mixing it with the newer
    # per-backend `fp32_precision` settings makes that read raise).
    torch.set_float32_matmul_precision("high" if params.train.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = params.train.tf32
    return []


# --- data --------------------------------------------------------------------------------------------

@dataclass
class TrainingData:
    classes: list[str]
    prepared: str
    shards: dict[str, list]  # split -> the shards (sicot.data.shards.Shard) that hold its images
    train: ProductImages  # what one training image becomes (augmented)
    val: ProductImages
    train_counts: list[int]
    vocab: Vocabulary | None  # SICoT mode, or title-word rows


def load_data(params: Params) -> TrainingData:
    from sicot.data.longtail import class_counts
    from sicot.data.prepared import load_prepared

    prepared = params.paths.prepared
    labels_uri = storage.join(prepared, "labels.json")
    try:
        classes = json.loads(storage.read_text(labels_uri))["classes"]
    except FileNotFoundError:
        raise TrainError(f"{labels_uri}: not found; run prepare_data first") from None
    manifest = load_prepared(prepared)
    if manifest.classes() != classes:
        raise TrainError(f"{labels_uri}: classes differ from the SKUs in {prepared}/train.jsonl; "
                         "re-run prepare_data")
    vocab, encode = None, None
    if has_title_stream(params) or params.train.classifier_rows == "title_words":
        vocab = Vocabulary.load(params.paths.word2vec)
    if has_title_stream(params):
        encode = title_encoder(vocab, params)
    index = {sku: i for i, sku in enumerate(classes)}
    counts = class_counts(manifest.train)
    image_size = params.train.image_size
    # One memory budget for the decoded images, shared by the splits in proportion to their images.
    budget = params.train.cache_mb * 2 ** 20
    train_share = budget * len(manifest.train) // (len(manifest.train) + len(manifest.val))
    return TrainingData(
        classes=classes, prepared=prepared, shards=manifest.shards,
        train=ProductImages(index, image_size, encode_title=encode, augment=True, cache_bytes=train_share),
        val=ProductImages(index, image_size, encode_title=encode, cache_bytes=budget - train_share),
        train_counts=[counts[sku] for sku in classes], vocab=vocab)


def has_title_stream(params: Params) -> bool:
    """Co-training: `train.mode: sicot` with a co-training loss. With λ = 0 a title stream would learn
    nothing and change nothing: none is built, and the titles enter only through
    `train.classifier_rows: title_words`."""
    return params.train.mode == "sicot" and params.train.cotrain_weight > 0


def title_encoder(vocab: Vocabulary, params: Params):
    """A title's token ids, cut to train.max_title_len."""
    return lambda title: vocab.encode(title, params.train.max_title_len)


# --- model -------------------------------------------------------------------------------------------

def make_classifier(params: Params, dim: int, num_classes: int, group) -> torch.nn.Module:
    """The one place that decides how W [C, d] is held: replicated on every rank, or class-sharded."""
    kind = params.train.fc
    if kind == "auto":
        kind = "sharded" if dist.get_world_size(group) > 1 else "replicated"
    logits_dtype = LOGITS_DTYPES[params.train.fc_logits_dtype]
    if kind == "sharded":
        from sicot.parallel import ShardedClassifier

        return ShardedClassifier(dim, num_classes, group=group, chunk_rows=params.train.fc_chunk_rows,
                                 sample_rate=params.train.fc_sample_rate, seed=params.train.seed,
                                 logits_dtype=logits_dtype)
    return ReplicatedClassifier(dim, num_classes, seed=params.train.seed, logits_dtype=logits_dtype)


def build_model(params: Params, data: TrainingData, start: StartingPoint, group) -> SICoT:
    backbone, dim = create_backbone(params.train.backbone, out_dim=params.train.feature_dim)
    start.load_backbone(backbone)
    encoder = None
    if has_title_stream(params):
        encoder = create_text_encoder(params.train.text_encoder, data.vocab.embeddings, dim)
    classifier = make_classifier(params, dim, len(data.classes), group)
    start.load_classifier_rows(classifier, data.classes)
    cotraining = CoTraining(weight=params.train.cotrain_weight, rampup=params.train.cotrain_rampup)
    return SICoT(backbone, dim, classifier, encoder, cotraining=cotraining)


def fingerprint(params: Params, model: SICoT, data: TrainingData) -> dict:
    """What a checkpoint must share with the current run to be resumed."""
    mode = params.train.mode
    return {
        "mode": mode,
        "classifier": "sharded" if is_sharded(model) else "replicated",
        "backbone": params.train.backbone,
        "feature_dim": model.dim,
        "image_size": params.train.image_size,
        "text_encoder": params.train.text_encoder if has_title_stream(params) else "",
        "word_vectors": list(data.vocab.embeddings.shape) if data.vocab is not None else [],
        "classes": len(data.classes),
        "classes_sha256": hashlib.sha256("\n".join(data.classes).encode()).hexdigest(),
    }


# --- checkpoint ---------------------------------------------------------------------------------------

def capture_rng() -> dict:
    state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:]],
            "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_torch(obj, uri: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def is_sharded(model: SICoT) -> bool:
    return not isinstance(model.classifier, ReplicatedClassifier)


def new_classifier_dir(epoch: int) -> str:
    """A directory name no earlier attempt used, the same on every rank: a save never writes into what
    a killed run left behind, nor into what the current checkpoint.pt names."""
    name = [f"classifier-{epoch}-{uuid.uuid4().hex[:8]}"]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def save_checkpoint(training: TrainingSetup, epoch: int, history: list, expected: dict, out_dir: str) -> None:
    """Collective. `checkpoint.pt` (rank 0) holds everything but a sharded classifier, which every rank
    writes to a new `classifier-<epoch>-<id>/` first. checkpoint.pt names that directory and is written
    last, in one atomic write (S3 has no directory rename): it is the commit point. Other classifier
    directories (earlier epochs, a killed run's leftovers) are deleted only after it, so a kill at any
    point leaves checkpoint.pt naming a complete directory."""
    model, optimizer = training.model, training.optimizer
    rng = [None] * training.process.world_size
    dist.all_gather_object(rng, capture_rng())
    model_state, optim_state = model.state_dict(), optimizer.state_dict()
    classifier_dir = ""
    if is_sharded(model):
        from sicot.parallel import checkpoint as sharded_checkpoint

        classifier_dir = new_classifier_dir(epoch)
        sharded_checkpoint.save(storage.join(out_dir, classifier_dir), model.classifier, optimizer)
        model_state = {k: v for k, v in model_state.items() if not k.startswith("classifier.")}
        owned = set(optim_state["param_groups"][CLASSIFIER_GROUP]["params"])
        optim_state["state"] = {i: v for i, v in optim_state["state"].items() if i not in owned}
    if training.process.is_main:
        save_torch({"format": CHECKPOINT_FORMAT, "fingerprint": expected, "epoch": epoch, "model": model_state,
                    "optimizer": optim_state, "scheduler": training.scheduler.state_dict(), "rng": rng,
                    "history": history, "classifier_dir": classifier_dir},
                   storage.join(out_dir, "checkpoint.pt"))
        for old in storage.list_children(out_dir):
            if old.startswith("classifier-") and old != classifier_dir:
                storage.delete_tree(storage.join(out_dir, old))


def load_checkpoint(uri: str, expected: dict) -> dict:
    """The checkpoint at `uri`, refused with the differences named when it belongs to another setup."""
    try:
        blob = torchfile.load(uri, "training checkpoint")
    except FileNotFoundError:
        raise TrainError(f"train.resume=true but there is no checkpoint at {uri}; "
                         "train without resume first") from None
    except torchfile.TorchFileError as exc:
        raise TrainError(f"{exc}, or set train.resume=false to start over") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{uri}: not a sicot training checkpoint")
    found = blob["fingerprint"]
    differ = [f"{key}: checkpoint {found.get(key)!r}, now {expected[key]!r}"
              for key in expected if found.get(key) != expected[key]]
    if differ:
        raise TrainError(f"{uri} was trained with another configuration and cannot be resumed "
                         f"({'; '.join(differ)}). Set train.resume=false to start over.")
    return blob


def resume(training: TrainingSetup, out_dir: str, expected: dict) -> tuple[int, list, dict | None]:
    """Load the checkpoint into model, optimizer and scheduler: (epochs done, history, this rank's RNG
    state or None when the world size changed)."""
    model, optimizer = training.model, training.optimizer
    blob = load_checkpoint(storage.join(out_dir, "checkpoint.pt"), expected)
    missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    if unexpected or any(not k.startswith("classifier.") or not blob["classifier_dir"] for k in missing):
        raise TrainError(f"{out_dir}/checkpoint.pt: model state does not fit (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    # Which SGD kernel runs is this run's choice (train.fused_optimizer, the device), not saved state.
    kernels = [{key: group[key] for key in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(blob["optimizer"])
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)
    training.scheduler.load_state_dict(blob["scheduler"])
    if blob["classifier_dir"]:
        from sicot.parallel import checkpoint as sharded_checkpoint

        sharded_checkpoint.load(storage.join(out_dir, blob["classifier_dir"]), model.classifier, optimizer)
    process = training.process
    rng = blob["rng"][process.rank] if len(blob["rng"]) == process.world_size else None
    return blob["epoch"], blob["history"], rng


# --- loops --------------------------------------------------------------------------------------------

@dataclass
class TrainingSetup:
    """What every epoch works on, built once by `train_in_group`."""
    params: Params
    process: TrainingProcess
    group: dist.ProcessGroup
    model: SICoT
    streams: torch.nn.Module  # the data-parallel runner of model.streams
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: ShardStream  # the training images; `set_epoch` before each epoch
    loader: DataLoader
    val_loader: DataLoader
    log_prior: torch.Tensor | None  # log class prior, for logit adjustment

    @property
    def amp(self) -> bool:
        return self.params.train.amp and self.process.device.type == "cuda"

    def to_device(self, batch: dict) -> dict:
        """The batch on this process's device, images in the memory layout the backbone runs in."""
        device = self.process.device
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if self.params.train.channels_last:
            moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
        return moved


def average_gradients(module: torch.nn.Module, group) -> None:
    """Mean gradient over ranks for parameters that live outside DDP (a replicated classifier)."""
    world = dist.get_world_size(group)
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= world


def train_one_epoch(training: TrainingSetup, epoch: int) -> dict:
    from tqdm import tqdm

    model, optimizer, params, device = training.model, training.optimizer, training.params, training.process.device
    model.train()
    sync_classifier = isinstance(model.classifier, ReplicatedClassifier)
    show = training.process.is_main
    # loss sum, visual sum, cotrain sum, correct, images: summed on device, read once per refresh.
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    start = time.perf_counter()
    bar = tqdm(training.loader, desc=f"{params.train.mode} epoch {epoch + 1}/{params.train.epochs}",
               disable=not show, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    for step, batch in enumerate(bar):
        batch = training.to_device(batch)
        labels = batch["label"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=training.amp):
            loss, parts = model.training_loss(batch["image"], labels, batch.get("tokens"), training.log_prior,
                                              params.train.logit_adjust_tau, streams=training.streams)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync_classifier:
            average_gradients(model.classifier, training.group)
        optimizer.step()
        n = labels.shape[0]
        predicted = model.classifier.topk(parts["features"].float(), 1)[1][:, 0]
        totals += torch.stack([loss.detach() * n, parts["visual"] * n, parts.get("cotrain", loss.new_zeros(())) * n,
                               (predicted == labels).sum(), loss.new_tensor(n)]).double()
        if show and step % 10 == 0:
            seen = totals[4].item()
            bar.set_postfix(loss=f"{totals[0].item() / seen:.3f}",
                            img_s=f"{seen * training.process.world_size / (time.perf_counter() - start):.0f}")
    dist.all_reduce(totals, group=training.group)
    loss_sum, visual_sum, cotrain_sum, correct, seen = totals.tolist()
    seconds = time.perf_counter() - start
    out = {"loss": loss_sum / max(seen, 1), "visual_loss": visual_sum / max(seen, 1),
           "train_top1": correct / max(seen, 1), "images_per_s": seen / seconds, "seconds": seconds}
    if has_title_stream(params):
        out["cotrain_loss"] = cotrain_sum / max(seen, 1)
    return out


@torch.no_grad()
def evaluate(training: TrainingSetup) -> float:
    """Top-1 of the visual stream alone (what the deployed model sees). Every rank scores the whole
    split: validation is small, and a class-sharded classifier needs all ranks in each top-k."""
    model, device = training.model, training.process.device
    model.eval()
    correct = seen = 0
    for batch in training.val_loader:
        batch = training.to_device(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=training.amp):
            features = model.backbone(batch["image"])
        predicted = model.classifier.topk(features.float(), 1)[1][:, 0]
        correct += int((predicted == batch["label"]).sum())
        seen += batch["label"].shape[0]
    return correct / seen if seen else 0.0


# --- the run ------------------------------------------------------------------------------------------

def make_optimizer(params: Params, model: SICoT, fused: bool):
    """SGD over two parameter groups, the encoders and the classifier (CLASSIFIER_GROUP), so a sharded
    classifier's state can be checkpointed apart; StepLR decays both every epoch. `fused`: SGD's fused
    kernel, else torch's default for the device."""
    groups = [{"params": list(model.streams.parameters())}, {"params": list(model.classifier.parameters())}]
    optimizer = torch.optim.SGD(groups, lr=params.train.lr, momentum=params.train.momentum,
                                weight_decay=params.train.weight_decay, fused=fused or None)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=params.train.lr_gamma)


def make_loaders(params: Params, data: TrainingData, process: TrainingProcess):
    batch_size, workers, val_batch = params.train.batch_size, params.train.workers, params.evaluate.batch_size
    train = ShardStream(data.train, data.prepared, data.shards["train"], batch_size, rank=process.rank,
                        ranks=process.world_size, shuffle=True, drop_last=True, seed=params.train.seed,
                        buffer=params.train.shuffle_buffer)
    val = ShardStream(data.val, data.prepared, data.shards.get("val", []), val_batch)
    # Workers load the next batches (DataLoader's prefetch: 2 each) while a step runs, and live for the
    # whole run with their caches.
    loading = dict(num_workers=workers, collate_fn=collate, persistent_workers=workers > 0,
                   pin_memory=process.device.type == "cuda")
    return train, DataLoader(train, batch_size=batch_size, **loading), DataLoader(val, batch_size=val_batch, **loading)


def wrap_streams(model: SICoT, params: Params, process: TrainingProcess):
    """The data-parallel runner of the two encoders (the classifier stays outside DDP)."""
    ids = [process.device.index] if process.device.type == "cuda" else None
    streams = torch.nn.parallel.DistributedDataParallel(model.streams, device_ids=ids)
    if not params.train.compile:
        return streams
    # Compile one graph: with dynamo's DDP graph split, the SICoT streams' backward fails on CUDA
    # (inductor stride assertion in convolution_backward, torch 2.11, H100); DDP then all-reduces
    # after the backward instead of overlapping it.
    torch._dynamo.config.optimize_ddp = False
    return torch.compile(streams)


def log_prior_of(data: TrainingData, params: Params, device: torch.device) -> torch.Tensor | None:
    """log class prior of the training split, for logit adjustment (None when it is off)."""
    if not params.train.logit_adjust_tau:
        return None
    counts = torch.tensor(data.train_counts, dtype=torch.float64, device=device)
    return (counts / counts.sum()).log().float()


@torch.no_grad()
def exported_rows(training: TrainingSetup, data: TrainingData) -> torch.Tensor:
    """This rank's rows of the exported W: the trained rows, or the class means of the training photos, alone
    or with their title words (`train.classifier_rows`); collective."""
    params, model, process = training.params, training.model, training.process
    trained = model.classifier.weight.detach()
    rows_from = params.train.classifier_rows
    if rows_from == "trained":
        return trained
    words, encode = None, None
    if rows_from == "title_words":
        words = TitleWordSums(torch.tensor(data.train_counts), model.classifier.class_range, len(data.vocab),
                              params.train.max_title_len, model.dim, process.device)
        encode = title_encoder(data.vocab, params)
    # Every photo once, unaugmented, each rank its own shards (the training stream pads ranks to equal runs).
    images = ProductImages(data.train.class_index, params.train.image_size, encode_title=encode)
    mine = data.shards["train"][process.rank::process.world_size]
    stream = ShardStream(images, data.prepared, mine, params.evaluate.batch_size)
    loader = DataLoader(stream, batch_size=params.evaluate.batch_size, collate_fn=collate,
                        num_workers=params.train.workers)

    def features_of(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(process.device.type, dtype=torch.bfloat16, enabled=training.amp):
            return model.backbone(images)

    batches = ((b["image"], b["label"], b["tokens"]) for b in map(training.to_device, loader))
    sums, counts = class_feature_sums(features_of, batches, model.classifier.class_range, model.dim,
                                      process.device, training.group, words)
    found = torch.stack([counts.sum(), (counts == 0).sum()])
    if is_sharded(model):
        dist.all_reduce(found, group=training.group)
    title = f" plus {params.train.title_words_weight} x their title words" if words else ""
    say(process, f"classifier rows: the class means of {found[0]} training photos{title} ({found[1]} classes "
                 "without photos keep their trained rows)")
    attributes = words.attribute_rows(training.group) if words else None
    return class_mean_rows(trained, sums, counts, training.group, attributes, params.train.title_words_weight)


def write_outputs(training: TrainingSetup, data: TrainingData, history: list, out_dir: str) -> dict:
    """model.pt (Recognizer), text_encoder.pt (SICoT) and history.json; collective. Rank 0 writes, except a
    class-sharded W, which each rank writes itself (`classifier_shards`: their files, on rank 0)."""
    params, model = training.params, training.model
    model.eval()
    outputs = {"mode": params.train.mode, "model": storage.join(out_dir, "model.pt"),
               "checkpoint": storage.join(out_dir, "checkpoint.pt"),
               "history": storage.join(out_dir, "history.json"), "epochs": len(history),
               "val_top1": history[-1]["val_top1"] if history else None}
    if model.text_encoder is not None:
        outputs["text_encoder"] = storage.join(out_dir, "text_encoder.pt")
    arch = {"backbone": params.train.backbone, "feature_dim": model.dim}
    rows = exported_rows(training, data)
    if is_sharded(model) and model.classifier.world_size > 1:
        files = save_sharded(outputs["model"], model.backbone, rows, model.classifier.class_range[0], data.classes,
                             params.train.image_size, arch, model.classifier.group)
        outputs["classifier_shards"] = files[1:] if training.process.is_main else []
    elif training.process.is_main:  # one process holds all of W's rows
        Recognizer(model.backbone, rows.detach().cpu(), data.classes, params.train.image_size,
                   arch).save(outputs["model"])
    if training.process.is_main:
        if model.text_encoder is not None:
            save_text_encoder(model.text_encoder, params.train.text_encoder, data.vocab,
                              params.train.max_title_len, outputs["text_encoder"])
        storage.write_text(outputs["history"], json.dumps(history, indent=2))
    return outputs


def say(process: TrainingProcess, line: str) -> None:
    """One line of the training log, from rank 0."""
    if process.is_main:
        print(line, file=sys.stderr)


def train_in_group(params: Params, process: TrainingProcess, track: bool = True) -> dict:
    """Train `params.train.mode` as `process` of the joined group; returns where the outputs are."""
    group = dist.group.WORLD
    device = process.device
    if params.train.threads > 0:
        torch.set_num_threads(params.train.threads)
    if cuda_only := configure_backends(params, device):
        say(process, f"{', '.join(cuda_only)}: CUDA only, ignored on {device.type}")
    fused = params.train.fused_optimizer and fused_sgd_supported(device)
    if params.train.fused_optimizer and not fused:
        say(process, f"train.fused_optimizer: torch {torch.__version__} has no fused SGD for {device.type}; "
                     "ignored, its default SGD runs")
    # A resumed run takes every weight from its checkpoint.
    start = StartingPoint() if params.train.resume else load_starting_point(
        params.train.backbone_weights, params.train.backbone, params.train.feature_dim, params.paths.pretrained)
    seed_everything(params.train.seed)

    data = load_data(params)
    model = build_model(params, data, start, group).to(device)
    if params.train.channels_last:
        model.to(memory_format=torch.channels_last)  # the convolutions' weights; 2-d parameters keep theirs
    optimizer, scheduler = make_optimizer(params, model, fused)
    out_dir = storage.join(params.paths.models, params.train.mode)
    expected = fingerprint(params, model, data)
    sampler, loader, val_loader = make_loaders(params, data, process)
    training = TrainingSetup(params, process, group, model, wrap_streams(model, params, process), optimizer,
                             scheduler, sampler, loader, val_loader, log_prior_of(data, params, device))
    start_epoch, history, rng = 0, [], None
    if params.train.resume:
        start_epoch, history, rng = resume(training, out_dir, expected)
    else:
        say(process, start.describe(data.classes))
    # The RNG stream picks up where the checkpoint left it; a fresh run gives each rank its own
    # augmentation draws (the model init above is shared).
    if rng is not None:
        restore_rng(rng)
    else:
        torch.manual_seed(params.train.seed + process.rank)

    with (tracking.training_run(params) if process.is_main and track else contextlib.nullcontext()) as run:
        for epoch in range(start_epoch, params.train.epochs):
            sampler.set_epoch(epoch)
            model.start_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            stats = train_one_epoch(training, epoch)
            stats.update(epoch=epoch + 1, lr=lr, val_top1=evaluate(training))
            scheduler.step()
            history.append(stats)
            save_checkpoint(training, epoch + 1, history, expected, out_dir)
            say(process, f"{params.train.mode} epoch {epoch + 1}/{params.train.epochs}: loss {stats['loss']:.4f} "
                         f"train top-1 {stats['train_top1']:.3f} val top-1 {stats['val_top1']:.3f} "
                         f"({stats['images_per_s']:.0f} img/s)")
            if run is not None:
                tracking.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch + 1)
        outputs = write_outputs(training, data, history, out_dir)
        if run is not None:
            files = [outputs[key] for key in ("model", "text_encoder", "history") if key in outputs]
            files += outputs.get("classifier_shards", [])
            outputs["model_artifact"] = tracking.log_trained_model(files)
            outputs["run_id"] = run.info.run_id
    return outputs


def run_training(params: Params, track: bool = True) -> dict:
    """Train `params.train.mode` and return where its outputs are (`track=False`: no MLflow run)."""
    process = join_process_group(params.train.device)
    try:
        return train_in_group(params, process, track)
    finally:
        leave_process_group(process)
