"""The pipeline's run form (flows/form.py): built from sicot/config.py, and an untouched form changes nothing."""
from __future__ import annotations

import dataclasses

import pydantic
import pytest

from flows import form
from sicot.config import Params, load_params

MODELS = dict(zip(form.SECTIONS, (form.Data, form.Word2Vec, form.Pretrain, form.Train, form.Evaluate, form.Promote,
                                  form.Publish, form.Paths)))


@pytest.mark.parametrize("section", form.SECTIONS)
def test_each_section_offers_every_key_the_pipeline_does_not_set_itself(section):
    keys = {f.name for f in dataclasses.fields(getattr(Params(), section))}
    assert set(MODELS[section].model_fields) == keys - set(form.PIPELINE_SETS.get(section, ()))


def test_an_untouched_form_overrides_nothing():
    assert all(model.EMPTY.overrides() == [] for model in MODELS.values())
    assert all(model.EMPTY.model_dump() == {} for model in MODELS.values())  # the schema's default: {}


def test_filled_fields_arrive_with_their_types():
    filled = [form.Train(epochs=3, amp=False, fc="sharded", lr=0.05), form.Data(source="yes"),
              form.Publish(model_version="3"), form.Paths(models="s3://bucket/models")]
    params = load_params(None, [o for section in filled for o in section.overrides()])
    assert (params.train.epochs, params.train.amp, params.train.fc, params.train.lr) == (3, False, "sharded", 0.05)
    assert params.data.source == "yes" and params.publish.model_version == "3"  # strings stay strings
    assert params.paths.models == "s3://bucket/models"


def test_the_schema_carries_types_bounds_choices_and_help():
    properties = form.Train.model_json_schema()["properties"]
    assert properties["epochs"]["type"] == "integer" and properties["epochs"]["minimum"] == 1
    assert properties["epochs"]["description"]
    assert properties["lr"]["exclusiveMinimum"] == 0
    assert properties["fc"]["enum"] == ["auto", "sharded", "replicated"]
    assert properties["amp"] == {**properties["amp"], "enum": [True, False]} and "type" not in properties["amp"]
    assert all("null" not in str(p) and "default" not in p for p in properties.values())  # plain inputs, empty


@pytest.mark.parametrize("values, field", [({"epochs": 0}, "epochs"), ({"fc": "both"}, "fc"),
                                           ({"epoch": 3}, "epoch"), ({"lr": 0}, "lr")])
def test_a_bad_value_is_refused_naming_the_field(values, field):
    with pytest.raises(pydantic.ValidationError) as refused:
        form.Train(**values)
    assert field in str(refused.value)
