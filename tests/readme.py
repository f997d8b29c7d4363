"""The README's shell blocks, run as written in a copy of the checkout, the way a newcomer runs them.

Fence info strings say what a block is:
- `bash`: run by tests/test_readme.py exactly as written, in order, in one copy of the checkout. A block
  is one `bash -e` script: a failing command fails it. Whatever it starts in the background (`&`: a
  server, a worker) is stopped when the block ends; each block is bounded by `BLOCK_TIMEOUT_S`.
- `bash your-infra`: needs what one machine does not have (your S3 bucket and keys, a registry, a
  cluster); it is checked to be valid shell (`bash -n`), not run.
- any other language (`json`, none): not shell, not run.

The set-up lines come first (`bin/setup [options] && ...`). Their `bin/setup` has already run: it built the
`.venv` this suite runs in, which the copy reaches as `.venv` (a link). Running it again from the copy
would install the copy into the shared virtualenv. What follows it on a line runs as written, except the
test suite itself (`python -m pytest`): that is what is running now.

The demo run is the suite's most expensive step, so one run serves every test that needs it
(tests/test_readme.py, tests/test_pipeline.py): `checkout` runs the README once per pytest process.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.workflow import BIN, REPO, Result, clean_env, copy_checkout

README = REPO / "README.md"
RUN, ELSEWHERE = "bash", "bash your-infra"
SETUP = re.compile(r"^bin/setup(?: [^&]*)? && (.*)$")  # a set-up line: `bin/setup [options] && command`
THIS_SUITE = ".venv/bin/python -m pytest"
BLOCK_TIMEOUT_S = 1800  # the demo pipeline: ~12 min on an idle 2-core machine, far more on a busy one
FENCE = re.compile(r"^(```|~~~)(.*)$")


class ReadmeError(AssertionError):
    pass


@dataclass
class Block:
    info: str
    line: int  # of the opening fence, 1-based
    text: str

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def blocks(text: str) -> list[Block]:
    """Every fenced block at the start of a line, with its info string."""
    found, opened, body = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if opened is None and fence:
            opened, body = (fence.group(1), fence.group(2).strip(), number), []
        elif opened is not None and line.strip() == opened[0]:
            found.append(Block(opened[1], opened[2], "\n".join(body) + "\n"))
            opened = None
        elif opened is not None:
            body.append(line)
    if opened is not None:
        raise ReadmeError(f"README.md:{opened[2]}: code block never closed")
    return found


def shell_blocks(text: str) -> tuple[list[Block], list[Block]]:
    """(blocks to run, blocks to check as shell only); any other shell-looking info string is an error,
    so a block can never drop out of the test by its spelling."""
    run, elsewhere = [], []
    for block in blocks(text):
        if block.info == RUN:
            run.append(block)
        elif block.info == ELSEWHERE:
            elsewhere.append(block)
        elif block.info.split(" ", 1)[0] in ("bash", "sh", "shell", "console", "zsh"):
            raise ReadmeError(f"{block.where}: fence info {block.info!r}: use {RUN!r} (run by the tests) or "
                              f"{ELSEWHERE!r} (needs your own infrastructure; syntax-checked only)")
    return run, elsewhere


def as_run_here(block: Block) -> str:
    """The block's script with its set-up lines reduced to what follows `bin/setup` (see the module doc)."""
    lines = []
    for line in block.text.splitlines():
        setup = SETUP.match(line)
        if setup:
            line = setup.group(1)
            if line.startswith(THIS_SUITE):
                continue
        lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass
class Checkout:
    """A copy of the checkout after every README block ran in it, in order."""
    root: Path
    env: dict[str, str]
    results: list[tuple[Block, Result]] = field(default_factory=list)

    def result(self, containing: str) -> Result:
        """The result of the one block whose text contains `containing`."""
        found = [result for block, result in self.results if containing in block.text]
        if len(found) != 1:
            raise ReadmeError(f"{len(found)} README blocks contain {containing!r}")
        return found[0]


def newcomer_env(root: Path) -> dict[str, str]:
    """A shell without this suite's services or virtualenv on PATH; Prefect's home is private to the run."""
    env = clean_env(PREFECT_HOME=str(root / ".prefect-home"))
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
    return env


def run_block(block: Block, root: Path, env: dict[str, str], timeout: float = BLOCK_TIMEOUT_S) -> Result:
    """One block as a `bash -e` script in its own process group, output to a file (a background server
    keeps a pipe open forever); afterwards the whole group is stopped."""
    script = as_run_here(block)
    log = root / f".readme-block-{block.line}.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            returncode = 124
        finally:
            stop_group(proc)
    result = Result([block.where, script], returncode, log.read_text(errors="replace"), time.perf_counter() - started)
    print(f"{block.where}: exit {returncode} in {result.seconds:.1f}s")
    return result


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        proc.poll()


@functools.cache
def checkout(base: Path) -> Checkout:
    """The README run once (under the session's temporary `base`): every `bash` block in order, stopping
    at the first that fails (later blocks build on it)."""
    root = base / "readme-checkout"
    root.mkdir()
    copy_checkout(root)
    (root / ".venv").symlink_to(REPO / ".venv")
    run, _ = shell_blocks(README.read_text(encoding="utf-8"))
    done = Checkout(root, newcomer_env(root))
    for block in run:
        done.results.append((block, run_block(block, root, done.env)))
        if done.results[-1][1].returncode != 0:
            break
    return done
