"""Every command in the README works as written on a fresh checkout after its set-up lines (how the blocks
are told apart and run: tests/readme.py), the serving example answers what the README says it answers,
and no document or code comment points at a document or section that does not exist."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests import readme
from tests.workflow import REPO

SERVING = "/invocations"  # the README's serving example: the block that sends a photo to the service
DOCUMENTS = sorted([REPO / "README.md", *REPO.glob("docs/*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MENTION = re.compile(r"\bdocs/[\w.-]+\.md(?:#[\w-]+)?")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> readme.Checkout:
    return readme.checkout(tmp_path_factory.getbasetemp())


def readme_text() -> str:
    return readme.README.read_text(encoding="utf-8")


def test_shell_blocks_are_either_run_or_marked_as_needing_your_infrastructure():
    run, elsewhere = readme.shell_blocks(readme_text())
    assert run and readme.SETUP.match(run[0].text.splitlines()[0]), "the README opens with its set-up lines"
    assert any(SERVING in block.text for block in run)
    for block in elsewhere:
        checked = subprocess.run(["bash", "-n"], input=block.text, text=True, capture_output=True)
        assert checked.returncode == 0, f"{block.where}: not valid shell: {checked.stderr}"


@pytest.mark.services
@pytest.mark.slow
def test_every_readme_block_runs_as_written(demo):
    run, _ = readme.shell_blocks(readme_text())
    assert len(demo.results) == len(run), "a block failed, so the ones after it did not run"
    for _, result in demo.results:
        assert result.returncode == 0, result.explain()


@pytest.mark.services
@pytest.mark.slow
def test_serving_example_answers_the_product_the_readme_shows(demo):
    result = demo.result(SERVING)
    assert result.returncode == 0, result.explain()
    answer = _first_json(result.output, '{"predictions"')
    shown = _shown_after(SERVING)
    got, expected = answer["predictions"][0], shown["predictions"][0]
    assert got["status"] == "ok", (got, result.explain())
    top, expected_top = got["matches"][0], expected["matches"][0]
    assert {k: top[k] for k in ("sku", "title", "image")} == {k: expected_top[k] for k in ("sku", "title", "image")}
    photo = re.search(r"base64 -w0 (\S+?)\)", next(b.text for b in readme.blocks(readme_text()) if SERVING in b.text))
    assert top["sku"] in photo.group(1), "the README's photo is of the product it shows"


def _first_json(text: str, start: str) -> dict:
    at = text.find(start)
    assert at >= 0, f"no {start!r} in:\n{text[-4000:]}"
    return json.JSONDecoder().raw_decode(text, at)[0]


def _shown_after(containing: str) -> dict:
    """The answer the README shows: the `json` block right after the block containing `containing`."""
    found = readme.blocks(readme_text())
    at = next(i for i, block in enumerate(found) if containing in block.text)
    shown = found[at + 1]
    assert shown.info == "json", f"{shown.where}: the answer to the example above it, as a json block"
    return json.loads(shown.text)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_document_links_resolve(document):
    text = document.read_text(encoding="utf-8")
    bad = [target for target in LINK.findall(text) if not target.startswith(("http://", "https://", "mailto:"))
           and not _resolves(document.parent, target, document)]
    assert not bad, f"{document.relative_to(REPO)}: links to nothing: {bad}"


def test_code_and_docs_mention_only_documents_and_sections_that_exist():
    sources = [*REPO.glob("*.md"), *REPO.glob("*.yaml"), *REPO.glob("docs/*.md"), *REPO.glob("infra/**/*.yaml"),
               *(path for package in ("sicot", "components", "flows", "benchmarks", "tests")
                 for path in REPO.glob(f"{package}/**/*.py"))]
    bad = [f"{path.relative_to(REPO)}: {mention}" for path in sources
           for mention in MENTION.findall(path.read_text(encoding="utf-8")) if not _resolves(REPO, mention)]
    assert not bad, "\n".join(bad)


def _resolves(base, target: str, document=None) -> bool:
    """`path#anchor` names an existing file and, for markdown, one of its headings (GitHub's anchors); a bare
    `#anchor` is a heading of `document`."""
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else document
    if file is None or not file.exists():
        return False
    if not anchor or file.suffix != ".md":
        return True
    return anchor in {_anchor(heading) for heading in re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"),
                                                                  re.MULTILINE)}


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
