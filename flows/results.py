"""Where Prefect keeps flow and task results on a cluster: a RemoteFileSystem block on S3, so a result
written in one pod (a training's outputs) is read in another (the pipeline that waits for it).

Create it once: `python -m flows.results s3://bucket/prefect-results`; pods select it through the
ConfigMap (`PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=remote-file-system/sicot-results`,
`PREFECT_RESULTS_PERSIST_BY_DEFAULT=true`). Credentials stay in the pods' environment (the `sicot-s3`
Secret); only the endpoint of an S3-compatible store is kept in the block.
"""
from __future__ import annotations

import argparse
import os

BLOCK = "sicot-results"


def create(basepath: str, name: str = BLOCK) -> str:
    from prefect.filesystems import RemoteFileSystem

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    settings = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    RemoteFileSystem(basepath=basepath, settings=settings).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("basepath", help="e.g. s3://sicot/prefect-results")
    p.add_argument("--name", default=BLOCK, help=f"block name (default {BLOCK})")
    args = p.parse_args(argv)
    print(create(args.basepath, args.name))


if __name__ == "__main__":
    main()
