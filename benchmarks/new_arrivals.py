"""How well the service finds new arrivals: catalog SKUs the classifier never trained on.

Builds the demo world with `data.holdout_skus` catalog-only SKUs (their photos go to holdout.jsonl),
trains, evaluates, registers the champion and publishes the index with the pipeline's own steps, in
`--workdir` (its `mlflow.db` and index are what `benchmarks/serving_load.py` serves). Then every holdout
photo goes through `sicot.serving.Recognition`, and the nearest new-arrival SKU by embedding cosine is
compared with the truth: top-1 and top-3 accuracy among the new arrivals. The same search on photos
of trained SKUs shows how often a threshold would suggest a new arrival where there is none.

    python benchmarks/new_arrivals.py [--workdir /tmp/sicot-bench] [--set section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def deploy(workdir: Path, overrides: list[str]) -> dict:
    """The pipeline's steps in `workdir`; returns the params and timings."""
    from components import evaluate_model, prepare_data, promote_model, publish_index, train_model, train_word2vec
    from sicot.config import load_params

    params = load_params(REPO / "params.yaml", [
        f"paths.raw={workdir / 'data/raw'}", f"paths.prepared={workdir / 'data/prepared'}",
        f"paths.word2vec={workdir / 'models/word2vec'}", f"paths.models={workdir / 'models'}",
        f"paths.reports={workdir / 'reports'}", f"paths.index={workdir / 'index_store'}",
        "data.holdout_skus=20", *overrides])
    seconds = {}
    steps = [("prepare_data", lambda: prepare_data.run(params, track=False)),
             ("train_word2vec", lambda: train_word2vec.run(params, track=False)),
             ("train_model", lambda: train_model.run(params, track=False)),
             ("evaluate_model", lambda: evaluate_model.run(params, track=False)),
             ("promote_model", lambda: promote_model.run(params)),
             ("publish_index", lambda: publish_index.run(params))]
    results = {}
    for name, step in steps:
        if name == "train_word2vec" and params.train.mode != "sicot":
            continue
        started = time.perf_counter()
        results[name] = step()
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
    return {"params": params, "seconds": seconds, "results": results}


def index_build_rate() -> dict:
    """What `publish_index` logged about its build (SKUs, seconds, SKUs/s)."""
    import mlflow

    from sicot import tracking

    tracking.setup()
    run = mlflow.search_runs(filter_string="tags.step = 'publish_index'", order_by=["start_time DESC"],
                             max_results=1, output_format="list")[0]
    m = run.data.metrics
    return {"skus": int(m["index_skus"]), "seconds": round(m["index_build_seconds"], 2),
            "skus_per_second": round(m["index_skus_per_second"], 1)}


def measure(params) -> dict:
    from sicot.data.prepared import load_prepared
    from sicot.data.shards import split_images
    from sicot.serving import Recognition

    prepared = load_prepared(params.paths.prepared)
    holdout, test = prepared.holdout, prepared.test
    model_file = str(Path(params.paths.models) / params.train.mode / "model.pt")
    service = Recognition(model_file, params.paths.index, top_k=3, min_score=0.0, min_similarity=-1.0,
                          max_images=10**6)

    def nearest(split: str) -> list[list[dict]]:
        images = [data for _, _, data in split_images(prepared.root, prepared.shards[split])]
        return [a["new_arrivals"] for a in service.recognise(images)]

    started = time.perf_counter()
    found = nearest("holdout")
    seconds = time.perf_counter() - started
    top1 = sum(f[0]["sku"] == r.sku for r, f in zip(holdout, found)) / len(holdout)
    top3 = sum(r.sku in {x["sku"] for x in f} for r, f in zip(holdout, found)) / len(holdout)
    decoys = nearest("test")  # photos of trained SKUs: any suggestion here is a false one
    by_threshold = {}
    for t in THRESHOLDS:
        by_threshold[t] = {
            "holdout_correct_top1_listed": sum(f[0]["sku"] == r.sku and f[0]["score"] >= t
                                               for r, f in zip(holdout, found)) / len(holdout),
            "holdout_anything_listed": sum(f[0]["score"] >= t for f in found) / len(found),
            "trained_photos_with_a_suggestion": sum(f[0]["score"] >= t for f in decoys) / len(decoys)}
    cos = lambda rows: [round(f[0]["score"], 3) for f in rows]  # noqa: E731
    return {"new_arrival_skus": len(service.products.arrivals), "holdout_images": len(holdout),
            "trained_test_images": len(test),
            "top1": round(top1, 4), "top3": round(top3, 4), "chance_top1": round(1 / len(service.products.arrivals), 4),
            "holdout_images_per_second": round(len(holdout) / seconds, 1),
            "top1_cosine_holdout_median": sorted(cos(found))[len(found) // 2],
            "top1_cosine_trained_median": sorted(cos(decoys))[len(decoys) // 2],
            "by_threshold": by_threshold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sicot-bench", help="where data, models, mlflow.db and the index go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the embedded MLflow store (mlflow.db, mlartifacts/) lives here
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    deployed = deploy(workdir, args.overrides)
    result = {"seconds": deployed["seconds"], "index_build": index_build_rate(), **measure(deployed["params"])}
    (workdir / "new_arrivals.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
