"""The command line every component shares: `--params FILE` and repeated `--set section.key=value`.

`--help` lists every key of the sections the step reads, from their definitions in sicot/config.py.
With `SICOT_RECORD_READS=FILE` in the environment a step also appends to FILE, as one JSON line, the
params keys it read and the project modules it imported: tests/test_dvc.py holds them against the
step's DVC stage.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sicot.config import ConfigError, Params, load_params, local_params_file, recording_reads
from sicot.config_docs import help_epilog

RECORD_READS = "SICOT_RECORD_READS"
PROJECT = Path(__file__).resolve().parents[1]


def parser(description: str, sections: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=help_epilog(sections) if sections else None)
    p.add_argument("--params", help="params file; must exist when given (default: ./params.yaml if present, "
                                     "else the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter; repeatable, e.g. --set train.mode=baseline")
    p.add_argument("--outputs", metavar="FILE", help="also write the step's outputs (JSON) to FILE")
    return p


def main(run: Callable[..., Any], description: str, argv: list[str] | None = None,
         extra: Callable[[argparse.ArgumentParser], None] | None = None, sections: tuple[str, ...] = ()) -> None:
    """Parse the shared options (plus `extra` ones, passed to `run` as keywords), run, print outputs as JSON.
    `sections`: the params sections the step reads, listed key by key in `--help`."""
    p = parser(description, sections)
    if extra:
        extra(p)
    args = vars(p.parse_args(argv))
    outputs_file = args.pop("outputs", None)
    try:
        params: Params = load_params(args.pop("params") or local_params_file(), args.pop("overrides"))
    except ConfigError as exc:
        p.error(str(exc))
    record = os.environ.get(RECORD_READS)
    with recording_reads() if record else contextlib.nullcontext(set()) as reads:
        outputs = run(params, **args)
    if record:
        write_record(record, reads, sections)
    text = json.dumps(outputs, indent=2, ensure_ascii=False, default=str)
    if outputs_file and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one writer
        Path(outputs_file).write_text(text + "\n", encoding="utf-8")
    print(text)
    sys.stdout.flush()


def write_record(path: str, reads: set[str], sections: tuple[str, ...]) -> None:
    """One JSON line per process (under torchrun each rank appends its own): the DVC stage running it
    (DVC sets DVC_STAGE), the sections its `--help` lists, the keys read and the project modules loaded."""
    modules = set()
    for module in list(sys.modules.values()):
        file = Path(getattr(module, "__file__", None) or "/").resolve()
        if file.is_relative_to(PROJECT) and file.relative_to(PROJECT).parts[0] in ("sicot", "components"):
            modules.add(file.relative_to(PROJECT).as_posix())
    line = {"stage": os.environ.get("DVC_STAGE"), "argv": sys.argv, "sections": list(sections),
            "keys": sorted(reads), "modules": sorted(modules)}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")
