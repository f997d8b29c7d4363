"""Data versions: DVC hashes a step's output, later steps read exactly that version in place."""
import json
import subprocess
import sys

import pytest

from components.version_data import VersionError, version
from sicot import storage
from sicot.data.manifest import load_manifest
from sicot.data.prepared import load_prepared, write_prepared
from sicot.data.shards import split_images
from tests.test_manifest import make_dataset


def test_a_version_is_dvc_s_hash_and_reads_back_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = tmp_path / "prepared"
    write_prepared(load_manifest(str(make_dataset(tmp_path / "ds"))), prepared)
    result = version(str(prepared), remote=str(tmp_path / "remote"))

    # the same md5 `dvc add` gives the directory in a project of its own
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "prepared"], cwd=tmp_path, check=True)
    assert f"md5: {result['md5']}" in (tmp_path / "prepared.dvc").read_text()

    tree = result["uri"]
    assert tree.startswith(str(tmp_path / "remote" / "files" / "md5")) and storage.is_dvc_tree(tree)
    again, local = load_prepared(tree), load_prepared(str(prepared))
    assert again.train == local.train and again.shards == local.shards
    assert list(split_images(tree, again.shards["train"])) == list(split_images(str(prepared), local.shards["train"]))
    assert "labels.json" in storage.list_children(tree)
    with pytest.raises(storage.StorageError, match="immutable"):
        storage.write_text(storage.join(tree, "labels.json"), "{}")
    with pytest.raises(FileNotFoundError, match="no file 'nope.jsonl'"):
        storage.read_bytes(storage.join(tree, "nope.jsonl"))


@pytest.mark.services
def test_a_version_pushed_to_s3_is_read_from_s3_by_a_process_with_nothing_local(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = tmp_path / "prepared"
    write_prepared(load_manifest(str(make_dataset(tmp_path / "ds"))), prepared)
    result = version(str(prepared), remote=f"{s3_bucket}/dvc")
    assert result["uri"].startswith(f"{s3_bucket}/dvc/files/md5/")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys; from sicot.data.prepared import load_prepared; from sicot.data.shards import split_images; "
            "m = load_prepared(sys.argv[1]); images = list(split_images(m.root, m.shards['train'])); "
            "print(len(m.train), len(images), sum(map(len, (d for _, _, d in images))), m.classes())")
    out = subprocess.run([sys.executable, "-c", code, result["uri"]], cwd=elsewhere, capture_output=True,
                         text=True, check=True).stdout
    local = load_prepared(str(prepared))
    size = sum(len(d) for _, _, d in split_images(str(prepared), local.shards["train"]))
    assert out.strip() == f"9 9 {size} {json.dumps(['SKU-A', 'SKU-B', 'SKU-C'])}".replace('"', "'")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.services
def test_a_push_the_store_refuses_names_the_cause(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = tmp_path / "prepared"
    write_prepared(load_manifest(str(make_dataset(tmp_path / "ds"))), prepared)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(VersionError, match=r"dvc push failed \(exit \d+\): ERROR: .*Forbidden"):
        version(str(prepared), remote=f"{s3_bucket}/dvc")
