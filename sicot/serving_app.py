"""The recognition service over HTTP, with a request-body limit: MLflow's own scoring app (the same
`/invocations`, `/ping`, `/health`, `/version` and request and response formats as `mlflow models serve`)
behind an ASGI middleware that answers 413 before an oversize body is read.

    python -m sicot.serving_app --model models:/sicot@champion --host 0.0.0.0 --port 8080 --workers 2
    python -m sicot.serving_app --model models:/sicot@champion --verify-only

MLflow's scoring server (and uvicorn under it) reads any body whole, however large. Here a body whose
Content-Length is over `serve.max_request_bytes` (from the model's config) is answered 413 from the
headers alone, and a chunked body as soon as the bytes read pass the limit; nothing more of it is kept.

Before any worker loads the model, the downloaded copy is checked with `sicot.serving.verify_model_code`,
so a registry version with altered code is refused before that code runs; pickled python models are
refused too (`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

MODEL_DIR_ENV = "SICOT_SERVING_MODEL_DIR"  # the verified local copy the workers load


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 and never reaches the app. A body
    within the limit is read here and handed on unchanged (the scoring app reads it whole anyway)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limit:  # uvicorn has checked it is a number
            return await self._refuse(send, f"request body is {int(declared)} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send, f"request body is over {self.limit} bytes")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks  # one copy of the body in memory, not two
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # later calls wait for the client to disconnect, as the server's own would
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send, found: str):
        content = json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED",
                              "message": f"{found}; at most {self.limit} bytes per request "
                                         "(serve.max_request_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def create_app():
    """One worker's app: the verified model in `$SICOT_SERVING_MODEL_DIR`, served by MLflow's scoring
    app (honouring `SERVING_MODEL_CONFIG` as `mlflow models serve` does) behind the body limit."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_DIR_ENV])
    limit = model.unwrap_python_model().limits.max_request_bytes
    return BodyLimit(scoring_server.init(model), limit)


def download_verified(model_uri: str, into: str) -> str:
    """A local copy of `model_uri` under `into`, checked to run only the installed package's code."""
    from mlflow.artifacts import download_artifacts

    from sicot.serving import verify_model_code

    local = download_artifacts(artifact_uri=model_uri, dst_path=into)
    verify_model_code(local)
    return local


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models:/sicot@champion", help="model URI (default: models:/sicot@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model (default: 1)")
    p.add_argument("--verify-only", action="store_true",
                   help="download the model, check its code is the installed stub, exit 0 (or 1 with the reason)")
    args = p.parse_args(argv)
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    from sicot.serving import ModelCodeError

    with tempfile.TemporaryDirectory(prefix="sicot-model-") as into:
        try:
            local = download_verified(args.model, into)
        except ModelCodeError as exc:
            sys.exit(f"{args.model}: refused: {exc}")
        if args.verify_only:
            print(f"{args.model}: code verified")
            return
        import uvicorn

        os.environ[MODEL_DIR_ENV] = local
        uvicorn.run("sicot.serving_app:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers)


if __name__ == "__main__":
    main()
