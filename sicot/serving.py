"""The online recognition service: an MLflow pyfunc that maps query images to SKUs with product facts.

Served by `mlflow models serve -m models:/sicot@champion --env-manager local`. Input: a binary column
`image` (base64 in MLflow's `dataframe_split` / `inputs` JSON bodies). Output, one entry per image:
`{"status": "ok" | "no_match" | "error", "matches": [{sku, score, title, tags, image}], "new_arrivals":
[...], "index_version": ...}`. A bad image gets a per-image error instead of failing its neighbours; a
request that is malformed as a whole (empty, too many images, no `image` column, base64 MLflow cannot
decode) is refused with a 400 response. Below `min_score` the answer is "no match" rather than a wrong
product.

New arrivals are catalog SKUs the classifier was never trained on (class_index -1 in the index). The
classifier cannot name them, so every answer also lists the nearest of them by image-embedding cosine,
above `min_similarity`, with the same facts; the list is empty when the index holds none.

The product facts come from the index version that `index/CURRENT` named when the service loaded;
every answer says which version that was.
"""
from __future__ import annotations

import binascii
import logging
import os
from typing import Any

from sicot.data.images import ImageError

log = logging.getLogger(__name__)

INDEX_ENV = "SICOT_INDEX_ROOT"  # overrides the index root baked in at registration


class RequestError(ValueError):
    """A request that cannot be answered at all (refused with a 400 by the scoring server)."""


def _base64_text_decoded(value: Any) -> Any:
    """MLflow decodes the base64 of a binary column in `dataframe_split` / `dataframe_records` bodies, but
    hands an `inputs` body's column over as the base64 text itself. No image file is base64 text (every
    format starts with binary signature bytes), so bytes that decode as strict base64 are decoded here."""
    if not isinstance(value, (bytes, bytearray)) or not value:
        return value
    try:
        return binascii.a2b_base64(bytes(value).replace(b"\n", b"").replace(b"\r", b""), strict_mode=True)
    except binascii.Error:
        return value


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class Recognition:
    """Model + index + limits, independent of MLflow so it can be used and tested directly."""

    def __init__(self, model_path: str, index_root: str | None, top_k: int = 3, min_score: float = 0.2,
                 max_images: int = 64, max_pixels: int = 16_000_000, min_similarity: float = 0.5):
        from sicot import index
        from sicot.model.recognizer import Recognizer

        self.model = Recognizer.load(model_path)  # its topk/embed run without autograd
        self.top_k, self.min_score, self.min_similarity = top_k, min_score, min_similarity
        self.max_images, self.max_pixels = max_images, max_pixels
        self.index = None
        if index_root and index.read_current(index_root)[0] is None:
            log.warning("no product index published under %s yet: answers carry SKU ids only", index_root)
        elif index_root:
            self.index = index.load_current(index_root)  # a published but damaged index is an error
        self.index_version = self.index.version if self.index else None
        # By SKU, not class number: a newly promoted model may order its classes differently from the
        # model the current index was built with.
        self.facts = {row["sku"]: {k: row[k] for k in ("sku", "title", "tags", "image")}
                      for row in (self.index.skus if self.index else [])}
        self.arrivals = self._new_arrivals_index()
        log.info("recognition service: %d classes, index version %s", len(self.model.classes), self.index_version)

    def _new_arrivals_index(self):
        """The index rows the classifier cannot name, or None when there are none to search."""
        arrivals = self.index.new_arrivals() if self.index else None
        if not arrivals:
            return None
        dim, features = arrivals.embeddings.shape[1], self.model.arch["feature_dim"]
        if dim != features:  # built by a model with another feature size: cosines would be meaningless
            log.warning("index %s has %d-d embeddings, the model makes %d-d features: new arrivals are not "
                        "searched until the index is rebuilt for this model", self.index_version, dim, features)
            return None
        return arrivals

    def _nearest_arrivals(self, features) -> list[list[dict]]:
        """Per query: the nearest new-arrival SKUs at or above `min_similarity`, best first."""
        scores, rows = self.arrivals.nearest(features.numpy(), self.top_k)
        facts = lambda r: {k: self.arrivals.skus[r][k] for k in ("sku", "title", "tags", "image")}  # noqa: E731
        return [[{**facts(r), "score": round(float(s), 6)} for s, r in zip(row_scores, row_ids)
                 if r >= 0 and s >= self.min_similarity] for row_scores, row_ids in zip(scores, rows)]

    def _facts(self, class_idx: int) -> dict:
        sku = self.model.classes[class_idx]
        return self.facts.get(sku) or {"sku": sku, "title": None, "tags": [], "image": None}

    def recognise(self, images: list[Any]) -> list[dict]:
        if not images:
            raise RequestError("empty request: send at least one image in the `image` column")
        if len(images) > self.max_images:
            raise RequestError(f"{len(images)} images in one request; at most {self.max_images} (serve.max_images)")
        answers: list[dict | None] = [None] * len(images)
        batch, rows = [], []
        for row, data in enumerate(images):
            if not isinstance(data, (bytes, bytearray)):
                answers[row] = self._error(f"image {row}: expected image bytes, got {type(data).__name__}")
                continue
            try:
                batch.append(self.model.prepare([bytes(data)], max_pixels=self.max_pixels)[0])
                rows.append(row)
            except ImageError as exc:
                answers[row] = self._error(f"image {row}: {exc}")
        if batch:
            import torch

            if self.arrivals:
                scores, classes, features = self.model.topk_and_embed(torch.stack(batch), self.top_k)
                similar = self._nearest_arrivals(features)
            else:
                scores, classes = self.model.topk(torch.stack(batch), self.top_k)
                similar = [[] for _ in rows]
            for row, s, c, new in zip(rows, scores.tolist(), classes.tolist(), similar):
                matches = [{**self._facts(ci), "score": round(si, 6)} for si, ci in zip(s, c)
                           if si >= self.min_score]
                answers[row] = {"status": "ok" if matches or new else "no_match", "matches": matches,
                                "new_arrivals": new, "index_version": self.index_version}
        return answers

    def _error(self, message: str) -> dict:
        return {"status": "error", "error": message, "matches": [], "new_arrivals": [],
                "index_version": self.index_version}


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # mlflow is a dependency; this keeps `Recognition` importable without it
    PythonModel = object


class RecognitionService(PythonModel):
    """The pyfunc wrapper: artifacts {"model": model.pt}, model_config holds the serving limits."""

    def load_context(self, context):
        cfg = dict(context.model_config or {})
        self.service = Recognition(
            context.artifacts["model"], os.environ.get(INDEX_ENV, cfg.get("index_root")),
            top_k=int(cfg.get("top_k", 3)), min_score=float(cfg.get("min_score", 0.2)),
            max_images=int(cfg.get("max_images", 64)), max_pixels=int(cfg.get("max_pixels", 16_000_000)),
            min_similarity=float(cfg.get("min_similarity", 0.5)))

    def predict(self, context, model_input, params=None):
        try:
            images = [_base64_text_decoded(value) for value in model_input["image"]]
        except (KeyError, TypeError):
            raise _bad_request("input must have a binary column named `image`") from None
        try:
            return self.service.recognise(images)
        except RequestError as exc:
            raise _bad_request(str(exc)) from None


def log_service(model_path: str, params, name: str = "sicot", registered_model_name: str | None = None):
    """Log the recognizer as a pyfunc (MLflow 3 LoggedModel) with signature and input example;
    returns the ModelInfo. Call inside an active run."""
    import io

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from PIL import Image

    from sicot import storage

    example = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(example, format="PNG")
    index_root = params.paths.index if storage.is_s3(params.paths.index) else os.path.abspath(params.paths.index)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=RecognitionService(),
        artifacts={"model": model_path},
        model_config={"index_root": index_root, "top_k": params.serve.top_k, "min_score": params.serve.min_score,
                      "max_images": params.serve.max_images, "max_pixels": params.serve.max_pixels,
                      "min_similarity": params.serve.min_similarity},
        signature=ModelSignature(inputs=Schema([ColSpec("binary", "image")])),
        input_example=pd.DataFrame({"image": [example.getvalue()]}),
        registered_model_name=registered_model_name,
    )
