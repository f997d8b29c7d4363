"""The params schema of sicot.config written out for people: params.yaml with each key's help as its
comment, the README's settings table, and the settings part of every step's `--help`.

    python -m sicot.config_docs --markdown   # print the settings table
    python -m sicot.config_docs --write      # rewrite params.yaml (keeping its values) and README.md's table
    python -m sicot.config_docs --check      # exit 1 naming each file that is out of date
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sicot.config import ConfigError, Params, load_params

README_BEGIN = "<!-- settings: generated from sicot/config.py by `python -m sicot.config_docs --write` -->"
README_END = "<!-- /settings -->"
PARAMS_HEADER = """\
# The one configuration file: each step reads its own sections. The values are yours to edit; the keys and
# comments come from sicot/config.py (`python -m sicot.config_docs --write` rewrites them, keeping the values).
# Override a key with `--set section.key=value` (steps) or `-S section.key=value` (dvc exp run).
"""
WIDTH = 118
COMMENT_COLUMN = 32


def sections(names: tuple[str, ...] = ()) -> Iterator[tuple[str, type]]:
    """(name, dataclass) of the params sections `names`, or of every section in file order."""
    defaults = Params()
    for name in names or [f.name for f in dataclasses.fields(Params)]:
        yield name, type(getattr(defaults, name))


def section_doc(kind: type) -> str:
    """The section's docstring as one paragraph."""
    return " ".join(inspect.cleandoc(kind.__doc__ or "").split())


def scalar(value: Any) -> str:
    """A value as params.yaml spells it."""
    if value == "":
        return '""'
    return yaml.safe_dump(value, width=10**6).removesuffix("\n").removesuffix("\n...")


def allowed(key: dataclasses.Field) -> str:
    """`a | b` for choices, else the bounds: `>= 1`, `> 0`, `[0, 1]`, `(0, 1]`."""
    rules = key.metadata
    if rules.get("choices"):
        return " | ".join(rules["choices"])
    low = next(((sign, rules[rule]) for rule, sign in (("ge", "["), ("gt", "(")) if rules.get(rule) is not None), None)
    high = rules.get("le")
    if low and high is not None:
        return f"{low[0]}{low[1]:g}, {high:g}]"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    return f"<= {high:g}" if high is not None else ""


def markdown_table() -> str:
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, kind in sections():
        rows.append(f"| **{name}** | | | | {_cell(section_doc(kind))} |")
        for key in dataclasses.fields(kind):
            rows.append(f"| `{name}.{key.name}` | {key.type} | `{scalar(key.default)}` | {_cell(allowed(key))} | "
                        f"{_cell(key.metadata['help'])} |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")  # `<mode>` would render as an HTML tag


def params_yaml(params: Params) -> str:
    """params.yaml holding `params`' values, each key commented with its help (and choices)."""
    lines = [PARAMS_HEADER.rstrip("\n")]
    values = params.to_dict()
    for name, kind in sections():
        lines += ["", *textwrap.wrap(section_doc(kind), WIDTH, initial_indent="# ", subsequent_indent="# "), f"{name}:"]
        for key in dataclasses.fields(kind):
            setting = f"  {key.name}: {scalar(values[name][key.name])}"
            comment = (f"[{allowed(key)}] " if key.metadata.get("choices") else "") + key.metadata["help"]
            column = max(COMMENT_COLUMN, len(setting) + 1)
            wrapped = textwrap.wrap(comment, WIDTH - column - 2, subsequent_indent="  ")
            lines.append(f"{setting.ljust(column)}# {wrapped[0]}")
            lines += [f"{'':{column}}# {more}" for more in wrapped[1:]]
    return "\n".join(lines) + "\n"


def help_epilog(names: tuple[str, ...]) -> str:
    """The settings of sections `names` for a step's `--help`: key, type, default, allowed values, help."""
    width = min(WIDTH, shutil.get_terminal_size().columns - 2)  # as argparse wraps the options above
    out = ["settings (--set section.key=value; --params FILE, else ./params.yaml, else these defaults):"]
    for name, kind in sections(names):
        out += ["", *textwrap.wrap(f"{name}: {section_doc(kind)}", width)]
        for key in dataclasses.fields(kind):
            rule = allowed(key)
            out.append(f"  {name}.{key.name}  {key.type}, default {scalar(key.default)}{f', {rule}' if rule else ''}")
            out += textwrap.wrap(key.metadata["help"], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)


def readme_with_table(text: str, where: str = "README.md") -> str:
    """`text` with the part between the settings markers replaced by the current table."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ConfigError(f"{where}: no settings table markers ({README_BEGIN} ... {README_END})")
    return text[:begin + len(README_BEGIN)] + "\n\n" + markdown_table() + "\n" + text[end:]


def generated(params_file: Path, readme: Path) -> dict[Path, str]:
    """What each file should hold: params.yaml keeps its own values (not the environment's)."""
    values = load_params(params_file if params_file.is_file() else None, environ={})
    return {params_file: params_yaml(values),
            readme: readme_with_table(readme.read_text(encoding="utf-8"), str(readme))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the settings table")
    action.add_argument("--write", action="store_true", help="rewrite the params file and the README's table")
    action.add_argument("--check", action="store_true", help="exit 1 when either file differs from its generated form")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (default: params.yaml)")
    p.add_argument("--readme", type=Path, default=Path("README.md"), help="the README (default: README.md)")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown_table(), end="")
        return 0
    try:
        files = generated(args.params, args.readme)
    except ConfigError as exc:
        p.error(str(exc))
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path}: out of date; run python -m sicot.config_docs --write", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(files[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
