"""The command line every component shares: `--params FILE` and repeated `--set section.key=value`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from sicot.config import ConfigError, Params, load_params, local_params_file


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", help="params file; must exist when given (default: ./params.yaml if present, "
                                     "else the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter; repeatable, e.g. --set train.mode=baseline")
    p.add_argument("--outputs", metavar="FILE", help="also write the step's outputs (JSON) to FILE")
    return p


def main(run: Callable[..., Any], description: str, argv: list[str] | None = None,
         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse the shared options (plus `extra` ones, passed to `run` as keywords), run, print outputs as JSON."""
    p = parser(description)
    if extra:
        extra(p)
    args = vars(p.parse_args(argv))
    outputs_file = args.pop("outputs", None)
    try:
        params: Params = load_params(args.pop("params") or local_params_file(), args.pop("overrides"))
    except ConfigError as exc:
        p.error(str(exc))
    outputs = run(params, **args)
    text = json.dumps(outputs, indent=2, ensure_ascii=False, default=str)
    if outputs_file and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one writer
        Path(outputs_file).write_text(text + "\n", encoding="utf-8")
    print(text)
    sys.stdout.flush()
