import pytest

from sicot.config import ConfigError, load_params, parse_override


def test_defaults_match_params_yaml():
    from_file = load_params("params.yaml")
    assert from_file.train.mode == "sicot"
    assert from_file.evaluate.head_threshold == 20
    assert from_file.paths.prepared == "data/prepared"


def test_override_types():
    p = load_params("params.yaml", ["train.lr=0.05", "train.mode=baseline", "train.amp=false", "data.imbalance=50"])
    assert p.train.lr == 0.05 and p.train.mode == "baseline" and p.train.amp is False
    assert p.data.imbalance == 50.0 and isinstance(p.data.imbalance, float)


@pytest.mark.parametrize("text, message", [
    ("train.lr", "expected section.key=value"),
    ("train=1", "expected section.key=value"),
    ("nosuch.key=1", "unknown section"),
    ("train.nosuch=1", "train.nosuch: unknown key"),
    ("train.epochs=abc", "train.epochs: expected int"),
    ("train.amp=1", "train.amp: expected true/false"),
    ("train.mode=other", "train.mode: 'other' is not one of baseline, sicot"),
])
def test_bad_overrides_name_the_field(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_params("params.yaml", [text])


def test_bad_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_parse_override_reads_yaml_values():
    assert parse_override("data.source=s3://b/x") == ("data", "source", "s3://b/x")
    assert parse_override("train.epochs=3") == ("train", "epochs", 3)
