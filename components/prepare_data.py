"""Prepare the dataset: generate the demo world or take a dataset directory, validate it, publish it.

- `data.source: synthetic` generates the long-tailed demo world `data.world` into `paths.raw` first; any other value
  is a dataset directory or `s3://` prefix in the contract's format (docs/architecture.md#dataset-contract).
- Every record is checked (`data.on_bad_record`: `error` stops listing every problem, exit code 2;
  `skip` drops bad records and lists them in reports/dropped_records.jsonl).
- The valid dataset replaces `paths.prepared` atomically (its images in WebDataset shards of `data.shard_images`
  images / `data.shard_mb` MB, sicot.data.prepared); a failed run changes nothing.
- reports/data_stats.json and reports/long_tail.png describe it; the numbers also go to MLflow.
"""
from __future__ import annotations

import json
import sys
import time

from sicot import storage
from sicot.config import Params
from sicot.data.longtail import class_counts, data_stats, plot_long_tail
from sicot.data.manifest import DatasetError, load_manifest
from sicot.data.prepared import write_prepared


def _log_to_mlflow(params: Params, stats: dict, reports: str) -> None:
    from sicot import tracking

    with tracking.step_run("prepare_data", params, sections=("data", "paths"), reads_data=False):
        tracking.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))}
                             | {f"images_{k}": v for k, v in stats["images"].items()}
                             | {"title_vocab_tail_shared_with_head": stats["title_vocab"]["tail_shared_with_head"]})
        for name in ("data_stats.json", "long_tail.png", "dropped_records.jsonl"):
            tracking.log_file(storage.join(reports, name))


def run(params: Params, track: bool = True) -> dict:
    started = time.perf_counter()
    data, paths = params.data, params.paths
    source = data.source
    generated = None
    if source == "synthetic":
        from sicot.data.worlds import generate

        generated = generate(paths.raw, data)
        source = paths.raw
    prefixes = [p.strip() for p in data.image_prefixes.split(",") if p.strip()]
    manifest = load_manifest(source, on_bad_record=data.on_bad_record, image_prefixes=prefixes)
    with storage.atomic_dir(paths.prepared) as tmp:
        write_prepared(manifest, tmp, data.shard_images, data.shard_mb)

    threshold = params.evaluate.head_threshold
    stats = data_stats(manifest, threshold)
    reports = paths.reports
    storage.write_text(storage.join(reports, "data_stats.json"), json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
    plot_long_tail(class_counts(manifest.train), threshold, storage.join(reports, "long_tail.png"))
    storage.write_text(storage.join(reports, "dropped_records.jsonl"),
                       "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in manifest.dropped))
    if track:
        _log_to_mlflow(params, stats, reports)

    seconds = time.perf_counter() - started
    print(f"prepare_data: {stats['classes']} classes, {stats['images']['train']}/{stats['images']['val']}/"
          f"{stats['images']['test']} train/val/test images, imbalance {stats['imbalance']:.0f}:1, "
          f"{stats['head_classes']} head / {stats['tail_classes']} tail, {len(manifest.dropped)} dropped, "
          f"{seconds:.1f}s -> {paths.prepared}", file=sys.stderr)
    return {"prepared": paths.prepared, "data_stats": storage.join(reports, "data_stats.json"),
            "classes": stats["classes"], "dropped": len(manifest.dropped), "source": source,
            "generated": generated, "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    try:
        cli_main(run, __doc__.splitlines()[0], argv, sections=("data", "evaluate", "paths"))
    except DatasetError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
