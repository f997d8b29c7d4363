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
    ("train.batch_size=0", "train.batch_size: 0 is out of range; it must be >= 1"),
    ("train.epochs=-1", "train.epochs: -1 is out of range; it must be >= 1"),
    ("train.lr=0", "train.lr: 0.0 is out of range; it must be > 0"),
    ("train.lr=nan", "train.lr: expected a finite number"),
    ("train.lr=fast", "train.lr: expected float, got 'fast'"),
    ("publish.shards=0", "publish.shards: 0 is out of range; it must be >= 1"),
    ("publish.shard=2", "publish.shard: 2 is out of range; it must be -1 or below publish.shards"),
    ("serve.max_images=0", "serve.max_images: 0 is out of range"),
    ("serve.max_pixels=-1", "serve.max_pixels: -1 is out of range"),
    ("data.skus=-5", "data.skus: -5 is out of range; it must be >= 2"),
    ("data.title_noise=1.5", "data.title_noise: 1.5 is out of range; it must be <= 1"),
    ("train.fc_sample_rate=0", "train.fc_sample_rate: 0.0 is out of range; it must be > 0"),
])
def test_bad_overrides_name_the_field(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_params("params.yaml", [text])


def test_every_numeric_key_has_a_bound():
    import dataclasses

    from sicot.config import Params

    unbounded = [f"{section.name}.{key.name}" for section in dataclasses.fields(Params)
                 for key in dataclasses.fields(getattr(Params(), section.name))
                 if key.type in ("int", "float") and not any(key.metadata.get(b) is not None for b in ("ge", "gt"))]
    assert unbounded == []


def test_float_strings_are_floats():
    assert load_params(None, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert load_params(None, ["train.weight_decay=5E-4"]).train.weight_decay == 0.0005


def test_out_of_range_in_a_file_names_file_and_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: train\.batch_size: 0 is out of range"):
        load_params(bad)


def test_an_explicit_params_file_must_exist(tmp_path, monkeypatch, capsys):
    from components import cli

    with pytest.raises(ConfigError, match="params.yaml: params file not found"):
        load_params(tmp_path / "x" / "params.yaml")  # named like the default: still an error
    monkeypatch.chdir(tmp_path)  # an empty directory: the step runs on the defaults
    cli.main(lambda params: {"epochs": params.train.epochs}, "test", [])
    assert '"epochs": 12' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(lambda params: {}, "test", ["--params", str(tmp_path / "missing" / "params.yaml")])
    assert "params file not found" in capsys.readouterr().err


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


def test_locations_come_from_file_then_environment_then_set(monkeypatch):
    assert load_params("params.yaml").paths.index == "index_store"
    monkeypatch.setenv("SICOT_INDEX", "s3://bucket/index_store")
    monkeypatch.setenv("SICOT_PREPARED", "s3://bucket/data/prepared")
    params = load_params("params.yaml", ["paths.prepared=/elsewhere"])
    assert params.paths.index == "s3://bucket/index_store" and params.paths.prepared == "/elsewhere"
