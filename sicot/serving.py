"""The online recognition service: an MLflow pyfunc that maps query images to SKUs with product facts.

Served by `python -m sicot.serving_app --model models:/sicot@champion` (MLflow's scoring app behind a
request-body limit) or `mlflow models serve -m models:/sicot@champion --env-manager local`. Input: a
binary column `image` (base64 in MLflow's `dataframe_split` / `inputs` JSON bodies). Output, one entry
per image: `{"status": "ok" | "no_match" | "error", "matches": [{sku, score, title, tags, image}],
"new_arrivals": [...], "index_version": ...}`. A bad image gets a per-image error instead of failing its
neighbours; a request that is malformed as a whole (empty, too many images or pixels, no `image`
column, base64 MLflow cannot decode) is refused with a 400 response. Below `min_score` the answer is
"no match" rather than a wrong product.

New arrivals are catalog SKUs the classifier was never trained on (class_index -1 in the index). The
classifier cannot name them, so every answer also lists the nearest of them by image-embedding cosine,
above `min_similarity`, with the same facts; the list is empty when the index holds none.

Requests that arrive together share a forward pass: each request decodes its own images in its own
thread (MLflow's scoring server runs every request in a thread of asyncio's default pool, min(32, CPUs
+ 4) threads, which also caps the requests one pass can serve), then a
`sicot.batching.Batcher` runs the decoded images of concurrent requests through the model together,
up to `max_batch` images per pass, waiting at most `max_wait_ms` for others to join when the worker is
idle, one pass at a time per worker. Each request gets its own rows back; a bad image never reaches the
batch (it is answered with its error during decoding), so it cannot fail its neighbours.

The product index is found at `$SICOT_INDEX` (the location every step reads as `paths.index`), else at
the one logged with the model. Its facts come from the version `index/CURRENT` names: every
`index_refresh_s` seconds (`$SICOT_SERVE_INDEX_REFRESH_S` overrides it per deployment; 0 = never) a
request finds a check due and starts it in a thread of its own, so no request waits for the store. The
check reads CURRENT's token only; when it changed, the version CURRENT names is loaded whole and verified
against its manifest, then swapped in as one object, so each request answers from one version throughout
and every answer says which. A version that fails to load is logged and the one before it still answers;
the next check tries again.

Limits on hostile input (`serve.*`, logged in the model's config): the image count (`max_images`) and
every image's header (`formats`, an allow-list handed to Pillow so other parsers never run;
`max_pixels` per image; `max_request_pixels` for the request as a whole) are checked before any image
is decoded, and images are decoded in a worker's pool of `max_decodes` threads, so its decode memory is
bounded whatever the number of clients (a pool rather than a semaphore: glibc gives each decoding thread
its own malloc arena, which keeps freed pixels resident, so decodes spread over every request thread
grew a worker to 3.8× one decode with 2 at a time and 8 clients); a JPEG is decoded at reduced scale
(`JPEG_MARGIN`). One forward pass of at most `max_batch` images runs at a time in a worker, which bounds
its activation memory. The request-body limit (`max_request_bytes`) is the HTTP server's:
`sicot.serving_app`.

The model is logged from code, not pickled: its code file is `served_model.py`, a stub that imports
this installed package, and `verify_model_code` refuses a model whose copy of it differs by sha256.
MLflow executes that file when it loads the model, so the check in `load_context` runs after it: it
stops accidental or unsanctioned changes that still load this service; only the check made before
loading (`python -m sicot.serving_app` does it on the downloaded copy before any worker starts) keeps
altered code from running at all.
"""
from __future__ import annotations

import binascii
import dataclasses
import hashlib
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import monotonic
from typing import Any

from sicot.batching import Batcher
from sicot.data.images import FormatNotAccepted, ImageError, decode_opened, open_image, to_tensor

log = logging.getLogger(__name__)

INDEX_ENV = "SICOT_INDEX"  # the index location the ConfigMap gives every step; overrides the logged one
REFRESH_ENV = "SICOT_SERVE_INDEX_REFRESH_S"  # tuned per deployment, without registering the model again
FACTS = ("sku", "title", "tags", "image")
STUB = Path(__file__).with_name("served_model.py")  # the code file every logged service runs
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader for models logged from code
# A JPEG is decoded at reduced scale but keeps at least this many times the model's input size per side:
# measured on photos at 32, 64 and 224 pixels, the model input then differs from a full decode's by at
# most 2/255 (mean 0.12/255); at 1x the margin it differed by up to 66/255.
JPEG_MARGIN = 8


class RequestError(ValueError):
    """A request that cannot be answered at all (refused with a 400 by the scoring server)."""


class ModelCodeError(RuntimeError):
    """A logged model whose code is not exactly this package's stub: it is not served."""


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

    class Refused(MlflowException):
        """Keeps the message it was given: MLflow's scoring server would prefix it with the repr of the whole
        input (`Failed to predict data '<the DataFrame, image bytes and all>'`)."""

        def __setattr__(self, name, value):
            if name != "message" or "message" not in self.__dict__:
                super().__setattr__(name, value)

    return Refused(message, error_code=INVALID_PARAMETER_VALUE)


@dataclasses.dataclass(frozen=True)
class Products:
    """One index version as answers use it. Built whole and never changed: a request that takes it once
    answers from one version throughout, whatever is swapped in meanwhile."""
    version: str | None = None
    token: str | None = None  # CURRENT's token when it was read for this version
    facts: dict = dataclasses.field(default_factory=dict)  # by SKU
    arrivals: Any = None  # the new arrivals as a searchable ProductIndex; None when there are none to search


class Recognition:
    """Model + index + limits, independent of MLflow so it can be used and tested directly."""

    def __init__(self, model_path: str, index_root: str | None, top_k: int = 3, min_score: float = 0.2,
                 max_images: int = 64, max_pixels: int = 16_000_000, min_similarity: float = 0.5,
                 max_request_pixels: int = 64_000_000, max_decodes: int = 2, max_batch: int = 32,
                 max_wait_ms: float = 2.0, formats: str = "JPEG,PNG,WEBP", index_refresh_s: float = 30.0,
                 max_classifier_mb: float = 4096.0):
        from sicot.model.recognizer import Recognizer

        # topk/embed run without autograd; a W over the limit is scored from its files block by block
        self.model = Recognizer.load(model_path, max_classifier_mb=max_classifier_mb)
        self.top_k, self.min_score, self.min_similarity = top_k, min_score, min_similarity
        self.max_images, self.max_pixels, self.max_request_pixels = max_images, max_pixels, max_request_pixels
        self.formats = accepted_formats(formats)
        self.decoder = ThreadPoolExecutor(max_decodes, thread_name_prefix="decode")
        self.batcher = Batcher(self._forward, max_batch, max_wait_ms / 1000)
        self.index_root, self.index_refresh_s = index_root, index_refresh_s
        self.products = self._first_products()
        self._checking = threading.Lock()  # held while a check of CURRENT runs: one at a time
        self._next_check = monotonic() + index_refresh_s if index_root and index_refresh_s else math.inf
        log.info("recognition service: %d classes, index version %s, CURRENT checked every %g s (0: never)",
                 len(self.model.classes), self.products.version, index_refresh_s if index_root else 0)

    def _first_products(self) -> Products:
        from sicot import index

        if not self.index_root:
            return Products()
        pointer, token = index.read_current(self.index_root)
        if pointer is None:  # a warning only when nothing will pick up the first index (refresh off)
            (log.info if self.index_refresh_s else log.warning)(
                "no product index published under %s yet: answers carry SKU ids only until one is", self.index_root)
            return Products()
        return self._products(index.load_current(self.index_root), token)  # damaged at start: an error

    def _products(self, loaded, token: str | None) -> Products:
        """A loaded `ProductIndex`, ready to answer from."""
        # By SKU, not class number: a newly promoted model may order its classes differently from the
        # model the index was built with.
        facts = {row["sku"]: {k: row[k] for k in FACTS} for row in loaded.skus}
        return Products(loaded.version, token, facts, self._new_arrivals_index(loaded))

    def _new_arrivals_index(self, loaded):
        """The index rows the classifier cannot name, or None when there are none to search."""
        arrivals = loaded.new_arrivals()
        if not arrivals:
            return None
        dim, features = arrivals.embeddings.shape[1], self.model.arch["feature_dim"]
        if dim != features:  # built by a model with another feature size: cosines would be meaningless
            log.warning("index %s has %d-d embeddings, the model makes %d-d features: new arrivals are not "
                        "searched until the index is rebuilt for this model", loaded.version, dim, features)
            return None
        arrivals.nearest(arrivals.embeddings[:1], 1)  # builds its search now, not in a request after the swap
        return arrivals

    def _current_products(self) -> Products:
        """The version to answer from. When a check of CURRENT is due, it is started in a thread of its own
        (no request waits for the store or a load) and this request still answers from the version served."""
        if monotonic() >= self._next_check and self._checking.acquire(blocking=False):
            if monotonic() >= self._next_check:  # and no check has finished since the first look
                self._next_check = monotonic() + self.index_refresh_s
                threading.Thread(target=self._check_index, name="sicot-index-check", daemon=True).start()
            else:
                self._checking.release()
        return self.products

    def _check_index(self) -> None:
        """Swap in the version CURRENT names once CURRENT's token changed; a version that fails to load
        leaves the served one answering, and the next check tries again."""
        from sicot import index

        served, named = self.products, "named by CURRENT"
        try:
            pointer, token = index.read_current(self.index_root)
            if pointer is None or token == served.token:
                return
            named = pointer["version"]
            self.products = (dataclasses.replace(served, token=token) if named == served.version
                             else self._products(index.load_current(self.index_root), token))
            if self.products.version != served.version:
                log.info("index version %s now served (was %s)", self.products.version, served.version)
        except Exception as exc:  # whatever the store holds or does, the served version keeps answering
            log.warning("index version %s under %s not loaded, still serving %s: %s", named, self.index_root,
                        served.version, exc)
        finally:
            self._checking.release()

    def _nearest_arrivals(self, features, arrivals) -> list[list[dict]]:
        """Per query: the nearest new-arrival SKUs at or above `min_similarity`, best first."""
        scores, rows = arrivals.nearest(features.numpy(), self.top_k)
        facts = lambda r: {k: arrivals.skus[r][k] for k in FACTS}  # noqa: E731
        return [[{**facts(r), "score": round(float(s), 6)} for s, r in zip(row_scores, row_ids)
                 if r >= 0 and s >= self.min_similarity] for row_scores, row_ids in zip(scores, rows)]

    def _facts(self, class_idx: int, facts: dict) -> dict:
        sku = self.model.classes[class_idx]
        return facts.get(sku) or {"sku": sku, "title": None, "tags": [], "image": None}

    def check_count(self, count: int) -> None:
        if not count:
            raise RequestError("empty request: send at least one image in the `image` column")
        if count > self.max_images:
            raise RequestError(f"{count} images in one request; at most {self.max_images} (serve.max_images)")

    def recognise(self, images: list[Any]) -> list[dict]:
        self.check_count(len(images))
        products = self._current_products()  # one version for the whole request
        answers: list[dict | None] = [None] * len(images)
        opened = {}
        for row, data in enumerate(images):
            try:
                opened[row] = self._open(data)
            except ImageError as exc:
                answers[row] = self._error(f"image {row}: {exc}", products.version)
        self._check_request_pixels(opened)
        inputs, rows = [], []  # this request's decoded images, ready for the model
        for row in list(opened):
            img = opened.pop(row)  # dropped once decoded: one full-size image at a time per request
            try:
                inputs.append(self._pixels(img))
                rows.append(row)
            except ImageError as exc:
                answers[row] = self._error(f"image {row}: {_described(img)}: {exc}", products.version)
        if inputs:
            import torch

            scores, classes, features = zip(*self.batcher(inputs))  # with the images of concurrent requests
            similar = (self._nearest_arrivals(torch.stack(features), products.arrivals) if products.arrivals
                       else [[] for _ in rows])
            for row, s, c, new in zip(rows, scores, classes, similar):
                matches = [{**self._facts(ci, products.facts), "score": round(si, 6)} for si, ci in zip(s, c)
                           if si >= self.min_score]
                answers[row] = {"status": "ok" if matches or new else "no_match", "matches": matches,
                                "new_arrivals": new, "index_version": products.version}
        return answers

    def _forward(self, images: list) -> list[tuple[list[float], list[int], Any]]:
        """One backbone pass over a batch of model inputs: per image, its top-k (scores, class indices) and
        its embedding."""
        import torch

        scores, classes, features = self.model.topk_and_embed(torch.stack(images), self.top_k)
        return list(zip(scores.tolist(), classes.tolist(), features))

    def _open(self, data: Any):
        """The image with only its header read, refused unless its format and size are allowed."""
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"expected image bytes, got {type(data).__name__}")
        try:
            img = open_image(bytes(data), self.formats)
        except FormatNotAccepted as exc:
            raise ImageError(f"{exc} (serve.formats)") from None
        if _pixel_count(img) > self.max_pixels:
            raise ImageError(f"{_described(img)}, over the limit of {self.max_pixels} pixels per image "
                             "(serve.max_pixels)")
        return img

    def _check_request_pixels(self, opened: dict) -> None:
        total = sum(_pixel_count(img) for img in opened.values())
        if total > self.max_request_pixels:
            raise RequestError(f"{len(opened)} images of {total} pixels in all; at most {self.max_request_pixels} "
                               "pixels per request (serve.max_request_pixels)")

    def _pixels(self, img):
        """The model input for one opened image, made in the decode pool: the full-size pixels exist only
        in its `max_decodes` threads."""
        return self.decoder.submit(self._decode, img).result()

    def _decode(self, img):
        try:
            return to_tensor(decode_opened(img, min_size=JPEG_MARGIN * self.model.image_size), self.model.image_size)
        finally:
            img.close()  # frees the decoded pixels now rather than when the request ends

    def _error(self, message: str, index_version: str | None) -> dict:
        return {"status": "error", "error": message, "matches": [], "new_arrivals": [],
                "index_version": index_version}


def _pixel_count(img) -> int:
    width, height = img.size
    return width * height


def _described(img) -> str:
    width, height = img.size
    return f"{img.format} {width}x{height} = {width * height} pixels"


def accepted_formats(names: str) -> tuple[str, ...]:
    """`serve.formats` ("JPEG,PNG,WEBP") as Pillow format names; a name Pillow does not know is an error,
    not a format that silently never matches."""
    from PIL import Image

    Image.init()
    formats = tuple(name.strip().upper() for name in names.split(",") if name.strip())
    unknown = [name for name in formats if name not in Image.OPEN]
    if not formats or unknown:
        raise ValueError(f"serve.formats: {names!r} must name Pillow image formats, e.g. JPEG,PNG,WEBP"
                         + (f" ({', '.join(unknown)} is not one)" if unknown else ""))
    return formats


def verify_model_code(model_dir: str | os.PathLike) -> None:
    """Refuse a logged model unless the code MLflow runs to load it is exactly `STUB` (by sha256), with no
    pickled model and no code directories put on `sys.path` ahead of the installed package."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors.get("python_function") or {}
    code = flavor.get("model_code_path")
    if flavor.get("loader_module") != CODE_LOADER or not code:
        raise ModelCodeError(f"{model_dir}: not logged from code (loader {flavor.get('loader_module')!r}); a "
                             "pickled model runs whatever code it holds when loaded: register it again")
    if flavor.get("code"):
        raise ModelCodeError(f"{model_dir}: carries code directories ({flavor['code']}) that MLflow would import "
                             "ahead of the installed sicot package")
    path = Path(model_dir) / os.path.basename(code)
    found = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "no file"
    expected = hashlib.sha256(STUB.read_bytes()).hexdigest()
    if found != expected:
        raise ModelCodeError(f"{path}: sha256 {found}, expected {expected} (sicot/{STUB.name} of the installed "
                             "package): refusing altered model code")


def _model_dir(artifact: str) -> Path:
    """The logged model directory (the one holding `MLmodel`) that an artifact path lies in."""
    found = next((p for p in Path(artifact).resolve().parents if (p / "MLmodel").is_file()), None)
    if found is None:
        raise ModelCodeError(f"{artifact}: not inside a logged MLflow model")
    return found


def serve_limits(model_config: dict) -> Any:
    """The model config's `serve.*` keys, then `$SICOT_SERVE_INDEX_REFRESH_S`, validated and typed like
    params.yaml (a `sicot.config.Serve`)."""
    from sicot.config import Params, Serve

    keys = {f.name for f in dataclasses.fields(Serve)}
    serve = {k: v for k, v in model_config.items() if k in keys}
    if os.environ.get(REFRESH_ENV):
        serve["index_refresh_s"] = os.environ[REFRESH_ENV]
    return Params.from_dict({"serve": serve}).serve


def recognition_limits(serve) -> dict:
    """The `Recognition` keyword arguments of a `Serve`; the body limit belongs to the HTTP server."""
    return {k: v for k, v in dataclasses.asdict(serve).items() if k != "max_request_bytes"}


try:
    import pandas as pd  # an mlflow dependency
    from mlflow.pyfunc import PythonModel
except ImportError:  # mlflow is a dependency; this keeps `Recognition` importable without it
    PythonModel = object


class RecognitionService(PythonModel):
    """The pyfunc: artifacts {"model": model.pt} and a sharded model's classifier files beside it (each under
    its file name), model_config holds the `serve.*` limits. Logged from code
    (`served_model.py` creates it), never pickled."""

    def load_context(self, context):
        verify_model_code(_model_dir(context.artifacts["model"]))
        cfg = dict(context.model_config or {})
        self.limits = serve_limits(cfg)
        self.service = Recognition(context.artifacts["model"], os.environ.get(INDEX_ENV) or cfg.get("index_root"),
                                   **recognition_limits(self.limits))

    # A DataFrame hint: MLflow checks the input against the logged signature, not against the hint
    def predict(self, context, model_input: pd.DataFrame, params=None):
        try:
            column = model_input["image"]
        except (KeyError, TypeError):
            raise _bad_request("input must have a binary column named `image`") from None
        try:
            self.service.check_count(len(column))  # before any base64 or image is decoded
            return self.service.recognise([_base64_text_decoded(value) for value in column])
        except RequestError as exc:
            raise _bad_request(str(exc)) from None


def log_service(model_path: str, params, name: str = "sicot", registered_model_name: str | None = None):
    """Log the recognizer as a pyfunc (MLflow 3 LoggedModel, from code) with signature and input example;
    returns the ModelInfo. Call inside an active run."""
    import io

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from PIL import Image

    from sicot import storage
    from sicot.model.recognizer import classifier_files

    example = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(example, format="PNG")
    index_root = params.paths.index if storage.is_s3(params.paths.index) else os.path.abspath(params.paths.index)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(STUB),  # models from code: the stub is copied, nothing is pickled
        artifacts={"model": model_path, **{uri.rsplit("/", 1)[-1]: uri for uri in classifier_files(model_path)}},
        model_config={"index_root": index_root, **dataclasses.asdict(params.serve)},
        signature=ModelSignature(inputs=Schema([ColSpec("binary", "image")])),
        input_example=pd.DataFrame({"image": [example.getvalue()]}),
        registered_model_name=registered_model_name,
    )
