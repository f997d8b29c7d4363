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


def test_every_key_has_help_and_every_section_a_docstring():
    import dataclasses

    from sicot.config_docs import sections

    undocumented = [name for name, kind in sections() if kind.__doc__.startswith(f"{kind.__name__}(")]
    undocumented += [f"{name}.{key.name}" for name, kind in sections() for key in dataclasses.fields(kind)
                     if not key.metadata.get("help", "").strip()]
    assert undocumented == []


def test_params_yaml_and_readme_table_are_generated_from_the_schema():
    from pathlib import Path

    from sicot.config_docs import generated

    root = Path(__file__).resolve().parents[1]
    for path, text in generated(root / "params.yaml", root / "README.md").items():
        assert path.read_text(encoding="utf-8") == text, \
            f"{path.name} is out of date: run `python -m sicot.config_docs --write`"


def test_writing_params_yaml_keeps_its_values(tmp_path, monkeypatch, capsys):
    from sicot import config_docs

    params, readme = tmp_path / "params.yaml", tmp_path / "README.md"
    params.write_text("train:\n  lr: 0.05\n  mode: baseline\n")
    readme.write_text(f"# x\n{config_docs.README_BEGIN}\nold table\n{config_docs.README_END}\nrest\n")
    monkeypatch.setenv("SICOT_INDEX", "s3://elsewhere/index")  # the environment is not the file's value
    args = ["--params", str(params), "--readme", str(readme)]
    assert config_docs.main(["--check", *args]) == 1
    assert "params.yaml: out of date" in capsys.readouterr().err
    assert config_docs.main(["--write", *args]) == 0 and config_docs.main(["--check", *args]) == 0
    written = load_params(params, environ={})
    assert (written.train.lr, written.train.mode, written.paths.index) == (0.05, "baseline", "index_store")
    text = params.read_text()
    assert "  on_bad_record: error          # [error | skip] error: stop, listing every bad record" in text
    assert "| `train.lr` | float | `0.1` | > 0 | SGD learning rate of the first epoch |" in readme.read_text()
    assert readme.read_text().endswith(f"{config_docs.README_END}\nrest\n") and "old table" not in readme.read_text()


def test_readme_without_markers_is_an_error(tmp_path):
    from sicot import config_docs

    (tmp_path / "README.md").write_text("# no table\n")
    with pytest.raises(ConfigError, match=r"README\.md: no settings table markers"):
        config_docs.generated(tmp_path / "params.yaml", tmp_path / "README.md")


def test_allowed_values_read_as_written():
    import dataclasses

    from sicot.config import Data, Promote, Train
    from sicot.config_docs import allowed

    key = {f"{kind.__name__}.{f.name}": f for kind in (Data, Promote, Train) for f in dataclasses.fields(kind)}
    assert allowed(key["Train.mode"]) == "baseline | sicot"
    assert allowed(key["Train.lr"]) == "> 0"
    assert allowed(key["Train.fc_sample_rate"]) == "(0, 1]"
    assert allowed(key["Data.title_noise"]) == "[0, 1]"
    assert allowed(key["Train.epochs"]) == ">= 1"
    assert allowed(key["Data.source"]) == ""


def test_step_help_lists_the_keys_of_its_sections(capsys):
    from components import train_model

    with pytest.raises(SystemExit):
        train_model.main(["--help"])
    text = capsys.readouterr().out
    assert "  train.cotrain_rampup  int, default 4, >= 0\n" in text
    assert "epochs over which λ grows from 0" in text
    assert "  train.mode  str, default sicot, baseline | sicot\n" in text
    assert "evaluate.batch_size" in text and "data.skus" not in text  # training reads no data.* key


def test_recording_reads_sees_reads_not_logging():
    from sicot.config import Train, recording_reads

    params = load_params(None)
    with recording_reads() as reads:
        params.train.lr, params.data.seed, params.paths.anchored("/elsewhere")
        params.flat(), params.to_dict()
    assert reads - {f"paths.{key}" for key in params.to_dict()["paths"]} == {"train.lr", "data.seed"}
    assert "__getattribute__" not in vars(Train)  # recording ends with the block


def test_a_step_records_what_it_read_and_imported(tmp_path, monkeypatch):
    import json

    from components import cli

    record = tmp_path / "reads.jsonl"
    monkeypatch.setenv(cli.RECORD_READS, str(record))
    monkeypatch.setenv("DVC_STAGE", "train_sicot")
    cli.main(lambda params: {"lr": params.train.lr}, "test", [], sections=("train",))
    cli.main(lambda params: {"seed": params.word2vec.seed}, "test", [], sections=("word2vec",))
    first, second = (json.loads(line) for line in record.read_text().splitlines())
    assert (first["stage"], first["sections"], first["keys"]) == ("train_sicot", ["train"], ["train.lr"])
    assert {"components/cli.py", "sicot/config.py"} <= set(first["modules"])
    assert second["keys"] == ["word2vec.seed"]
