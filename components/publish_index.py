"""Publish the product index for the champion model: catalog embeddings in shards, then an atomic switch.

The champion (or `publish.model_version`) embeds every catalog image (on GPU when present); the SKU
table and embeddings go to a new immutable version under `paths.index` (a folder or `s3://` prefix),
and `index/CURRENT` moves to it only when every shard is complete (see `sicot.index`).

- `publish.shard=-1` (default): build every shard in this process, then publish.
- `publish.shard=k`: build shard k only (one Kubernetes Job index / one Prefect task each).
- `--merge`: check the shards, write the manifest and switch CURRENT.
"""
from __future__ import annotations

import functools
import sys
import time

from sicot import index, storage, tracking
from sicot.config import Params


def champion_version(name: str) -> str:
    version = tracking.alias_version(name, "champion")
    if version is None:
        raise LookupError(f"registered model {name!r} has no champion yet: run promote_model first")
    return str(version.version)


@functools.cache
def _model_file(name: str, version: str) -> str:
    return str(next(tracking.registered_model_dir(name, version).rglob("model.pt")))


def _embedder(model_file: str):
    import torch

    from sicot.model.recognizer import Recognizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Recognizer.load(model_file, map_location=device)

    @torch.no_grad()
    def embed(images: list[bytes]):
        return model.embed(model.prepare(images).to(device)).float().cpu().numpy()

    return model, embed


def run(params: Params, merge: bool = False) -> dict:
    from sicot.data.prepared import load_prepared

    cfg, root, name = params.publish, params.paths.index, params.promote.model_name
    # Shards built in separate pods pin one version, so a champion moving mid-publish cannot mix models.
    number = cfg.model_version or champion_version(name)
    model_file, model_version = _model_file(name, number), f"{name}-v{number}"
    manifest = load_prepared(params.paths.prepared)
    version = index.version_id(model_version, manifest.catalog, cfg.shards)
    out = index.version_uri(root, version)
    model_uri = f"models:/{name}/{number}"
    grace = cfg.gc_grace_hours * 3600
    if storage.is_s3(root):  # fail before hours of GPU work, not at the switch
        storage.check_conditional_writes(storage.bucket_of(root))
    if merge:
        return _said(index.publish(root, version, cfg.shards, cfg.keep_versions, model_uri=model_uri,
                                   gc_grace_s=grace))

    model, embed = _embedder(model_file)
    read = lambda record: storage.read_bytes(manifest.image_uri(record))  # noqa: E731
    classes = {sku: i for i, sku in enumerate(model.classes)}
    if cfg.shard >= 0:
        shard = index.build_shard(manifest.catalog, cfg.shard, cfg.shards, embed, read, classes, out, cfg.batch_size)
        print(f"publish_index: shard {cfg.shard} of {cfg.shards}: {shard['count']} SKUs "
              f"{'already built' if shard['skipped'] else 'embedded'} -> {index.shard_uri(out, cfg.shard)}",
              file=sys.stderr)
        return shard
    _, token = index.read_current(root)  # read before building: a publisher that finishes first wins
    with tracking.step_run("publish_index", params, ("publish",)):
        start = time.perf_counter()
        shards = index.build_all(manifest.catalog, cfg.shards, embed, read, classes, out, cfg.batch_size)
        built = sum(s["count"] for s in shards if not s["skipped"])
        seconds = time.perf_counter() - start
        result = index.publish(root, version, cfg.shards, cfg.keep_versions, model_uri=model_uri, expected=token,
                               gc_grace_s=grace)
        tracking.log_metrics({"index_skus": result["skus"], "index_build_seconds": seconds,
                              "index_skus_per_second": built / seconds if built else 0.0})
        tracking.set_tags({"index_version": version})
    return _said(result)


def _said(published: dict) -> dict:
    state = "now" if published["switched"] else "already"
    print(f"publish_index: {published['skus']} SKUs -> {published['uri']} ({state} CURRENT)", file=sys.stderr)
    return published


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli

    cli(run, __doc__.splitlines()[0], argv, sections=("publish", "promote", "paths"),
        extra=lambda p: p.add_argument("--merge", action="store_true",
                                       help="publish already built shards: manifest + CURRENT switch"))


if __name__ == "__main__":
    main()
