import pytest

from tests import s3server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server on loopback for the whole session."""
    server, proc = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        s3server.stop(proc)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """`s3://<fresh bucket>`, with the AWS_* environment pointing boto3 (and sicot.storage) at the server."""
    from sicot import storage

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    storage.s3.cache_clear()
    yield f"s3://{s3_server.new_bucket()}"
    storage.s3.cache_clear()
