"""The code MLflow runs to load the served model: the installed sicot package's service, nothing more.

`sicot.serving.verify_model_code` compares a logged copy of this file with this one by sha256, so a
change here means registering the model again.
"""
from mlflow.models import set_model

from sicot.serving import RecognitionService

set_model(RecognitionService())
