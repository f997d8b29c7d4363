"""Load on the served champion: requests/s, latency percentiles, memory per worker under the largest
allowed images, and what the service adds to the model.

Serves `models:/sicot@champion` from the embedded MLflow store in `--workdir` (as left there by
`benchmarks/new_arrivals.py`: a trained model, registered and with its index published) on loopback
with `python -m sicot.serving_app` (`--server app`, what the Kubernetes Deployment runs) or
`mlflow models serve --env-manager local` (`--server mlflow`), `--workers` worker processes, then:

1. `--requests` requests from `--clients` concurrent clients (threads, one keep-alive HTTP session each),
   one test photo per request in a `dataframe_split` body; any non-200 reply or per-image error counts
   as an error.
2. `--sequential` requests one at a time: the latency of a request that does not wait behind others.
3. For each kind of image as large as `serve.max_pixels` allows (4000x4000): a one-colour PNG (tens of
   kB on the wire, 64 MB as RGBA pixels), a photo-like JPEG and the same JPEG progressive,
   `--large-requests` one-image requests from `--clients` clients. Meanwhile every process of the
   server is sampled every 50 ms: the largest RSS of each worker, and the largest PSS summed over all
   of them (shared library pages counted once, as the pod's memory limit counts them).
4. In this process, on the same photo: `Recognizer.topk` on the already prepared image (the raw
   forward pass), `Recognizer.prepare` (decode + resize), and `Recognition.recognise` (all the service
   does: decode, forward, new-arrival search, facts), each timed `--repeats` times.

    python benchmarks/serving_load.py [--workdir /tmp/sicot-bench] [--server app] [--workers 2] [--clients 8]
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


def start_server(workdir: Path, server: str, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = ([sys.executable, "-m", "sicot.serving_app", "--model", "models:/sicot@champion", "--port", str(port)]
           if server == "app" else
           [str(BIN / "mlflow"), "models", "serve", "-m", "models:/sicot@champion", "--env-manager", "local",
            "-p", str(port)])
    log = open(workdir / "serve.log", "ab")
    proc = subprocess.Popen(cmd + ["--host", "127.0.0.1", "--workers", str(workers)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {workdir / 'serve.log'}")
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


class MemorySampler(threading.Thread):
    """Samples every process of the server every `interval` seconds until stopped: the largest RSS of each
    and the largest PSS summed over all (what the pod's memory limit sees, near enough)."""

    def __init__(self, server: subprocess.Popen, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        root = psutil.Process(server.pid)
        self.processes = [root] + root.children(recursive=True)
        self.interval, self.done = interval, threading.Event()
        self.max_rss = {p.pid: 0 for p in self.processes}
        self.max_pss_sum = 0

    def workers(self) -> list:
        """uvicorn's worker processes (spawned); with one worker, the process that serves."""
        spawned = [p for p in self.processes if "spawn_main" in " ".join(p.cmdline())]
        return spawned or [max(self.processes, key=lambda p: p.memory_info().rss)]

    def sample(self) -> None:
        pss = 0
        for p in self.processes:
            try:
                info = p.memory_full_info()
            except Exception:  # a helper process that has exited
                continue
            self.max_rss[p.pid] = max(self.max_rss[p.pid], info.rss)
            pss += info.pss
        self.max_pss_sum = max(self.max_pss_sum, pss)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()


def large_images() -> dict[str, bytes]:
    """One image of each kind at 4000x4000 = 16,000,000 pixels: serve.max_pixels, the largest allowed."""
    from tests.hostile_input import flat_png, photo_like_jpeg

    return {"png_flat_4000x4000": flat_png(4000, 4000), "jpeg_4000x4000": photo_like_jpeg(4000, 4000),
            "jpeg_progressive_4000x4000": photo_like_jpeg(4000, 4000, progressive=True)}


def under_large_images(url: str, server: subprocess.Popen, body, clients: int, requests: int) -> dict:
    """Per kind of largest allowed image: RSS per worker before and while `requests` one-image requests
    of it are sent by `clients` clients."""
    mib = lambda n: round(n / 2**20)  # noqa: E731
    results = {}
    for kind, image in large_images().items():
        sampler = MemorySampler(server)
        workers = sampler.workers()
        at_start = [mib(p.memory_info().rss) for p in workers]
        sampler.start()
        try:
            latencies, errors, wall = fire(url, [body(image)] * requests, clients)
        finally:
            sampler.stop()
        results[kind] = {"image_bytes": len(image), "requests": requests, "errors": len(errors),
                         "first_errors": errors[:3], "requests_per_second": round(requests / wall, 2),
                         **percentiles(latencies), "rss_mib_per_worker_at_start": at_start,
                         "max_rss_mib_per_worker": [mib(sampler.max_rss[p.pid]) for p in workers],
                         "max_pss_mib_all_server_processes": mib(sampler.max_pss_sum)}
    return {"clients": clients, "workers": len(workers), **results}


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
    from sicot.serving import Recognition, recognition_limits

    tracking.setup()
    model_file = str(next(Path(download_artifacts("models:/sicot@champion", dst_path=str(workdir / "champion")))
                          .rglob("model.pt")))
    serve = load_params(REPO / "params.yaml").serve
    service = Recognition(model_file, str(workdir / "index_store"), **recognition_limits(serve))
    model = service.model
    x = model.prepare([photo], max_pixels=serve.max_pixels)
    for _ in range(20):  # warm-up
        service.recognise([photo])
    return {"torch_threads": torch.get_num_threads(),
            "topk_forward": percentiles(timed(lambda: model.topk(x, serve.top_k), repeats)),
            "prepare": percentiles(timed(lambda: model.prepare([photo], max_pixels=serve.max_pixels), repeats)),
            "recognise": percentiles(timed(lambda: service.recognise([photo]), repeats)),
            "new_arrival_skus": len(service.products.arrivals) if service.products.arrivals else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sicot-bench", help="holds mlflow.db, the index and the data")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sequential", type=int, default=200, help="requests sent one at a time")
    parser.add_argument("--large-requests", type=int, default=32,
                        help="requests of each kind of largest allowed image (one image per request; 0: skip)")
    parser.add_argument("--repeats", type=int, default=300, help="in-process timings of each kind")
    parser.add_argument("--server", choices=("app", "mlflow"), default="app",
                        help="app: python -m sicot.serving_app (default); mlflow: mlflow models serve")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of the server (default: 2, as the pod)")
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
    proc, url = start_server(workdir, args.server, args.workers)
    ready = time.perf_counter() - started
    try:
        fire(url, [body(p) for p in photos[:20]], 1)  # warm-up
        latencies, errors, wall = fire(url, [body(photos[i % len(photos)]) for i in range(args.requests)],
                                       args.clients)
        sequential, seq_errors, _ = fire(url, [body(photos[0])] * args.sequential, 1)
        large = (under_large_images(url, proc, body, args.clients, args.large_requests) if args.large_requests
                 else None)
    finally:
        stop_server(proc)
    result = {
        "server": {"kind": args.server, "ready_seconds": round(ready, 1), "workers": args.workers},
        "concurrent": {"clients": args.clients, "requests": args.requests, "errors": len(errors),
                       "first_errors": errors[:3], "requests_per_second": round(args.requests / wall, 1),
                       **percentiles(latencies)},
        "sequential_same_photo": {"errors": len(seq_errors), **percentiles(sequential)},
        "largest_allowed_images": large,
        "in_process_same_photo": in_process(workdir, photos[0], args.repeats),
        "photo_bytes": len(photos[0]),
    }
    (workdir / "serving_load.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
