"""Typed parameters loaded from params.yaml, with `section.key=value` overrides.

params.yaml is the single source of configuration. Every section maps to a dataclass below, so a typo
in a key or a value of the wrong type fails at load time with the dotted name, not deep inside a step.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


class ConfigError(ValueError):
    """A params file or override that does not match the schema."""


def opt(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        choices: tuple[str, ...] | None = None):
    """A params field with its bounds: `ge`/`le` inclusive, `gt` exclusive, or a fixed set of `choices`."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "choices": choices})


@dataclass
class Paths:
    """Where each step's inputs and outputs live: a local path or an s3:// URI. Each can also be set
    from the environment as SICOT_<KEY> (SICOT_PREPARED, SICOT_INDEX, ...: the Kubernetes ConfigMap)."""
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    word2vec: str = "models/word2vec"
    models: str = "models"
    reports: str = "reports"
    index: str = "index_store"
    dvc_remote: str = ""

    def anchored(self, base: str | Path) -> "Paths":
        """These locations with relative local paths made absolute against `base`, for a process that
        works in another directory."""
        def anchor(value: str) -> str:
            return value if not value or "://" in value or Path(value).is_absolute() else str(Path(base, value).resolve())
        return Paths(**{f.name: anchor(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass
class Data:
    source: str = "synthetic"
    image_prefixes: str = ""
    on_bad_record: str = opt("error", choices=("error", "skip"))
    seed: int = opt(0, ge=0)
    skus: int = opt(120, ge=2)
    brands: int = opt(12, ge=1)
    categories: int = opt(8, ge=1)
    max_images: int = opt(100, ge=1)
    imbalance: float = opt(100.0, ge=1.0)
    profile: str = opt("exponential", choices=("exponential", "zipf"))
    val_per_class: int = opt(3, ge=0)
    test_per_class: int = opt(5, ge=1)
    image_size: int = opt(64, ge=8, le=4096)
    title_noise: float = opt(0.3, ge=0.0, le=1.0)
    empty_title_rate: float = opt(0.05, ge=0.0, le=1.0)
    holdout_skus: int = opt(0, ge=0)


@dataclass
class Word2Vec:
    size: int = opt(64, ge=1, le=4096)
    window: int = opt(5, ge=1)
    min_count: int = opt(1, ge=1)
    epochs: int = opt(20, ge=1)
    seed: int = opt(0, ge=0)


@dataclass
class Train:
    mode: str = opt("sicot", choices=("baseline", "sicot"))
    backbone: str = "resnet18"
    backbone_weights: str = ""
    image_size: int = opt(64, ge=8, le=4096)
    feature_dim: int = opt(512, ge=1)
    text_encoder: str = "bilinear"
    max_title_len: int = opt(32, ge=1)
    cotrain_weight: float = opt(2.0, ge=0.0)
    cotrain_rampup: int = opt(4, ge=0)
    logit_adjust_tau: float = opt(0.0, ge=0.0)
    epochs: int = opt(12, ge=1)
    batch_size: int = opt(64, ge=1)
    lr: float = opt(0.1, gt=0.0)
    momentum: float = opt(0.9, ge=0.0, le=1.0)
    weight_decay: float = opt(5e-4, ge=0.0)
    lr_gamma: float = opt(0.8, gt=0.0, le=1.0)
    seed: int = opt(0, ge=0)
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    amp: bool = True
    compile: bool = False
    workers: int = opt(0, ge=0)
    threads: int = opt(0, ge=0)
    nproc: int = opt(1, ge=1)
    fc: str = opt("auto", choices=("auto", "sharded", "replicated"))
    fc_chunk_rows: int = opt(0, ge=0)
    fc_sample_rate: float = opt(1.0, gt=0.0, le=1.0)
    resume: bool = False


@dataclass
class Evaluate:
    head_threshold: int = opt(20, ge=1)
    batch_size: int = opt(256, ge=1)
    attention_samples: int = opt(20, ge=0)


@dataclass
class Promote:
    model_name: str = "sicot"
    candidate: str = opt("sicot", choices=("baseline", "sicot"))
    max_tail_drop: float = opt(0.02, ge=0.0, le=1.0)


@dataclass
class Publish:
    shards: int = opt(2, ge=1)
    shard: int = opt(-1, ge=-1)
    model_version: str = ""
    keep_versions: int = opt(3, ge=1)
    gc_grace_hours: float = opt(24.0, ge=0.0)
    batch_size: int = opt(128, ge=1)


@dataclass
class Serve:
    top_k: int = opt(3, ge=1)
    min_score: float = opt(0.2, ge=0.0, le=1.0)
    max_images: int = opt(64, ge=1)
    max_pixels: int = opt(16_000_000, ge=1)
    min_similarity: float = opt(0.5, ge=-1.0, le=1.0)
    max_request_pixels: int = opt(64_000_000, ge=1)
    max_request_bytes: int = opt(32 * 1024 * 1024, ge=1)
    max_decodes: int = opt(2, ge=1)
    formats: str = "JPEG,PNG,WEBP"
    index_refresh_s: float = opt(30.0, ge=0.0)


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
        _check_together(params)
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


def load_params(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Params:
    """Defaults, then the file (when given: it must exist), then SICOT_<KEY> environment variables for
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
        if value := os.environ.get(f"SICOT_{key.upper()}"):
            _apply(params, "paths", key, value)
    for text in overrides:
        _apply(params, *parse_override(text))
    _check_together(params)
    return params


def local_params_file() -> str | None:
    """`params.yaml` in the working directory when there is one: what a step reads unless told otherwise
    (a step also runs from an empty directory, on the defaults)."""
    return "params.yaml" if Path("params.yaml").is_file() else None
