"""sicot.tracking: what may be printed or stored about the tracking URI."""
import pytest

from sicot.tracking import redacted


@pytest.mark.parametrize("uri, shown", [
    ("http://user:s3cret@mlflow.example:5000", "http://user:***@mlflow.example:5000"),
    ("https://ghp_abc123@mlflow.example/", "https://***@mlflow.example/"),
    ("https://mlflow.example/api?token=abc&workspace=ml", "https://mlflow.example/api?token=***&workspace=ml"),
    ("https://h/x?X-Amz-Signature=f00&X-Amz-Credential=AKIA%2F1&api_key=k&sig=s&Password=p#frag",
     "https://h/x?X-Amz-Signature=***&X-Amz-Credential=***&api_key=***&sig=***&Password=***#frag"),
    ("https://u:p@h?access_token=t", "https://u:***@h?access_token=***"),
    ("sqlite:////tmp/run/mlflow.db", "sqlite:////tmp/run/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("databricks", "databricks"),
])
def test_redacted_hides_secrets_and_keeps_the_rest(uri, shown):
    assert redacted(uri) == shown


def test_setup_keeps_mlflow_from_printing_a_secret_uri(monkeypatch, tmp_path):
    import mlflow

    from sicot import tracking

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:s3cret@127.0.0.1:9")
    for call in ("set_tracking_uri", "set_registry_uri", "set_experiment"):  # no server, no global state left
        monkeypatch.setattr(mlflow, call, lambda value: None)
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: object())
    tracking.setup()
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
