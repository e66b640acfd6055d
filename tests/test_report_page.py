"""report.html: planted duplicates and label errors found, a self-contained page of the right sections, rebuilt."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from pipeline.extract.run import run_extract
from pipeline.fit.run import PageOptions, run_fit
from tests.images import photo, save
from tests.stores import blobs, synthetic_store

SECTIONS = ("Where the features come from", "Comparison on the test part", "Confusions of",
            "Most confident mistakes of", "Map of the embeddings", "Leaks between the training and held-out parts",
            "Duplicates", "Likely label errors")


class Page(HTMLParser):
    """The page's headings, images and links, as Python's own HTML parser reads them."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.placeholders = 0
        self._in_heading = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2", "h3"):
            self._in_heading = True
            self.headings.append("")
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "div" and attrs.get("class") == "missing":
            self.placeholders += 1

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3"):
            self._in_heading = False

    def handle_data(self, data):
        if self._in_heading:
            self.headings[-1] += data


@pytest.fixture(scope="module")
def photos_fit(tmp_path_factory, exported, state_dict_file):
    """Split folders of two classes with a planted exact copy and a planted resized, re-compressed copy of
    training images in test/, extracted at 64 px and fitted with its page."""
    root = tmp_path_factory.mktemp("page")
    data = root / "data"
    for part, count in (("train", 10), ("test", 4)):
        for name, seed in (("bright", 0), ("dark", 500)):
            for i in range(count):
                picture = photo(60 + i, 80, seed + i + (100 if part == "test" else 0))
                if name == "dark":
                    picture = (picture * 0.3).astype(np.uint8)
                save(data / part / name / f"{i}.jpg", picture, quality=90)
    shutil.copy(data / "train" / "bright" / "3.jpg", data / "test" / "bright" / "exact-copy.jpg")
    original = Image.open(data / "train" / "dark" / "5.jpg")
    buffer = io.BytesIO()
    original.resize((int(original.width * 0.7), int(original.height * 0.7)), Image.BICUBIC).save(
        buffer, "JPEG", quality=60)
    (data / "test" / "dark" / "near-copy.jpg").write_bytes(buffer.getvalue())
    run_extract(data, models=["resnet50"], cache=root / "e.h5", models_dir=exported("resnet50", 64).onnx_path.parent,
                weights=str(state_dict_file("resnet50")), progress=False)
    report = run_fit(root / "e.h5", out=root / "out", n_jobs=1, classifiers=["logreg"], curve=False,
                     page=PageOptions(thumbnails=3))
    return root, report


def test_planted_exact_and_near_duplicates_across_the_split_are_found(photos_fit):
    root, report = photos_fit
    with open(root / "out" / "leaks.csv", newline="") as stream:
        rows = {(r["path"], r["other_path"]): r for r in csv.DictReader(stream)}
    exact = rows[("test/bright/exact-copy.jpg", "train/bright/3.jpg")]
    assert exact["found_by"] == "sha256" and float(exact["similarity"]) == 1.0 and exact["split"] == "test"
    near = rows[("test/dark/near-copy.jpg", "train/dark/5.jpg")]
    assert near["found_by"] == "pixels" and float(near["similarity"]) >= 0.99
    leaks = report["findings"]["leaks"]
    assert leaks["exact"] >= 1 and leaks["near"] >= 1 and leaks["searched"] == {"pixels": 0.99, "resnet50": 0.95}
    assert 0 <= leaks["accuracy_without"] <= 1


def test_planted_copies_are_grouped_as_duplicates(photos_fit):
    root, report = photos_fit
    with open(root / "out" / "duplicates.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    groups: dict[str, dict[str, str]] = {}
    for row in rows:
        groups.setdefault(row["group"], {})[row["path"]] = row["exact"]
    assert {"test/bright/exact-copy.jpg": "1", "train/bright/3.jpg": "1"} in groups.values()
    assert any({"test/dark/near-copy.jpg", "train/dark/5.jpg"} <= set(group) for group in groups.values())
    assert report["findings"]["duplicates"]["groups"] == len(groups) >= 2
    assert report["findings"]["leaks"]["search"]["pixels"]["method"].startswith("exact")


def test_the_page_is_self_contained_and_has_every_section(photos_fit):
    root, report = photos_fit
    text = (root / "out" / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    for section in SECTIONS:
        assert any(h.startswith(section) for h in page.headings), section
    assert "http" not in text.lower() and "<script" not in text.lower()  # nothing to fetch, nothing to run
    assert all(src.startswith("data:image/") for src in page.images)
    thumbnails = [src for src in page.images if src.startswith("data:image/jpeg")]
    assert len(thumbnails) >= 4 and not page.placeholders  # the duplicates' pairs at least, every file there
    assert "also appear in the training part" in text
    assert report["findings"]["page"] == "report.html"


def test_a_moved_image_gets_a_placeholder_and_the_page_is_made_again_without_fitting(photos_fit, tmp_path):
    root, _ = photos_fit
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    moved = root / "data" / "test" / "bright" / "exact-copy.jpg"
    kept = moved.read_bytes()
    moved.unlink()
    try:
        result = subprocess.run([sys.executable, "-m", "pipeline.report", str(out), "--thumbnails", "2"],
                                capture_output=True, text=True, timeout=300)
    finally:
        moved.write_bytes(kept)
    assert result.returncode == 0 and result.stdout.startswith("report: ")
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    assert page.placeholders >= 1 and (out / "report.json").read_bytes() == (root / "out" / "report.json").read_bytes()
    missing = subprocess.run([sys.executable, "-m", "pipeline.report", str(tmp_path / "none")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no finished fit in")


@pytest.mark.parametrize("out_of_core", [False, True], ids=["in-memory", "out-of-core"])
def test_a_planted_mislabelled_image_is_a_label_issue(tmp_path, out_of_core):
    def mislabel(name, X):  # the first image of class0 looks exactly like class1's images
        labels = np.repeat(np.arange(3), 25)
        X[0] = blobs(labels, X.shape[1], 0.0, {"resnet50": 0, "pixels": 1}[name])[30]
        return X

    synthetic_store(tmp_path / "s.h5", per_class=25, classes=3, features={"resnet50": (8, 0.3), "pixels": (6, 3.0)},
                    edit=mislabel, split=lambda i, label: "test" if i % 5 == 4 else "train")
    report = run_fit(tmp_path / "s.h5", out=tmp_path / "out", n_jobs=1, classifiers=["logreg"], curve=False,
                     out_of_core=out_of_core, chunk_rows=16)
    with open(tmp_path / "out" / "label-issues.csv", newline="") as stream:
        issues = {r["path"]: r for r in csv.DictReader(stream)}
    assert (issues["class0/0000.png"]["given_label"] == "class0"
            and issues["class0/0000.png"]["suggested_label"] == "class1")
    assert report["findings"]["label_issues"]["count"] == len(issues) <= 3


def test_label_issues_out_of_core_are_those_found_in_memory(tmp_path):
    planted = {0: 1, 30: 2, 55: 0}  # row: the class it looks like

    def mislabel(name, X):
        labels = np.repeat(np.arange(3), 25)
        clean = blobs(labels, X.shape[1], 0.0, {"resnet50": 0, "pixels": 1}[name])
        for row, looks_like in planted.items():
            X[row] = clean[looks_like * 25 + 7] + 0.05 * (row % 3)
        return X

    synthetic_store(tmp_path / "s.h5", per_class=25, classes=3, features={"resnet50": (8, 0.4), "pixels": (6, 3.0)},
                    edit=mislabel, split=lambda i, label: "test" if i % 5 == 4 else "train")
    listed = {}
    for out_of_core in (False, True):
        out = tmp_path / f"out-{out_of_core}"
        run_fit(tmp_path / "s.h5", out=out, n_jobs=1, classifiers=["logreg"], curve=False, out_of_core=out_of_core,
                chunk_rows=16)
        with open(out / "label-issues.csv", newline="") as stream:
            listed[out_of_core] = [(r["path"], r["suggested_label"]) for r in csv.DictReader(stream)]
    assert sorted(listed[True]) == sorted(listed[False]) == [
        ("class0/0000.png", "class1"), ("class1/0005.png", "class2"), ("class2/0005.png", "class0")]


def test_no_page_when_asked_for_none(tmp_path):
    synthetic_store(tmp_path / "s.h5", per_class=8, classes=2, features={"resnet50": (4, 0.5)})
    report = run_fit(tmp_path / "s.h5", out=tmp_path / "out", n_jobs=1, classifiers=["logreg"], curve=False,
                     page=PageOptions(html=False))
    assert "findings" not in report and not (tmp_path / "out" / "report.html").exists()


@pytest.mark.slow  # starts a browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (Debian's chromium package)")
def test_a_real_browser_renders_the_page(photos_fit, tmp_path):
    root, _ = photos_fit
    shot = tmp_path / "page.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1800", f"--screenshot={shot}",
         (root / "out" / "report.html").as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (1800, 1200) and image.std() > 20  # drawn: text, tables and pictures, not a blank page
