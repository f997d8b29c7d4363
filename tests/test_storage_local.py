import threading

import pytest

from sicot import storage


def test_write_read_list_delete(tmp_path):
    root = str(tmp_path / "root")
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a", "x.txt")) == "hello"
    assert storage.list_children(root) == ["a", "b.bin"]
    assert [k.rsplit("/", 1)[1] for k in storage.list_keys(root)] == ["x.txt", "b.bin"]
    storage.delete_tree(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.txt"))
    assert list(tmp_path.rglob("*.tmp")) == []


def test_swap_race_has_one_winner(tmp_path):
    uri = str(tmp_path / "CURRENT")
    wins = []
    threads = [threading.Thread(target=lambda i=i: wins.append(storage.swap(uri, f"{i}".encode(), None)))
               for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert wins.count(True) == 1


def test_atomic_dir_keeps_previous_output_on_failure(tmp_path):
    out = tmp_path / "out"
    with storage.atomic_dir(out) as tmp:
        (tmp / "f").write_text("first")
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(out) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("killed")
    assert (out / "f").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_recovers_a_swap_cut_between_its_renames(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with storage.atomic_dir(out) as tmp:
        (tmp / "f").write_text("first")
    real_replace, calls = storage.os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with storage.atomic_dir(out) as tmp:
            (tmp / "f").write_text("second")
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert not out.exists()  # the crash left only the `.old-` copy

    with pytest.raises(RuntimeError):  # the next run repairs it before it even starts building
        with storage.atomic_dir(out) as tmp:
            assert (out / "f").read_text() == "first"
            raise RuntimeError("fails too")
    assert (out / "f").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_s3_instead_of_making_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match="local directory"):
        with storage.atomic_dir("s3://bucket/prepared"):
            pass
    assert list(tmp_path.iterdir()) == []
