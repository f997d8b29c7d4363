"""Write a sharded model (model.pt + model-classifier-<r>-of-<N>.pt) as one model file, W inside.

    python -m sicot.model.consolidate models/sicot/model.pt model-one-file.pt

Only for a W that fits this process's memory: evaluation and serving read a sharded model as it is.
Either location may be a local path or an s3:// URI.
"""
from __future__ import annotations

import argparse
import sys

from sicot.model.recognizer import Recognizer, RecognizerError


def consolidate(src: str, dst: str) -> None:
    Recognizer.load(src).save(dst)  # without a memory limit, W is loaded whole


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="model.pt of the sharded model (its shards beside it)")
    p.add_argument("dst", help="where to write the one-file model")
    args = p.parse_args(argv)
    try:
        consolidate(args.src, args.dst)
    except RecognizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
