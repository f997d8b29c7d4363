"""Typed parameters loaded from params.yaml, with `section.key=value` overrides.

params.yaml is the single source of configuration. Every section maps to a dataclass below, so a typo
in a key or a value of the wrong type fails at load time with the dotted name, not deep inside a step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A params file or override that does not match the schema."""


@dataclass
class Paths:
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    word2vec: str = "models/word2vec"
    models: str = "models"
    reports: str = "reports"
    index: str = "index_store"


@dataclass
class Data:
    source: str = "synthetic"
    on_bad_record: str = "error"
    seed: int = 0
    skus: int = 120
    brands: int = 12
    categories: int = 8
    max_images: int = 100
    imbalance: float = 100.0
    profile: str = "exponential"
    val_per_class: int = 3
    test_per_class: int = 5
    image_size: int = 64
    title_noise: float = 0.3
    empty_title_rate: float = 0.05
    holdout_skus: int = 0


@dataclass
class Word2Vec:
    size: int = 64
    window: int = 5
    min_count: int = 1
    epochs: int = 20
    seed: int = 0


@dataclass
class Train:
    mode: str = "sicot"
    backbone: str = "resnet18"
    backbone_weights: str = ""
    image_size: int = 64
    feature_dim: int = 512
    text_encoder: str = "bilinear"
    max_title_len: int = 32
    cotrain_weight: float = 2.0
    cotrain_rampup: int = 4
    logit_adjust_tau: float = 0.0
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_gamma: float = 0.8
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    workers: int = 0
    threads: int = 0
    nproc: int = 1
    fc: str = "auto"
    fc_chunk_rows: int = 0
    fc_sample_rate: float = 1.0
    resume: bool = False


@dataclass
class Evaluate:
    head_threshold: int = 20
    batch_size: int = 256
    attention_samples: int = 20


@dataclass
class Promote:
    model_name: str = "sicot"
    candidate: str = "sicot"
    max_tail_drop: float = 0.02


@dataclass
class Publish:
    shards: int = 2
    shard: int = -1
    model_version: str = ""
    keep_versions: int = 3
    batch_size: int = 128


@dataclass
class Serve:
    top_k: int = 3
    min_score: float = 0.2
    max_images: int = 64
    max_pixels: int = 16_000_000
    min_similarity: float = 0.5


CHOICES = {
    "data.on_bad_record": ("error", "skip"),
    "data.profile": ("exponential", "zipf"),
    "train.mode": ("baseline", "sicot"),
    "promote.candidate": ("baseline", "sicot"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.fc": ("auto", "sharded", "replicated"),
}


@dataclass
class Params:
    paths: Paths = field(default_factory=Paths)
    data: Data = field(default_factory=Data)
    word2vec: Word2Vec = field(default_factory=Word2Vec)
    train: Train = field(default_factory=Train)
    evaluate: Evaluate = field(default_factory=Evaluate)
    promote: Promote = field(default_factory=Promote)
    publish: Publish = field(default_factory=Publish)
    serve: Serve = field(default_factory=Serve)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, sections: dict[str, dict[str, Any]]) -> "Params":
        """The inverse of `to_dict`, validated like a params file."""
        params = cls()
        for section, values in sections.items():
            for key, value in values.items():
                _apply(params, section, key, value)
        return params

    def flat(self, *sections: str) -> dict[str, Any]:
        """`{"train.lr": 0.1, ...}` for the given sections (all when none), e.g. for MLflow params."""
        out = {}
        for name, values in self.to_dict().items():
            if not sections or name in sections:
                out.update({f"{name}.{k}": v for k, v in values.items()})
        return out


def _coerce(dotted: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: expected true/false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and value is None:
        return ""
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `--set publish.model_version=3` means the string "3"
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{dotted}: expected {kind.__name__}, got {value!r}")
    return value


def _apply(params: Params, section: str, key: str, value: Any) -> None:
    dotted = f"{section}.{key}"
    if section not in {f.name for f in dataclasses.fields(Params)}:
        raise ConfigError(f"{dotted}: unknown section {section!r}")
    target = getattr(params, section)
    types = {f.name: f.type for f in dataclasses.fields(target)}
    if key not in types:
        raise ConfigError(f"{dotted}: unknown key (known: {', '.join(sorted(types))})")
    kind = {"int": int, "float": float, "str": str, "bool": bool}[types[key]]
    value = _coerce(dotted, value, kind)
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(CHOICES[dotted])}")
    setattr(target, key, value)


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


def load_params(path: str | Path | None = "params.yaml", overrides: Iterable[str] = ()) -> Params:
    """Defaults, then the file (if given and present), then the overrides, each validated."""
    params = Params()
    if path is not None and Path(path).exists():
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
                _apply(params, section, key, value)
    elif path is not None and Path(path).name != "params.yaml":
        raise ConfigError(f"{path}: params file not found")
    for text in overrides:
        _apply(params, *parse_override(text))
    return params
