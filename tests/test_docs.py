"""Every Python snippet of the README and of docs/ runs as written, in a project folder the test prepares."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pipeline.extract.run import run_extract
from pipeline.fit.run import run_fit
from pipeline.serve.deploy import deploy_classifier
from tests.images import class_folders

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8")), start=1):
            found.append((f"{page.relative_to(ROOT)}#{number}", code))
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory, exported, state_dict_file) -> Path:
    """What the snippets assume: ``make extract DATA=data`` and ``make fit`` done, the logreg deployed."""
    root = tmp_path_factory.mktemp("project")
    class_folders(root / "data", {"cat": 6, "dog": 6}, size=(90, 120))
    shutil.copytree(exported("resnet50", 64).onnx_path.parent, root / "models")
    run_extract(root / "data", models=["resnet50"], cache=root / "features" / "embeddings.h5",
                models_dir=root / "models",
                weights=str(state_dict_file("resnet50")), progress=False)
    run_fit(root / "features" / "embeddings.h5", classifiers=["logreg"],
            out=root / "models" / "classifiers" / "embeddings", n_jobs=1, curve=False)
    deploy_classifier(root / "models" / "classifiers" / "embeddings" / "resnet50-logreg.skops", root / "models")
    shutil.copy(next((root / "data" / "cat").glob("*.jpg")), root / "cat.jpg")
    return root


def test_the_pages_have_snippets():
    assert len(snippets()) >= 5  # a page lost its examples, or the pattern no longer finds them


@pytest.mark.parametrize("where,code", snippets(), ids=[where for where, _ in snippets()])
def test_a_snippet_runs_as_written(project, where, code, monkeypatch, capsys):
    monkeypatch.chdir(project)
    exec(compile(code, where, "exec"), {"__name__": "__snippet__"})  # noqa: S102  (our own documentation)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_between_the_pages_resolve(page):
    text = BLOCK.sub("", page.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} names no file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: {target} names no heading of {linked.name}"
