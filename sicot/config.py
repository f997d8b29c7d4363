"""Typed parameters loaded from params.yaml, with `section.key=value` overrides.

params.yaml is the single source of configuration values. Every section maps to a dataclass below, so a
typo in a key or a value of the wrong type fails at load time with the dotted name, not deep inside a
step. Each key is defined here once, with its type, default, bounds and help (`opt`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file or override that does not match the schema."""


def opt(default: Any, *, help: str = "", ge: float | None = None, gt: float | None = None,
        le: float | None = None, choices: tuple[str, ...] | None = None, runtime: bool = False):
    """A params field: its default, what it means (`help`), and its bounds: `ge`/`le` inclusive, `gt`
    exclusive, or a fixed set of `choices`. `runtime` marks a key that changes how a step runs (devices,
    processes, kernels, memory layouts, inference batches), not what it computes: DVC stages need not
    re-run when it changes.

    This metadata is the schema: `--help`, params.yaml's comments and the README's table are written
    from it (sicot.config_docs), and forms read it through `dataclasses.fields`."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices,
                                            "runtime": runtime})


@dataclass
class Paths:
    """Where each step's inputs and outputs live: a local path or an s3:// URI. Each can also be set
    from the environment as SICOT_<KEY> (SICOT_PREPARED, SICOT_INDEX, ...: the Kubernetes ConfigMap)."""
    raw: str = opt("data/raw", help="where the synthetic demo world is generated (data.source: synthetic)")
    prepared: str = opt("data/prepared",
                        help="the validated dataset: records, images in WebDataset shards, labels.json")
    word2vec: str = opt("models/word2vec", help="word vectors: gensim model, vectors.npy, vocab.json")
    pretrained: str = opt("models/pretrained", help="the pretrain step's visual stream: backbone.pt, pretrain.json")
    models: str = opt("models", help="trained models: <models>/<mode>/ holds checkpoint, model.pt, history")
    reports: str = opt("reports", help="data_stats.json, <mode>/metrics.json, comparison.json/.md, plots")
    index: str = opt("index_store", help="root of the published product index (its versions and index/CURRENT)")
    dvc_remote: str = opt("", help="where data versions are pushed (folder or s3://); empty = local DVC cache only")

    def anchored(self, base: str | Path) -> Paths:
        """These locations with relative local paths made absolute against `base`, for a process that
        works in another directory."""
        def anchor(value: str) -> str:
            if not value or "://" in value or Path(value).is_absolute():
                return value
            return str(Path(base, value).resolve())
        return Paths(**{f.name: anchor(getattr(self, f.name)) for f in dataclasses.fields(self)})


ON_BAD_RECORD = ("error", "skip")  # also checked by sicot.data.manifest, a library entry point
WORLDS = ("packaged", "apparel")  # the generated worlds (sicot.data.worlds)
PRETRAINED = "pretrained"  # train.backbone_weights: the pretrain step's visual stream (components/pretrain_visual.py)


@dataclass
class Data:
    """The dataset: a directory in the contract's format, or the generated demo world (keys marked
    "demo world" shape it)."""
    source: str = opt("synthetic", help="`synthetic` (the demo world) or a dataset directory / s3:// prefix")
    world: str = opt("packaged", choices=WORLDS,
                     help="demo world: which one is generated: packaged (bottles, tubes, boxes and bags of "
                          "cosmetics, snacks, drinks) or apparel (flat-lay clothes, shoes, bags, caps with "
                          "Taobao-style unspaced titles)")
    image_prefixes: str = opt("", help="comma-separated s3:// prefixes records may name images under besides the "
                                      "dataset's own; any other location is refused (docs/security.md)")
    on_bad_record: str = opt("error", choices=ON_BAD_RECORD,
                             help="error: stop, listing every bad record; skip: drop them, listed in "
                                  "reports/dropped_records.jsonl")
    shard_images: int = opt(1000, ge=1, help="images per shard file of the prepared dataset (at most)")
    shard_mb: float = opt(100.0, gt=0, help="MB of images per shard file of the prepared dataset (at most, "
                                            "unless one image is larger)")
    seed: int = opt(0, ge=0, help="demo world: random seed; the same seed gives the same bytes")
    skus: int = opt(120, ge=2, help="demo world: number of SKUs (classes); scales to 100k+")
    brands: int = opt(12, ge=1, help="demo world: number of brands")
    categories: int = opt(8, ge=1, help="demo world: number of product categories")
    max_images: int = opt(100, ge=1, help="demo world: training images of the largest class")
    imbalance: float = opt(100.0, ge=1.0, help="demo world: training images of the largest class over the smallest's")
    profile: str = opt("exponential", choices=("exponential", "zipf"),
                       help="demo world: how class sizes fall from largest to smallest")
    val_per_class: int = opt(3, ge=0, help="demo world: validation images per class")
    test_per_class: int = opt(5, ge=1, help="demo world: test images per class (a class-balanced test set)")
    image_size: int = opt(64, ge=8, le=4096, help="demo world: side of the square images, in pixels")
    title_noise: float = opt(0.3, ge=0.0, le=1.0, help="demo world: share of promotional or irrelevant title words, "
                                                        "and how often a variant word is dropped or wrong")
    empty_title_rate: float = opt(0.05, ge=0.0, le=1.0, help="demo world: share of images with an empty title")
    holdout_skus: int = opt(0, ge=0, help="demo world: catalog-only SKUs with no training images (new arrivals)")


@dataclass
class Word2Vec:
    """Word vectors (gensim Word2Vec) trained on the training and catalog titles."""
    size: int = opt(64, ge=1, le=4096, help="dimension of a word vector")
    window: int = opt(5, ge=1, help="context window: words on each side that count as neighbours")
    min_count: int = opt(1, ge=1, help="words seen fewer times are left out of the vocabulary (too rare to learn "
                                       "a vector for): a title reads them as the unknown word")
    max_title_share: float = opt(1.0, gt=0.0, le=1.0, help="words in more than this share of the titles are "
                                                           "removed from every title, for word2vec and the title "
                                                           "encoder (too common to tell products apart, e.g. "
                                                           "包邮); 1.0 = keep all")
    epochs: int = opt(20, ge=1, help="passes over the titles")
    seed: int = opt(0, ge=0, help="random seed (one worker thread, so a run repeats exactly)")


@dataclass
class Pretrain:
    """The pretrain step (`train.backbone_weights: pretrained`): the visual stream trained beforehand on a demo world
    of other products, standing in for the checkpoint a catalogue starts from (last season's model, ImageNet at
    224 px). Its world is `data.world` with this section's seed and sizes, every product as many photos."""
    skus: int = opt(200, ge=2, help="products of the pretraining world")
    max_images: int = opt(30, ge=1, help="training photos of each product")
    epochs: int = opt(20, ge=1, help="training epochs (the rest of the recipe is the train section's)")
    lr: float = opt(0.05, gt=0.0, help="SGD learning rate of the first epoch")
    lr_gamma: float = opt(0.9, gt=0.0, le=1.0, help="learning rate factor after every epoch")
    seed: int = opt(1, ge=0, help="the pretraining world's data.seed: other brands and products than data.seed's; "
                                  "must differ from it")


@dataclass
class Train:
    """How a model is trained. The demo's params.yaml trains resnet18 at 32 px from the pretrain step's visual
    stream: the baseline and SICoT side by side in about 2 minutes on 2 CPU cores (~300 images/s each). The
    paper's GPU setup: backbone resnet50, image_size 224, feature_dim 2048, batch_size 256 (and data.image_size
    >= 224)."""
    mode: str = opt("sicot", choices=("baseline", "sicot"),
                    help="baseline: visual stream alone; sicot: trained with the titles, through the co-training "
                         "loss (cotrain_weight) and/or the classifier rows (classifier_rows: title_words)")
    backbone: str = opt("resnet18", help="torchvision ResNet from sicot.model.backbone's registry, e.g. resnet18, "
                                         "resnet50")
    backbone_weights: str = opt("", help="what the visual stream starts from: a torchvision weights name "
                                         "(IMAGENET1K_V1, DEFAULT; torch.hub's cache under $TORCH_HOME), a "
                                         "previous sicot model (models:/NAME@ALIAS, models:/NAME/VERSION, "
                                         "runs:/RUN_ID/model, a model.pt file/URI: also its classifier rows "
                                         "of shared SKUs), a torchvision state_dict file/URI, or `pretrained`: "
                                         "the pretrain step's visual stream (paths.pretrained); empty = random "
                                         "init")
    image_size: int = opt(64, ge=8, le=4096, help="input side in pixels, training and serving; images are "
                                                  "resized from data.image_size")
    feature_dim: int = opt(512, ge=1, help="visual feature size; a Linear+ReLU maps the backbone's width to it "
                                           "when they differ")
    text_encoder: str = opt("bilinear", help="title encoder from sicot.model.text_encoders' registry: bilinear "
                                             "word attention, or mean, bilstm, bilstm_attention for ablations")
    max_title_len: int = opt(32, ge=1, help="title words kept per image; the rest are cut")
    cotrain_weight: float = opt(2.0, ge=0.0, help="λ in CE(W·v) + λ·CE(W·max(v, s)): the co-training loss's "
                                                  "weight (docs/method.md); 0 = no title stream: the titles "
                                                  "enter only through classifier_rows: title_words")
    cotrain_rampup: int = opt(4, ge=0, help="epochs over which λ grows from 0 so the visual stream learns first; "
                                            "0 = the naive form, which loses to the baseline")
    logit_adjust_tau: float = opt(0.0, ge=0.0, help="τ of logit adjustment in the loss (Menon et al.: "
                                                    "logits + τ·log prior); 0 = off")
    classifier_rows: str = opt("trained", choices=("trained", "class_means", "title_words"),
                               help="the exported classifier's rows: the trained W; each class's mean "
                                    "normalised training feature (nearest class mean: every class counts the "
                                    "same whatever its photos); or those means plus what the class's title "
                                    "words look like, learnt from every photo whose title holds them "
                                    "(sicot.model.title_words; needs the word2vec vocabulary). One more pass "
                                    "over the training photos; docs/method.md")
    title_words_weight: float = opt(0.5, ge=0.0, help="title_words rows: the title words' part of a row, as "
                                                      "a share of the class mean's norm")
    epochs: int = opt(12, ge=1, help="training epochs")
    batch_size: int = opt(64, ge=1, help="training images per step in each process")
    lr: float = opt(0.1, gt=0.0, help="SGD learning rate of the first epoch")
    momentum: float = opt(0.9, ge=0.0, le=1.0, help="SGD momentum")
    weight_decay: float = opt(5e-4, ge=0.0, help="SGD weight decay")
    lr_gamma: float = opt(0.8, gt=0.0, le=1.0, help="learning rate factor after every epoch (the paper's step decay)")
    seed: int = opt(0, ge=0, help="random seed of initialisation, sampling and augmentation")
    device: str = opt("auto", choices=("auto", "cpu", "cuda"), runtime=True,
                      help="where training and evaluation run; auto = a GPU if there is one")
    amp: bool = opt(True, help="bf16 autocast on a GPU (no effect on the CPU)")
    compile: bool = opt(False, runtime=True, help="torch.compile the encoders: faster GPU steps after a warm-up")
    channels_last: bool = opt(True, runtime=True, help="channels-last memory layout for images and convolutions: "
                                                       "the layout GPU tensor cores run convolutions in")
    fused_optimizer: bool = opt(True, runtime=True, help="SGD's fused kernel where the installed torch has one for "
                                                         "the device (CPU, CUDA): no weight-decay temporary of W")
    tf32: bool = opt(True, help="TF32 tensor cores for float32 matmuls and convolutions on a CUDA GPU "
                                "(ignored on the CPU)")
    workers: int = opt(0, ge=0, runtime=True, help="DataLoader worker processes; 0 = load in the training process")
    cache_mb: int = opt(256, ge=0, runtime=True, help="MiB of decoded training and validation images kept in memory "
                                                      "at their stored size (shared out over the workers); the "
                                                      "others are decoded every epoch")
    shuffle_buffer: int = opt(1000, ge=1, help="training images each loading process shuffles among as it "
                                              "streams its shards (held as encoded bytes)")
    threads: int = opt(0, ge=0, runtime=True, help="CPU threads per training process, 0 = all "
                                               "(1 lets two trainings share 2 cores)")
    nproc: int = opt(1, ge=1, runtime=True, help="training processes (GPUs) per node; > 1 launches torchrun "
                                                 "(flows.train)")
    fc: str = opt("auto", choices=("auto", "sharded", "replicated"),
                  help="the classifier W: replicated on every rank or sharded by class over the ranks; "
                       "auto = sharded when there is more than one process")
    fc_chunk_rows: int = opt(0, ge=0, help="sharded W: batch rows per logit block (bounds memory, same "
                                           "results); 0 = all at once")
    fc_sample_rate: float = opt(1.0, gt=0.0, le=1.0, help="sharded W: share of classes kept per step "
                                                          "(Partial-FC sampling); 1 = all")
    fc_logits_dtype: str = opt("float32", choices=("float32", "bfloat16"),
                               help="precision of the classifier's logits, also under bf16 autocast; float32 "
                                    "with train.tf32 is as fast as bfloat16 and lighter at feature_dim 2048")
    resume: bool = opt(False, runtime=True, help="continue from the last epoch's checkpoint in "
                                                 "paths.models/<mode>/")


@dataclass
class Evaluate:
    """How the trained models are scored on the test split (also the head/tail split of the data report)."""
    head_threshold: int = opt(20, ge=1, help="head classes have at least this many training images, tail "
                                             "classes fewer")
    batch_size: int = opt(256, ge=1, runtime=True, help="images per inference batch (evaluation and validation)")
    max_classifier_mb: float = opt(4096.0, gt=0.0, runtime=True, help="MiB of the classifier W a scoring process "
                                   "holds at once; a larger W is scored from its files block by block (same top-k)")
    attention_samples: int = opt(20, ge=0, help="test titles shown in SICoT's word-attention view "
                                                "(attention.html)")
    class_means: bool = opt(True, help="also score the baseline with class-mean rows and show it in the "
                            "comparison: the strongest title-free baseline measured. Costs one forward pass over "
                            "the training photos (about a third of a training epoch) and a second [classes, d] "
                            "buffer; skipped for a W scored from its files")


@dataclass
class Promote:
    """Registration in the MLflow model registry, and the gate that moves the `champion` alias."""
    model_name: str = opt("sicot", help="registered model name")
    candidate: str = opt("sicot", choices=("baseline", "sicot"), help="which trained model is registered and gated")
    max_tail_drop: float = opt(0.02, ge=0.0, le=1.0, help="the gate's allowed drop of tail top-1 below the "
                                                         "champion's (overall top-1 must not drop at all)")


@dataclass
class Publish:
    """The product index: the catalog embedded by a registered model, published as a new version."""
    shards: int = opt(2, ge=1, help="catalog shards, each built by its own task or GPU pod")
    shard: int = opt(-1, ge=-1, help="-1: build every shard here, then publish; k >= 0: build shard k only")
    model_version: str = opt("", help="registered version to index; empty = the current champion")
    keep_versions: int = opt(3, ge=1, help="published versions kept for rollback (CURRENT's history)")
    gc_grace_hours: float = opt(24.0, ge=0.0, help="unpublished versions (a losing publisher's) are deleted "
                                                   "once idle this long")
    batch_size: int = opt(128, ge=1, help="catalog images embedded per batch")


@dataclass
class Serve:
    """The recognition service (sicot.serving): its answers and the limits it enforces (docs/security.md)."""
    top_k: int = opt(3, ge=1, help="matches returned per image")
    min_score: float = opt(0.2, ge=0.0, le=1.0, help="below this best-match score the answer is no_match rather "
                                                     "than a wrong product")
    max_images: int = opt(64, ge=1, help="images per request")
    max_pixels: int = opt(16_000_000, ge=1, help="pixels per image, read from its header before decoding "
                                                 "(decompression bombs)")
    min_similarity: float = opt(0.5, ge=-1.0, le=1.0, help="cosine similarity from which a new-arrival SKU "
                                                           "(no class yet) is suggested")
    max_request_pixels: int = opt(64_000_000, ge=1, help="pixels of all images of one request together, checked "
                                                         "before any is decoded")
    max_request_bytes: int = opt(32 * 1024 * 1024, ge=1, help="request body limit in bytes, refused before the "
                                                              "body is read")
    max_decodes: int = opt(2, ge=1, help="images decoded at once per worker: bounds a worker's decode memory")
    max_batch: int = opt(32, ge=1, help="images of concurrent requests run through the model in one forward pass "
                                        "per worker: bounds a worker's forward-pass memory")
    max_classifier_mb: float = opt(4096.0, gt=0.0, help="MiB of the classifier W a worker holds at once; a larger W "
                                                        "is scored from its files block by block (same answers)")
    max_wait_ms: float = opt(2.0, ge=0.0, help="milliseconds an idle worker waits for more requests to join a "
                                               "batch before running it; 0 = run what is waiting at once")
    formats: str = opt("JPEG,PNG,WEBP", help="comma-separated image formats accepted from the network; others "
                                             "are refused unparsed")
    index_refresh_s: float = opt(30.0, ge=0.0, help="seconds between looks at index/CURRENT for a newer "
                                                    "version; 0 = never")


@dataclass
class Params:
    paths: Paths = field(default_factory=Paths)
    data: Data = field(default_factory=Data)
    word2vec: Word2Vec = field(default_factory=Word2Vec)
    pretrain: Pretrain = field(default_factory=Pretrain)
    train: Train = field(default_factory=Train)
    evaluate: Evaluate = field(default_factory=Evaluate)
    promote: Promote = field(default_factory=Promote)
    publish: Publish = field(default_factory=Publish)
    serve: Serve = field(default_factory=Serve)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        # Through __dict__ rather than attributes: logging or copying params is not reading them (recording_reads).
        return {f.name: dict(vars(getattr(self, f.name))) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, sections: dict[str, dict[str, Any]]) -> Params:
        """The inverse of `to_dict`, validated like a params file."""
        params = cls()
        for section, values in sections.items():
            for key, value in values.items():
                _apply(params, section, key, value)
        _check_together(params)
        return params

    def flat(self, *sections: str) -> dict[str, Any]:
        """`{"train.lr": 0.1, ...}` for the given sections (all when none), e.g. for MLflow params."""
        out = {}
        for name, values in self.to_dict().items():
            if not sections or name in sections:
                out.update({f"{name}.{k}": v for k, v in values.items()})
        return out


def runtime(section: str, key: str) -> bool:
    """Whether `section.key` only changes how a step runs (`opt(..., runtime=True)`), not what it computes."""
    kind = type(getattr(Params(), section))
    return next(f for f in dataclasses.fields(kind) if f.name == key).metadata["runtime"]


@contextlib.contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Inside, every key read from any params object adds `section.key` to the yielded set: what a step
    really depends on, checked against its DVC stage (tests/test_dvc.py). `to_dict` and `flat` (logging,
    copying) do not count as reads."""
    reads: set[str] = set()
    sections = {type(getattr(Params(), f.name)): f.name for f in dataclasses.fields(Params)}
    keys = {kind: {f.name for f in dataclasses.fields(kind)} for kind in sections}

    def recorded(self, name: str) -> Any:
        if name in keys[type(self)]:
            reads.add(f"{sections[type(self)]}.{name}")
        return object.__getattribute__(self, name)

    for kind in sections:
        kind.__getattribute__ = recorded
    try:
        yield reads
    finally:
        for kind in sections:
            del kind.__getattribute__


def _coerce(dotted: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: expected true/false, got {value!r}")
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{dotted}: expected float, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and value is None:
        return ""
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `--set publish.model_version=3` means the string "3"
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{dotted}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{dotted}: expected a finite number, got {value!r}")
    return value


def _check_bounds(dotted: str, value: Any, rules: Mapping[str, Any]) -> None:
    if rules.get("choices") and value not in rules["choices"]:
        raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(rules['choices'])}")
    for rule, ok, words in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<=")):
        bound = rules.get(rule)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{dotted}: {value!r} is out of range; it must be {words} {bound}")


def _apply(params: Params, section: str, key: str, value: Any) -> None:
    dotted = f"{section}.{key}"
    if section not in {f.name for f in dataclasses.fields(Params)}:
        raise ConfigError(f"{dotted}: unknown section {section!r}")
    target = getattr(params, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise ConfigError(f"{dotted}: unknown key (known: {', '.join(sorted(fields))})")
    kind = {"int": int, "float": float, "str": str, "bool": bool}[fields[key].type]
    value = _coerce(dotted, value, kind)
    _check_bounds(dotted, value, fields[key].metadata)
    setattr(target, key, value)


def _check_together(params: Params) -> None:
    """Rules that tie two keys together."""
    if params.publish.shard >= params.publish.shards:
        raise ConfigError(f"publish.shard: {params.publish.shard} is out of range; "
                          f"it must be -1 or below publish.shards ({params.publish.shards})")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`train.lr=0.05` -> ("train", "lr", 0.05); the value is read as YAML so types come out right."""
    dotted, sep, raw = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return section, key, value


def load_params(path: str | Path | None = None, overrides: Iterable[str] = (),
                environ: Mapping[str, str] = os.environ) -> Params:
    """Defaults, then the file (when given: it must exist), then SICOT_<KEY> variables of `environ` for
    `paths.*`, then the overrides, each validated."""
    params = Params()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: params file not found")
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                try:
                    _apply(params, section, key, value)
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
    for key in (f.name for f in dataclasses.fields(Paths)):  # params file < environment < --set
        if value := environ.get(f"SICOT_{key.upper()}"):
            _apply(params, "paths", key, value)
    for text in overrides:
        _apply(params, *parse_override(text))
    _check_together(params)
    return params


def local_params_file() -> str | None:
    """`params.yaml` in the working directory when there is one: what a step reads unless told otherwise
    (a step also runs from an empty directory, on the defaults)."""
    return "params.yaml" if Path("params.yaml").is_file() else None
