"""Load on the served champion: requests/s and latency percentiles, and what the service adds to the model.

Serves `models:/sicot@champion` from the embedded MLflow store in `--workdir` (as left there by
`benchmarks/new_arrivals.py`: a trained model, registered and with its index published) with
`mlflow models serve --env-manager local` on loopback, then:

1. `--requests` requests from `--clients` concurrent clients (threads, one keep-alive HTTP session each),
   one test photo per request in a `dataframe_split` body; any non-200 reply or per-image error counts
   as an error.
2. `--sequential` requests one at a time: the latency of a request that does not wait behind others.
3. In this process, on the same photo: `Recognizer.topk` on the already prepared image (the raw
   forward pass), `Recognizer.prepare` (decode + resize), and `Recognition.recognise` (all the service
   does: decode, forward, new-arrival search, facts), each timed `--repeats` times.

    python benchmarks/serving_load.py [--workdir /tmp/sicot-bench] [--requests 1000] [--clients 8]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(pick(0.50), 2), "p95_ms": round(pick(0.95), 2),
            "p99_ms": round(pick(0.99), 2), "max_ms": round(ordered[-1] * 1000, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(workdir / "serve.log", "ab")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/sicot@champion", "--env-manager",
                             "local", "-p", str(port), "--host", "127.0.0.1", "--workers", str(workers)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}; see {workdir / 'serve.log'}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as reply:
                if reply.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not ready after 300 s; see {workdir / 'serve.log'}")


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def fire(url: str, bodies: list[bytes], clients: int) -> tuple[list[float], list[str], float]:
    """Send every body once, `clients` at a time; (latencies, errors, wall seconds)."""
    import requests

    latencies, errors, lock = [], [], threading.Lock()
    next_body = iter(range(len(bodies)))

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(next_body, None)
                if i is None:
                    return
                started = time.perf_counter()
                try:
                    reply = session.post(url + "/invocations", data=bodies[i], timeout=120,
                                         headers={"Content-Type": "application/json"})
                    elapsed = time.perf_counter() - started
                    problem = (f"HTTP {reply.status_code}: {reply.text[:200]}" if reply.status_code != 200 else
                               next((a["error"] for a in reply.json()["predictions"] if a["status"] == "error"), None))
                except requests.RequestException as exc:
                    elapsed, problem = time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - started


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def in_process(workdir: Path, photo: bytes, repeats: int) -> dict:
    """The same photo through the model alone and through the whole service, without HTTP."""
    import torch
    from mlflow.artifacts import download_artifacts

    from sicot import tracking
    from sicot.config import load_params
    from sicot.serving import Recognition

    tracking.setup()
    model_file = str(next(Path(download_artifacts("models:/sicot@champion", dst_path=str(workdir / "champion")))
                          .rglob("model.pt")))
    serve = load_params(REPO / "params.yaml").serve
    service = Recognition(model_file, str(workdir / "index_store"), top_k=serve.top_k, min_score=serve.min_score,
                          max_images=serve.max_images, max_pixels=serve.max_pixels,
                          min_similarity=serve.min_similarity)
    model = service.model
    x = model.prepare([photo], max_pixels=serve.max_pixels)
    for _ in range(20):  # warm-up
        service.recognise([photo])
    return {"torch_threads": torch.get_num_threads(),
            "topk_forward": percentiles(timed(lambda: model.topk(x, serve.top_k), repeats)),
            "prepare": percentiles(timed(lambda: model.prepare([photo], max_pixels=serve.max_pixels), repeats)),
            "recognise": percentiles(timed(lambda: service.recognise([photo]), repeats)),
            "new_arrival_skus": len(service.arrivals) if service.arrivals else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sicot-bench", help="holds mlflow.db, the index and the data")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sequential", type=int, default=200, help="requests sent one at a time")
    parser.add_argument("--repeats", type=int, default=300, help="in-process timings of each kind")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    os.chdir(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    prepared = workdir / "data" / "prepared"
    records = [json.loads(line) for line in (prepared / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    photos = [(prepared / r["image"]).read_bytes() for r in records]
    body = lambda photo: json.dumps({"dataframe_split": {"columns": ["image"], "data": [[  # noqa: E731
        base64.b64encode(photo).decode("ascii")]]}}).encode()

    started = time.perf_counter()
    proc, url = start_server(workdir, args.workers)
    ready = time.perf_counter() - started
    try:
        fire(url, [body(p) for p in photos[:20]], 1)  # warm-up
        latencies, errors, wall = fire(url, [body(photos[i % len(photos)]) for i in range(args.requests)],
                                       args.clients)
        sequential, seq_errors, _ = fire(url, [body(photos[0])] * args.sequential, 1)
    finally:
        stop_server(proc)
    result = {
        "server": {"ready_seconds": round(ready, 1), "workers": args.workers},
        "concurrent": {"clients": args.clients, "requests": args.requests, "errors": len(errors),
                       "first_errors": errors[:3], "requests_per_second": round(args.requests / wall, 1),
                       **percentiles(latencies)},
        "sequential_same_photo": {"errors": len(seq_errors), **percentiles(sequential)},
        "in_process_same_photo": in_process(workdir, photos[0], args.repeats),
        "photo_bytes": len(photos[0]),
    }
    (workdir / "serving_load.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
