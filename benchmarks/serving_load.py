"""Load on the served champion: requests/s, latency percentiles, memory per worker under the largest
allowed images, and what the service adds to the model.

Serves the champion of the embedded MLflow store in `--workdir` (as left there by
`benchmarks/new_arrivals.py`: a trained model, registered and with its index published) on loopback
with `python -m sicot.serving_app` (`--server app`, what the Kubernetes Deployment runs) or
`mlflow models serve --env-manager local` (`--server mlflow`), `--workers` worker processes: the
champion's model.pt logged again from code with this checkout's `serve.*` (and `--set` overrides). With
`--backbone` (e.g. resnet50 --image-size 224) it serves instead a model of that architecture with
random weights and the champion's classes, logged from code like the champion, against the same index
(throughput does not depend on the weights). Then:

1. For each count in `--clients`: that many concurrent clients (threads, one keep-alive HTTP session
   each) send requests for `--seconds`, one test photo per request in a `dataframe_split` body; any
   non-200 reply or per-image error counts as an error. Besides requests/s and latency: the server's
   CPU time per request (all its processes, user + system), which a busy machine disturbs less.
2. One client for `--seconds`: the latency of a request that does not wait behind others.
3. For each kind of image as large as `serve.max_pixels` allows (4000x4000): a one-colour PNG (tens of
   kB on the wire, 64 MB as RGBA pixels), a photo-like JPEG and the same JPEG progressive,
   `--large-requests` one-image requests from the first count of `--clients`. Meanwhile every process
   of the server is sampled every 50 ms: the largest RSS of each worker, and the largest PSS summed
   over all of them (shared library pages counted once, as the pod's memory limit counts them).
4. In this process, on the same photos: the model alone on batches of prepared images (images/s by
   batch size, up to `serve.max_batch`: the most any batching can get), `Recognizer.prepare` (decode +
   resize), and `Recognition.recognise` of one photo (all the service does: decode, forward, new-arrival
   search, facts), each timed repeatedly for about `--timing-seconds`.

Every phase is bounded in time, not in requests, so a slow model or a busy machine costs no more wall
time, only fewer samples.

    python benchmarks/serving_load.py [--workdir /tmp/sicot-bench] [--server app] [--workers 2] [--clients 8,32]
        [--backbone resnet50 --image-size 224]
"""
from __future__ import annotations

import argparse
import base64
import json
import math
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


def start_server(workdir: Path, model_uri: str, server: str, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "SICOT_INDEX": str(workdir / "index_store"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = ([sys.executable, "-m", "sicot.serving_app", "--model", model_uri, "--port", str(port)]
           if server == "app" else
           [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
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


def fire(url: str, bodies: list[bytes], clients: int, seconds: float | None = None
         ) -> tuple[list[float], list[str], float]:
    """`clients` at a time, send the bodies in turn: each once, or round and round until `seconds` have
    passed (a request in flight then still finishes); (latencies, errors, wall seconds)."""
    import itertools

    import requests

    latencies, errors, lock = [], [], threading.Lock()
    next_body = iter(range(len(bodies))) if seconds is None else itertools.cycle(range(len(bodies)))
    deadline = math.inf if seconds is None else time.perf_counter() + seconds

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
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


def server_cpu_seconds(server: subprocess.Popen) -> float:
    """User + system CPU time of the server's processes so far: on a machine shared with other work, the
    cost of a request in CPU time is steadier than the requests per wall second."""
    import psutil

    root = psutil.Process(server.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


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


def timed(fn, seconds: float, at_least: int = 3) -> list[float]:
    """Durations of `fn()` called again and again for about `seconds` (at least `at_least` times)."""
    out, until = [], time.perf_counter() + seconds
    while len(out) < at_least or time.perf_counter() < until:
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def served_model(workdir: Path, params, backbone: str | None, image_size: int) -> tuple[str, str]:
    """(model URI to serve, local model.pt): the champion's model, or a random-weight `backbone` at
    `image_size` with the champion's classes and feature size, logged from code with `params.serve`."""
    import mlflow
    import torch
    from mlflow.artifacts import download_artifacts

    from sicot import tracking
    from sicot.model.backbone import create_backbone
    from sicot.model.recognizer import Recognizer
    from sicot.serving import log_service

    tracking.setup()
    champion = str(next(Path(download_artifacts("models:/sicot@champion", dst_path=str(workdir / "champion")))
                        .rglob("model.pt")))
    path = champion
    if backbone:
        classes, feature_dim = (lambda m: (m.classes, m.arch["feature_dim"]))(Recognizer.load(champion))
        net, dim = create_backbone(backbone, out_dim=feature_dim)
        path = str(workdir / "models" / f"random_{backbone}_{image_size}" / "model.pt")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Recognizer(net, torch.randn(len(classes), dim), classes, image_size,
                   {"backbone": backbone, "feature_dim": dim}).save(path)
    with mlflow.start_run(run_name=f"serving_load {backbone or 'champion'}"):
        return log_service(path, params).model_uri, path


def in_process(model_file: str, index_root: str, photos: list[bytes], serve, seconds: float) -> dict:
    """The model alone on batches of prepared photos, and the whole service on one photo, without HTTP."""
    import torch

    from sicot.serving import Recognition, recognition_limits

    service = Recognition(model_file, index_root, **recognition_limits(serve))
    model = service.model
    for _ in range(3):  # warm-up
        service.recognise(photos[:1])
    forward = {}
    for size in sorted({1, 8, serve.max_batch}):
        x = model.prepare([photos[i % len(photos)] for i in range(size)], max_pixels=serve.max_pixels)
        took = percentiles(timed(lambda x=x: model.topk_and_embed(x, serve.top_k), seconds))
        forward[f"batch_{size}"] = {**took, "images_per_second": round(size / (took["p50_ms"] / 1000), 1)}
    return {"torch_threads": torch.get_num_threads(),
            "model": {"backbone": model.arch["backbone"], "image_size": model.image_size},
            "forward_by_batch_size": forward,
            "prepare": percentiles(timed(lambda: model.prepare(photos[:1], max_pixels=serve.max_pixels), seconds)),
            "recognise": percentiles(timed(lambda: service.recognise(photos[:1]), seconds)),
            "new_arrival_skus": len(service.products.arrivals) if service.products.arrivals else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sicot-bench", help="holds mlflow.db, the index and the data")
    parser.add_argument("--clients", default="8,32", type=lambda text: [int(n) for n in text.split(",")],
                        help="concurrent client counts, each a load phase (default: 8,32)")
    parser.add_argument("--seconds", type=float, default=20, help="length of each load phase (default: 20)")
    parser.add_argument("--large-requests", type=int, default=32,
                        help="requests of each kind of largest allowed image (one image per request; 0: skip)")
    parser.add_argument("--timing-seconds", type=float, default=5, help="in-process timing of each kind")
    parser.add_argument("--server", choices=("app", "mlflow"), default="app",
                        help="app: python -m sicot.serving_app (default); mlflow: mlflow models serve")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of the server (default: 2, as the pod)")
    parser.add_argument("--backbone", help="serve a random-weight model of this backbone instead of the champion")
    parser.add_argument("--image-size", type=int, default=224, help="the --backbone model's input size (default: 224)")
    parser.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="a params override for the served model's config, e.g. serve.max_wait_ms=0")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    os.chdir(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    from sicot.config import load_params

    index_root = str(workdir / "index_store")
    params = load_params(REPO / "params.yaml", [f"paths.index={index_root}", *args.set])
    prepared = workdir / "data" / "prepared"
    records = [json.loads(line) for line in (prepared / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    photos = [(prepared / r["image"]).read_bytes() for r in records]
    body = lambda photo: json.dumps({"dataframe_split": {"columns": ["image"], "data": [[  # noqa: E731
        base64.b64encode(photo).decode("ascii")]]}}).encode()
    model_uri, model_file = served_model(workdir, params, args.backbone, args.image_size)

    load_at_start = os.getloadavg()[0]  # other work on the machine slows every number here
    started = time.perf_counter()
    proc, url = start_server(workdir, model_uri, args.server, args.workers)
    ready = time.perf_counter() - started
    concurrent = []
    try:
        fire(url, [body(p) for p in photos[:2 * args.workers]], args.workers)  # warm-up
        for clients in args.clients:
            cpu_before = server_cpu_seconds(proc)
            latencies, errors, wall = fire(url, [body(p) for p in photos], clients, args.seconds)
            cpu = server_cpu_seconds(proc) - cpu_before
            concurrent.append({"clients": clients, "requests": len(latencies), "errors": len(errors),
                               "first_errors": errors[:3], "requests_per_second": round(len(latencies) / wall, 1),
                               **percentiles(latencies), "server_cpu_seconds": round(cpu, 1),
                               "server_cpu_ms_per_request": round(1000 * cpu / len(latencies), 1)})
        sequential, seq_errors, _ = fire(url, [body(photos[0])], 1, args.seconds)
        large = (under_large_images(url, proc, body, args.clients[0], args.large_requests) if args.large_requests
                 else None)
    finally:
        stop_server(proc)
    result = {
        "server": {"kind": args.server, "model": model_uri, "ready_seconds": round(ready, 1), "workers": args.workers,
                   "overrides": args.set},
        "concurrent": concurrent,
        "sequential_same_photo": {"errors": len(seq_errors), **percentiles(sequential)},
        "largest_allowed_images": large,
        "in_process": in_process(model_file, index_root, photos, params.serve, args.timing_seconds),
        "photo_bytes": len(photos[0]),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": [load_at_start, os.getloadavg()[0]]},
    }
    name = f"serving_load_{args.backbone}_{args.image_size}.json" if args.backbone else "serving_load.json"
    (workdir / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
