"""sicot.storage against a real S3 server (SeaweedFS on loopback)."""
import functools
import threading

import pytest

from sicot import storage

pytestmark = pytest.mark.services


def test_write_read_list_delete(s3_bucket):
    root = f"{s3_bucket}/root"
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a", "x.txt")) == "hello"
    assert storage.exists(storage.join(root, "b.bin"))
    assert storage.list_children(root) == ["a", "b.bin"]
    assert storage.list_keys(root) == [f"{root}/a/x.txt", f"{root}/b.bin"]
    storage.delete_tree(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.txt"))
    assert storage.list_keys(root) == [f"{root}/b.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))


def test_list_does_not_match_sibling_prefixes(s3_bucket):
    storage.write_text(f"{s3_bucket}/v1/a", "1")
    storage.write_text(f"{s3_bucket}/v10/a", "10")
    assert storage.list_keys(f"{s3_bucket}/v1") == [f"{s3_bucket}/v1/a"]
    storage.delete_tree(f"{s3_bucket}/v1")
    assert storage.read_text(f"{s3_bucket}/v10/a") == "10"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket")


def test_swap_is_compare_and_swap(root):
    uri = storage.join(root, "index", "CURRENT")
    assert storage.read_versioned(uri) == (None, None)
    assert storage.swap(uri, b"v1", expected=None)
    assert not storage.swap(uri, b"v2", expected=None)
    data, token = storage.read_versioned(uri)
    assert data == b"v1"
    assert storage.swap(uri, b"v2", expected=token)
    assert not storage.swap(uri, b"v3", expected=token)
    assert storage.read_bytes(uri) == b"v2"


@pytest.mark.parametrize("existing", [False, True])
def test_swap_race_has_one_winner(s3_bucket, existing):
    uri = f"{s3_bucket}/CURRENT"
    token = None
    if existing:
        storage.write_bytes(uri, b"start")
        token = storage.read_versioned(uri)[1]
    wins, barrier = [], threading.Barrier(8)

    def contend(i):
        barrier.wait()
        wins.append((i, storage.swap(uri, f"writer-{i}".encode(), token)))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [i for i, won in wins if won]
    assert len(wins) == 8 and len(winners) == 1
    assert storage.read_bytes(uri) == f"writer-{winners[0]}".encode()


def test_wrong_secret_is_refused(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.s3.cache_clear()
    with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|403"):
        storage.write_bytes(f"{s3_bucket}/x", b"x")


class _IgnoresConditions:
    """An S3 client for a store that accepts conditional PUTs but does not honour them."""

    def __init__(self, client):
        self._client = client

    def put_object(self, **kwargs):
        kwargs.pop("IfNoneMatch", None), kwargs.pop("IfMatch", None)
        return self._client.put_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_store_that_ignores_conditional_writes_is_refused(s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/index/CURRENT"
    storage.write_bytes(uri, b"published")
    honest = storage.s3()
    monkeypatch.setattr(storage, "s3", functools.cache(lambda: _IgnoresConditions(honest)))
    with pytest.raises(storage.StorageError, match="ignores conditional writes"):
        storage.swap(uri, b"last writer", expected=None)
    assert storage.read_bytes(uri) == b"published"
    assert storage.list_keys(s3_bucket) == [uri]  # the probe cleans up after itself


def test_the_test_server_takes_writes_into_as_many_buckets_as_a_test_run_makes(s3_server):
    # every bucket takes a volume; SeaweedFS's default cap (free disk / volume size) refused writes after
    # ~20 buckets on a disk with 24 GB free, failing whichever test came last
    client = s3_server.client()
    for _ in range(40):
        bucket = s3_server.new_bucket("many")
        client.put_object(Bucket=bucket, Key="k", Body=b"x")
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x"
