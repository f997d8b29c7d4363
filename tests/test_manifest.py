"""The dataset contract on hand-made datasets: what is accepted, and every kind of bad record."""
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sicot.data.manifest import DatasetError, Problem, Record, load_manifest
from sicot.data.prepared import load_prepared, write_prepared
from sicot.data.shards import split_images

SKUS = ["SKU-A", "SKU-B", "SKU-C"]
LONG_TITLE = "超长标题" * 2500  # 10,000 characters: valid, the model truncates


def png(color=(200, 30, 30), size=8, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def make_dataset(root: Path, per_class=(4, 3, 2)) -> Path:
    """A small valid dataset written by hand (not by the generator): 3 SKUs, PNG and JPEG images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images" / "cat").mkdir(parents=True)
    splits = {"train": [], "val": [], "test": []}
    for c, (sku, n) in enumerate(zip(SKUS, per_class)):
        color = (60 * c + 40, 200 - 50 * c, 90)
        for split, count in (("train", n), ("val", 1), ("test", 1)):
            for k in range(count):
                name = f"images/{split}_{sku}_{k}." + ("jpg" if k % 2 else "png")
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), color).save(buf, format="JPEG" if k % 2 else "PNG")
                (root / name).write_bytes(buf.getvalue())
                title = LONG_TITLE if (sku, split, k) == ("SKU-A", "train", 0) else f"{sku} 精华液 50ml 包邮 {k}"
                splits[split].append({"image": name, "sku": sku, "title": title, "tags": ["护肤"]})
        (root / "images" / "cat" / f"{sku}.png").write_bytes(png(color))
    splits["train"][1]["title"] = ""  # titles may be empty
    del splits["train"][2]["tags"]  # tags are optional
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text(jsonl(rows), encoding="utf-8")
    catalog = [{"sku": s, "title": f"{s} 精华液", "tags": ["护肤"], "image": f"images/cat/{s}.png"} for s in SKUS]
    catalog.append({"sku": "SKU-NEW", "title": "新品", "tags": []})  # catalog-only SKU, no image yet
    (root / "catalog.jsonl").write_text(jsonl(catalog), encoding="utf-8")
    return root


def append(root: Path, file: str, line: bytes | str) -> int:
    """Append one raw line to `file`; returns its 1-based line number."""
    path = root / file
    data = path.read_bytes()
    path.write_bytes(data + (line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return data.count(b"\n") + 1


def rec(image="images/train_SKU-A_0.png", sku="SKU-A", title="t", **extra) -> str:
    return json.dumps({"image": image, "sku": sku, "title": title, **extra}, ensure_ascii=False)


def _write(root: Path, name: str, data: bytes) -> str:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
    return name


def _outside_link(root: Path) -> str:
    outside = root.parent / "outside.png"
    outside.write_bytes(png())
    os.symlink(outside, root / "images" / "link.png")
    return "images/link.png"


def _truncated(root: Path) -> str:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    return _write(root, "images/truncated.png", buf.getvalue()[: len(buf.getvalue()) // 2])


# (case id, file, function(root) -> the raw line to append, expected words of the reason)
BAD_CASES = [
    ("invalid_json", "train.jsonl", lambda r: '{"image": "images/x.png", "sku": ', "invalid JSON"),
    ("not_an_object", "train.jsonl", lambda r: '["images/x.png", "SKU-A"]', "expected a JSON object, got array"),
    ("missing_sku", "train.jsonl", lambda r: json.dumps({"image": "images/train_SKU-A_0.png", "title": "t"}),
     "missing field 'sku'"),
    ("empty_sku", "train.jsonl", lambda r: rec(sku="  "), "field 'sku' is empty"),
    ("sku_not_string", "train.jsonl", lambda r: rec(sku=123), "field 'sku' must be a string, got number"),
    ("title_not_string", "train.jsonl", lambda r: rec(title=["a"]), "field 'title' must be a string, got array"),
    ("tags_not_list", "train.jsonl", lambda r: rec(tags="护肤"), "field 'tags' must be a list of strings"),
    ("tags_not_strings", "val.jsonl", lambda r: rec(tags=["a", 1]), "field 'tags' must be a list of strings"),
    ("missing_image_field", "train.jsonl", lambda r: json.dumps({"sku": "SKU-A", "title": "t"}),
     "missing field 'image'"),
    ("dotdot_path", "train.jsonl", lambda r: rec(image="images/../../etc/passwd"), "escapes the dataset directory"),
    ("absolute_path", "test.jsonl", lambda r: rec(image="/etc/passwd"), "is an absolute path"),
    ("s3_dotdot_key", "train.jsonl", lambda r: rec(image="s3://bucket/../../../../../pwned.png"),
     "'..' segments are not allowed"),
    ("s3_empty_segment", "train.jsonl", lambda r: rec(image="s3://bucket/a//b.png"), "segments are not allowed"),
    ("s3_other_bucket", "train.jsonl", lambda r: rec(image="s3://someone-elses-bucket/secret.png"),
     "outside the dataset's own prefix and data.image_prefixes (allowed: none: this dataset is local)"),
    ("link_escapes", "train.jsonl", lambda r: rec(image=_outside_link(r)),
     "escapes the dataset directory (through a link)"),
    ("image_missing", "train.jsonl", lambda r: rec(image="images/nope.png"), "image not found: images/nope.png"),
    ("image_zero_bytes", "train.jsonl", lambda r: rec(image=_write(r, "images/empty.png", b"")), "image file is empty"),
    ("image_not_an_image", "train.jsonl", lambda r: rec(image=_write(r, "images/text.png", b"hello, not a picture")),
     "not a recognised image format"),
    ("image_truncated", "train.jsonl", lambda r: rec(image=_truncated(r)), "truncated"),
    ("duplicate_image_sku", "train.jsonl", lambda r: rec(image="images/train_SKU-A_0.png", sku="SKU-A", title="again"),
     "duplicate of train.jsonl:1 (same image and sku)"),
    ("duplicate_across_splits", "test.jsonl", lambda r: rec(image="images/train_SKU-B_0.png", sku="SKU-B"),
     "duplicate of train.jsonl:5"),
    ("test_sku_not_in_train", "test.jsonl", lambda r: rec(image="images/test_SKU-A_0.png", sku="SKU-Z"),
     "sku 'SKU-Z' has no training images"),
    ("val_sku_not_in_train", "val.jsonl", lambda r: rec(image="images/val_SKU-A_0.png", sku="SKU-NEW"),
     "sku 'SKU-NEW' has no training images"),
    ("not_utf8", "train.jsonl", lambda r: b'{"image": "images/train_SKU-A_0.png", "sku": "SKU-A", "title": "\xff\xfe"}',
     "not valid UTF-8 (byte 0xff"),
    ("catalog_duplicate_sku", "catalog.jsonl", lambda r: json.dumps({"sku": "SKU-A", "title": "again", "tags": []}),
     "duplicate catalog entry for sku 'SKU-A' (first at line 1)"),
    ("catalog_bad_image", "catalog.jsonl", lambda r: json.dumps({"sku": "SKU-X", "image": "images/none.png"}),
     "image not found"),
]


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds")


def test_valid_dataset_is_read_whole(dataset):
    m = load_manifest(str(dataset))
    assert (len(m.train), len(m.val), len(m.test), len(m.catalog)) == (9, 3, 3, 4)
    assert m.classes() == SKUS and m.dropped == [] and m.holdout == []
    first = m.train[0]
    assert first == Record("images/train_SKU-A_0.png", "SKU-A", LONG_TITLE, ("护肤",))
    assert len(first.title) == 10_000
    assert m.train[1].title == "" and m.train[2].tags == ()
    assert m.image_uri(first) == str(dataset / "images/train_SKU-A_0.png")
    assert m.catalog[-1] == Record("", "SKU-NEW", "新品", ())


def test_crlf_and_blank_lines_are_fine(dataset):
    text = (dataset / "val.jsonl").read_text(encoding="utf-8")
    (dataset / "val.jsonl").write_text("\n" + text.replace("\n", "\r\n") + "\n\n", encoding="utf-8", newline="")
    assert len(load_manifest(str(dataset)).val) == 3


@pytest.mark.parametrize("case, file, make_line, reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_error_mode_names_file_line_reason(dataset, case, file, make_line, reason):
    line = append(dataset, file, make_line(dataset))
    with pytest.raises(DatasetError) as err:
        load_manifest(str(dataset))
    assert [(p.file, p.line) for p in err.value.problems] == [(file, line)]
    assert reason in err.value.problems[0].reason
    assert f"{file}:{line}: " in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("case, file, make_line, reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_skip_mode_keeps_the_rest(dataset, case, file, make_line, reason):
    line = append(dataset, file, make_line(dataset))
    m = load_manifest(str(dataset), on_bad_record="skip")
    assert [(p.file, p.line) for p in m.dropped] == [(file, line)] and reason in m.dropped[0].reason
    assert (len(m.train), len(m.val), len(m.test)) == (9, 3, 3) and len(m.catalog) == 4


def test_every_problem_is_listed_at_once(dataset):
    a = append(dataset, "train.jsonl", "not json")
    b = append(dataset, "test.jsonl", rec(sku="SKU-Z"))
    c = append(dataset, "train.jsonl", rec(image="images/gone.png"))
    with pytest.raises(DatasetError) as err:
        load_manifest(str(dataset))
    assert [(p.file, p.line) for p in err.value.problems] == [("train.jsonl", a), ("train.jsonl", c), ("test.jsonl", b)]
    assert str(err.value).count("\n") == 3


def test_problem_str():
    assert str(Problem("train.jsonl", 7, "invalid JSON")) == "train.jsonl:7: invalid JSON"
    assert str(Problem("train.jsonl", 0, "has no records")) == "train.jsonl: has no records"


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_empty_train_file_is_an_error_naming_it(dataset, mode):
    (dataset / "train.jsonl").write_text("")
    with pytest.raises(DatasetError, match=r"train\.jsonl: has no records"):
        load_manifest(str(dataset), on_bad_record=mode)


def test_train_with_only_bad_records_fails_even_when_skipping(dataset):
    (dataset / "train.jsonl").write_text("oops\n")
    with pytest.raises(DatasetError) as err:
        load_manifest(str(dataset), on_bad_record="skip")
    assert "train.jsonl: has no valid records" in str(err.value)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_missing_catalog_is_a_clear_error(dataset, mode):
    (dataset / "catalog.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"catalog\.jsonl: file not found"):
        load_manifest(str(dataset), on_bad_record=mode)


def test_missing_directory_and_bad_mode(tmp_path, dataset):
    with pytest.raises(DatasetError, match="dataset directory not found"):
        load_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="on_bad_record"):
        load_manifest(str(dataset), on_bad_record="ignore")


def test_without_image_verification_only_existence_is_checked(dataset):
    _write(dataset, "images/text.png", b"not a picture")
    append(dataset, "train.jsonl", rec(image="images/text.png"))
    assert len(load_manifest(str(dataset), verify_images=False).train) == 10
    append(dataset, "train.jsonl", rec(image="images/missing.png"))
    with pytest.raises(DatasetError, match="image not found"):
        load_manifest(str(dataset), verify_images=False)


def test_holdout_records_need_a_catalog_sku(dataset):
    _write(dataset, "images/new_0.png", png())
    (dataset / "holdout.jsonl").write_text(jsonl([{"image": "images/new_0.png", "sku": "SKU-NEW", "title": "新品"},
                                                  {"image": "images/new_0.png", "sku": "SKU-GONE", "title": ""}]))
    with pytest.raises(DatasetError, match=r"holdout\.jsonl:2: sku 'SKU-GONE' is not in catalog\.jsonl"):
        load_manifest(str(dataset))
    m = load_manifest(str(dataset), on_bad_record="skip")
    assert [r.sku for r in m.holdout] == ["SKU-NEW"]


@pytest.mark.services
def test_s3_dataset_is_read_and_written_locally(dataset, s3_bucket, tmp_path):
    from sicot import storage

    root = f"{s3_bucket}/ds"
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(root, path.relative_to(dataset).as_posix()), path.read_bytes())
    # an image addressed by absolute URI is allowed when it lies under a prefix the operator allowed
    storage.write_bytes(f"{s3_bucket}/elsewhere/extra.png", png((1, 2, 3)))
    storage.write_text(storage.join(root, "val.jsonl"), storage.read_text(storage.join(root, "val.jsonl"))
                       + rec(image=f"{s3_bucket}/elsewhere/extra.png", sku="SKU-C") + "\n")
    with pytest.raises(DatasetError, match=r"val\.jsonl:4: .*outside the dataset's own prefix"):
        load_manifest(root)
    allowed = [f"{s3_bucket}/elsewhere"]
    m = load_manifest(root, image_prefixes=allowed)
    assert len(m.train) == 9 and len(m.val) == 4 and m.image_uri(m.val[-1]) == f"{s3_bucket}/elsewhere/extra.png"
    storage.write_bytes(storage.join(root, "images/train_SKU-A_0.png"), b"")
    with pytest.raises(DatasetError, match=r"train\.jsonl:1: image images/train_SKU-A_0\.png: image is empty"):
        load_manifest(root, image_prefixes=allowed)
    original = (dataset / "images/train_SKU-A_0.png").read_bytes()
    storage.write_bytes(storage.join(root, "images/train_SKU-A_0.png"), original)
    out = tmp_path / "prepared"
    write_prepared(load_manifest(root, image_prefixes=allowed), out)
    local = load_prepared(str(out))
    assert local.val[-1].image == f"images/s3/{s3_bucket[5:]}/elsewhere/extra.png" and len(local.train) == 9
    images = [data for _, _, data in split_images(str(out), local.shards["val"])]
    assert images[-1] == png((1, 2, 3)) and images[0] == (dataset / m.val[0].image).read_bytes()


@pytest.mark.services
def test_s3_images_are_confined_to_the_dataset_prefix(dataset, s3_bucket, tmp_path):
    """An s3:// image outside the dataset's prefix is refused before anything is fetched, and nothing a
    record names is written outside the prepared directory."""
    from sicot import storage

    root = f"{s3_bucket}/ds"
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(root, path.relative_to(dataset).as_posix()), path.read_bytes())
    storage.write_bytes(f"{s3_bucket}/ds-other/x.png", png())  # a sibling prefix, not inside `ds/`
    storage.write_bytes(f"{s3_bucket}/ds/images/own.png", png((9, 9, 9)))
    lines = [rec(image=f"{s3_bucket}/ds-other/x.png"), rec(image=f"{s3_bucket}/ds/../pwned.png"),
             rec(image=f"{s3_bucket}/ds/images/own.png", sku="SKU-B")]
    storage.write_text(storage.join(root, "train.jsonl"),
                       storage.read_text(storage.join(root, "train.jsonl")) + "\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        load_manifest(root)
    assert [(p.line, "outside the dataset's own prefix" in p.reason, "'..'" in p.reason)
            for p in err.value.problems] == [(10, True, False), (11, False, True)]
    kept = load_manifest(root, on_bad_record="skip")
    assert kept.train[-1].image == f"{s3_bucket}/ds/images/own.png"
    out = tmp_path / "prepared"
    write_prepared(kept, out)
    assert "images/own.png" in {r.image for r in load_prepared(str(out)).train}  # its place inside the dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "prepared"]
