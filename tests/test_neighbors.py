"""transfer neighbors and transfer duplicates on a store of generated photos: the query's own image first, queries
embedded by the set's model or reused by hash, error rows, every output format; duplicate groups as a page and CSV."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.extract.run import run_extract
from pipeline.serve.neighbors import query_files, run_neighbors
from tests.images import photo, save
from tests.stores import synthetic_store


@pytest.fixture(scope="module")
def photos(tmp_path_factory, exported, state_dict_file):
    """Two classes of photos with an exact copy and a resized, re-compressed copy, extracted at 64 px."""
    root = tmp_path_factory.mktemp("neighbors")
    data = root / "data"
    for name, seed in (("bright", 0), ("dark", 500)):
        for i in range(8):
            picture = photo(60 + i, 80, seed + i)
            save(data / name / f"{i}.jpg", picture if name == "bright" else (picture * 0.3).astype(np.uint8),
                 quality=90)
    shutil.copy(data / "bright" / "3.jpg", data / "bright" / "exact-copy.jpg")
    original = Image.open(data / "dark" / "5.jpg")
    buffer = io.BytesIO()
    original.resize((56, 45), Image.BICUBIC).save(buffer, "JPEG", quality=60)
    (data / "dark" / "near-copy.jpg").write_bytes(buffer.getvalue())
    models_dir = exported("resnet50", 64).onnx_path.parent
    run_extract(data, models=["resnet50"], cache=root / "e.h5", models_dir=models_dir,
                weights=str(state_dict_file("resnet50")), progress=False)
    return root, data, models_dir


def test_a_stored_image_finds_itself_first_and_reuses_its_embedding(photos, tmp_path):
    root, data, models_dir = photos
    counts = run_neighbors(data / "dark" / "2.jpg", cache=root / "e.h5", models_dir=models_dir, k=3,
                           output=tmp_path / "n.csv")
    with open(tmp_path / "n.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["path"] == "dark/2.jpg" and float(rows[0]["similarity"]) == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["label"] == "dark" and float(rows[1]["similarity"]) <= float(rows[0]["similarity"])
    assert counts["cached"] == 1 and counts["set"] == "resnet50" and counts["exact"]


def test_a_new_image_is_embedded_with_the_sets_model_and_finds_its_original(photos, tmp_path):
    root, data, models_dir = photos
    picture = Image.open(data / "bright" / "6.jpg")
    save(tmp_path / "q" / "new.png", np.asarray(picture.resize((70, 52), Image.BICUBIC)))
    (tmp_path / "q" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
    counts = run_neighbors(tmp_path / "q", cache=root / "e.h5", models_dir=models_dir, k=2,
                           output=tmp_path / "n.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "n.jsonl").read_text().splitlines()]
    broken = [r for r in rows if r["query"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["rank"] == 0 and broken[0]["similarity"] is None
    found = [r for r in rows if r["query"].endswith("new.png")]
    assert found[0]["path"] == "bright/6.jpg" and found[0]["similarity"] > found[1]["similarity"]
    assert counts == {**counts, "queries": 2, "unreadable": 1, "cached": 0}


def test_the_page_and_the_command_line(photos, tmp_path):
    root, data, models_dir = photos
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "neighbors", str(data / "bright"), "--cache", str(root / "e.h5"),
         "--models-dir", str(models_dir), "-k", "2", "--output", str(tmp_path / "n.html")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "searched 9 of 9 query images in resnet50 (exact search; 9 embeddings reused" in result.stderr
    page = (tmp_path / "n.html").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg") >= 9 * 3 and "http" not in page.lower()
    table = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "neighbors", str(data / "dark" / "1.jpg"), "--cache",
         str(root / "e.h5"), "--models-dir", str(models_dir), "-k", "1"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "dark/1.jpg" in table.stdout.splitlines()[1]


def test_mistakes_are_one_sentence(photos, tmp_path):
    root, data, models_dir = photos
    with pytest.raises(UserError, match="has no 'vgg16' features"):
        run_neighbors(data / "dark" / "1.jpg", cache=root / "e.h5", models_dir=models_dir, feature_set="vgg16")
    with pytest.raises(UserError, match="^-k 0 must be at least 1"):
        run_neighbors(data / "dark" / "1.jpg", cache=root / "e.h5", models_dir=models_dir, k=0)
    with pytest.raises(UserError, match="resnet50 is not exported in"):
        run_neighbors(data / "dark" / "1.jpg", cache=root / "e.h5", models_dir=tmp_path / "none")
    with pytest.raises(UserError, match="does not exist"):
        run_neighbors(tmp_path / "nothing", cache=root / "e.h5", models_dir=models_dir)
    assert query_files(data / "dark" / "1.jpg") == [str(data / "dark" / "1.jpg")]


def test_transfer_duplicates_writes_the_groups_as_a_page_and_csv(photos, tmp_path):
    root, _, _ = photos
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "duplicates", "--cache", str(root / "e.h5"), "--set", "pixels",
         "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 groups of duplicates (4 images, 2 the same file as another) among 18 images")
    with open(tmp_path / "d" / "duplicates.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(row["path"])
    assert sorted(map(sorted, groups.values())) == [["bright/3.jpg", "bright/exact-copy.jpg"],
                                                    ["dark/5.jpg", "dark/near-copy.jpg"]]
    page = (tmp_path / "d" / "duplicates.html").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg") == 4 and "group 1: 2 images" in page
    wrong = subprocess.run([sys.executable, "-m", "pipeline.cli", "duplicates", "--cache", str(root / "e.h5"),
                            "--threshold", "2"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: --threshold 2.0 must be a cosine similarity")


def test_a_model_that_did_not_compute_the_set_is_refused(tmp_path, small_models):
    synthetic_store(tmp_path / "s.h5", per_class=4, classes=2, features={"resnet50": (2048, 0.5)})
    save(tmp_path / "q.png", photo(40, 40))
    with pytest.raises(UserError, match="is not the model .* resnet50 embeddings were computed with"):
        run_neighbors(tmp_path / "q.png", cache=tmp_path / "s.h5", models_dir=small_models)


def test_untrained_features_are_searched_and_every_output_says_so(tmp_path):
    from pipeline.report.duplicates import write_duplicates
    from pipeline.store import EmbeddingStore
    from pipeline.store.duplicates import find_duplicates

    store = synthetic_store(tmp_path / "s.h5", per_class=6, classes=2, features={"resnet50": (8, 0.0)},
                            untrained=True)  # spread 0: every image of a class is the same point
    found = find_duplicates(EmbeddingStore(store.path), "resnet50")
    assert found.untrained and found.groups.count == 2 and found.groups.images() == 12
    page, table = write_duplicates(found, tmp_path / "d")
    assert "UNTRAINED" in page.read_text(encoding="utf-8") and table.read_text().count("\n") == 13
