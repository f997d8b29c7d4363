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


class TinyWorld:
    """A small prepared dataset plus word vectors, built once per session; `params(tmp)` gives Params
    whose models and reports go to `tmp`, with a training setup small enough for unit tests."""

    def __init__(self, root):
        self.root = root

    def params(self, tmp, *overrides: str):
        from sicot.config import load_params

        return load_params(None, [
            f"paths.prepared={self.root / 'prepared'}", f"paths.word2vec={self.root / 'word2vec'}",
            f"paths.raw={self.root / 'raw'}", f"paths.models={tmp / 'models'}", f"paths.reports={tmp / 'reports'}",
            "data.skus=6", "data.brands=6", "data.categories=6", "data.max_images=24", "data.imbalance=4",
            "data.val_per_class=2", "data.test_per_class=3", "data.image_size=32",
            "train.image_size=16", "train.epochs=2", "train.batch_size=16", "train.lr=0.02", "train.threads=1",
            "evaluate.head_threshold=10", "evaluate.attention_samples=4", *overrides])


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from components import prepare_data, train_word2vec

    world = TinyWorld(tmp_path_factory.mktemp("tiny_world"))
    params = world.params(world.root)
    prepare_data.run(params, track=False)
    train_word2vec.run(params, track=False)
    return world


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One `prefect server` on loopback for the session, with its own PREFECT_HOME."""
    from tests import services

    server = services.start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        services.stop(server)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """One `mlflow server` (SQLite store) whose artifacts live in a bucket of the S3 server; only the
    server holds the S3 credentials, clients upload and download through it."""
    from tests import services

    bucket = s3_server.new_bucket("mlflow")
    env = {**s3_server.env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    server = services.start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), f"s3://{bucket}/mlartifacts", env)
    try:
        yield server
    finally:
        services.stop(server)
