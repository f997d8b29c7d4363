"""The pipeline's params sections as pydantic models, so Prefect renders a typed, described run form and
refuses a bad value when the run is created, naming the field.

Each model is built from its dataclass in `sicot/config.py`: type, bounds (`ge`/`gt`/`le`), choices (an
enum) and help come from there and are written nowhere else.

Every field starts empty (unset; a section's default is `{}`): an untouched form changes nothing. The
run reads its params file (then `SICOT_<KEY>` for `paths.*`: a pod's ConfigMap) exactly as without a
form, and only the fields filled in override it, as `section.key=value` strings ahead of the run's
`overrides`, which therefore win. The form does not show the params file's values as defaults: that
file is read where the run executes (a pod's image, `params_file`), not where the deployment is made,
and a default the UI submits would override it (and the ConfigMap's paths) on every run.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_serializer
from pydantic.json_schema import SkipJsonSchema

from sicot.config import Params

# The sections a pipeline run reads; `serve` belongs to the recognition service.
SECTIONS = ("data", "word2vec", "pretrain", "train", "evaluate", "promote", "publish", "paths")
# Keys the pipeline sets itself: it trains both modes, resumes on a retry and builds every shard.
PIPELINE_SETS = {"train": ("mode", "resume"), "publish": ("shard",)}
# A boolean is offered as a choice, not a toggle: a toggle has no unset state, and the UI sends `false`.
KINDS = {"int": int, "float": float, "str": str, "bool": Annotated[bool, WithJsonSchema({"enum": [True, False]})]}


class Section(BaseModel):
    """One params section's fields as a run form fills them in: only the values set are overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    section: ClassVar[str]
    EMPTY: ClassVar[Section]  # the untouched form: a flow parameter's default

    @model_serializer(mode="wrap")
    def _set_only(self, serialize) -> dict[str, Any]:
        """Unset fields are left out, so the form's default for a section is `{}`."""
        return {key: value for key, value in serialize(self).items() if value is not None}

    def overrides(self) -> list[str]:
        """`section.key=value` for each field set; the value as JSON, which the YAML override parser
        reads back with its type (a string "3" stays a string)."""
        return [f"{self.section}.{key}={json.dumps(value)}"
                for key, value in self.model_dump().items()]


def section_model(name: str) -> type[Section]:
    section = next(f for f in dataclasses.fields(Params) if f.name == name).default_factory
    fields: dict[str, Any] = {}
    for f in (f for f in dataclasses.fields(section) if f.name not in PIPELINE_SETS.get(name, ())):
        rules = f.metadata
        kind = Literal[rules["choices"]] if rules.get("choices") else KINDS[f.type]
        # Unset is None in Python but absent from the schema: the UI shows a plain input, not a type switch.
        bounded = Annotated[kind, Field(ge=rules.get("ge"), gt=rules.get("gt"), le=rules.get("le"))]
        unset = Field(None, title=f.name, description=rules.get("help") or None, json_schema_extra=_no_default)
        fields[f.name] = (bounded | SkipJsonSchema[None], unset)
    # (a dataclass without a docstring gets its signature as one: not a description)
    doc = None if section.__doc__.startswith(f"{section.__name__}(") else section.__doc__
    model = create_model(section.__name__, __base__=Section, __doc__=doc, **fields)
    model.section, model.EMPTY = name, model()
    return model


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


Data, Word2Vec, Pretrain, Train, Evaluate, Promote, Publish, Paths = (section_model(name) for name in SECTIONS)
