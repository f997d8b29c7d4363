"""Version a step's output directory with DVC: `python -m components.version_data DIR`.

DVC hashes the directory exactly as `dvc add` / `dvc repro` do (so the same data gives the same version
on a laptop and on a cluster), keeps it in the DVC cache and, when `paths.dvc_remote` is set (a folder
or `s3://` URI; `SICOT_DVC_REMOTE` on a cluster), pushes it there. The result is the version's tree URI,
`<remote or cache>/files/md5/ab/cdef….dir`, which every later step reads in place (sicot.storage), so a
pod on another machine reads exactly that version and nothing else.

The work happens in a throw-away DVC project (no git needed) whose files are hard links of `DIR`. The
cache is the working directory's DVC cache (`.dvc/cache` in a DVC project, else `data/dvc-cache`).
DVC pushes a directory's files before its `.dir` listing, so a reader never finds a listing whose files
are missing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from sicot import storage
from sicot.config import Params


class VersionError(RuntimeError):
    pass


def local_cache() -> Path:
    return Path(".dvc/cache" if Path(".dvc").is_dir() else "data/dvc-cache").resolve()


def _dvc(repo: Path, *args: str) -> None:
    # `dvc init` runs before the project's config (analytics = false) exists: no usage-report daemon either way.
    # No --quiet: it silences DVC's error messages too, and the output is captured anyway.
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip()[-2000:]
        raise VersionError(f"dvc {' '.join(args)} failed (exit {proc.returncode}): {said}")


def _link_tree(src: Path, dest: Path) -> None:
    """`dest` holds the files of `src` as hard links (copies across filesystems): no data is copied twice."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _config(cache: Path, remote: str) -> str:
    """The throw-away project's .dvc/config (DVC's documented INI format; writing it saves a dvc call
    per setting)."""
    lines = ["[core]", "    analytics = false", "    no_scm = true",
             "[cache]", f"    dir = {cache}", "    type = \"hardlink,copy\""]
    if remote:
        url = remote if storage.is_s3(remote) else str(Path(remote).resolve())
        lines[1:1] = ["    remote = sicot"]
        lines += ['[\'remote "sicot"\']', f"    url = {url}"]
        if storage.is_s3(remote) and os.environ.get("AWS_ENDPOINT_URL"):  # an S3-compatible store, not AWS
            lines.append(f"    endpointurl = {os.environ['AWS_ENDPOINT_URL']}")
    return "\n".join(lines) + "\n"


def version(directory: str, remote: str = "") -> dict:
    """Hash `directory` with DVC, cache it and push it to `remote` (when given); returns its version."""
    src = Path(directory)
    if storage.is_s3(directory) or storage.is_dvc_tree(directory) or not src.is_dir():
        raise VersionError(f"{directory}: not a local directory to version")
    cache = local_cache()
    with tempfile.TemporaryDirectory(prefix="sicot-dvc-") as tmp:
        repo = Path(tmp)
        _link_tree(src, repo / "out")
        _dvc(repo, "init", "--no-scm")
        (repo / ".dvc" / "config").write_text(_config(cache, remote))
        _dvc(repo, "add", "out")
        md5 = yaml.safe_load((repo / "out.dvc").read_text())["outs"][0]["md5"]
        if remote:
            _dvc(repo, "push")
    odb = (remote if storage.is_s3(remote) else str(Path(remote).resolve())) if remote else str(cache)
    return {"directory": directory, "md5": md5, "uri": storage.dvc_tree_uri(odb, md5), "remote": remote or None}


def run(params: Params, directory: str) -> dict:
    result = version(directory, params.paths.dvc_remote)
    print(f"version_data: {directory} is DVC version {result['md5']} -> {result['uri']}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    cli_main(run, __doc__.splitlines()[0], argv, sections=("paths",),
             extra=lambda p: p.add_argument("directory", help="the local output directory to version"))


if __name__ == "__main__":
    main()
