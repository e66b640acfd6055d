"""Discovery: class folders, split folders, flat folders and CSV manifests."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.extract.discover import ImageRecord, discover
from tests.images import class_folders, photo, save


def test_class_folders_nested_hidden_and_non_images(tmp_path):
    class_folders(tmp_path, {"cat": 3, "dog": 2})
    (tmp_path / "cat" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    save(tmp_path / ".cache" / "x.jpg", photo(8, 8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "UPPER.JPG").write_bytes(b"named like an image")
    dataset = discover(tmp_path)
    assert dataset.layout == "classes" and dataset.classes == ["cat", "dog"]
    assert dataset.records == (
        ImageRecord("cat/0.jpg", "cat"), ImageRecord("cat/1.jpg", "cat"), ImageRecord("cat/sub/2.png", "cat"),
        ImageRecord("dog/0.jpg", "dog"), ImageRecord("dog/1.jpg", "dog"), ImageRecord("dog/UPPER.JPG", "dog"),
    )


def test_split_folders_record_the_split(tmp_path):
    class_folders(tmp_path / "train", {"cat": 2, "dog": 1})
    class_folders(tmp_path / "val", {"cat": 1})
    class_folders(tmp_path / "test", {"dog": 1})
    save(tmp_path / "test" / "unknown.jpg", photo(8, 8))
    dataset = discover(tmp_path)
    assert dataset.layout == "splits"
    splits = {r.path: (r.label, r.split) for r in dataset.records}
    assert splits == {
        "train/cat/0.jpg": ("cat", "train"), "train/cat/1.jpg": ("cat", "train"), "train/dog/0.jpg": ("dog", "train"),
        "val/cat/0.jpg": ("cat", "validation"), "test/dog/0.jpg": ("dog", "test"), "test/unknown.jpg": (None, "test"),
    }


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", photo(8, 8, i))
    dataset = discover(tmp_path)
    assert dataset.layout == "flat" and dataset.classes == []
    assert [r.label for r in dataset.records] == [None] * 3


def test_csv_manifest(tmp_path):
    save(tmp_path / "images" / "a.jpg", photo(8, 8))
    save(tmp_path / "images" / "b.jpg", photo(8, 8))
    save(tmp_path / "c.png", photo(8, 8))
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label,split\nimages/a.jpg,cat,train\nimages/b.jpg,dog,val\n{tmp_path / 'c.png'},,\n")
    dataset = discover(csv)
    assert dataset.layout == "csv" and dataset.root == tmp_path
    assert dataset.records == (
        ImageRecord("c.png", None, ""), ImageRecord("images/a.jpg", "cat", "train"),
        ImageRecord("images/b.jpg", "dog", "validation"),
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("a.jpg,cat,holdout\n", "split 'holdout' is not one of"),
        ("a.jpg,cat\na.jpg,dog\n", "listed twice"),
        ("a.jpg,cat,train,extra\n", "expected path,label"),
    ],
)
def test_bad_csv_lines_are_named(tmp_path, text, message):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(UserError, match=message):
        discover(csv)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        discover(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        discover(tmp_path / "empty")


def test_a_csv_may_list_files_anywhere_and_its_root_is_their_deepest_common_folder(tmp_path):
    save(tmp_path / "disk1" / "photos" / "cats" / "a.jpg", photo(8, 8))
    save(tmp_path / "disk1" / "photos" / "dogs" / "b.jpg", photo(8, 8))
    csv = tmp_path / "elsewhere" / "labels.csv"
    csv.parent.mkdir()
    csv.write_text(f"{tmp_path}/disk1/photos/cats/a.jpg,cat\n{tmp_path}/disk1/photos/dogs/b.jpg,dog\n"
                   f"{tmp_path}/disk1/photos/dogs/gone.jpg,dog\n")
    dataset = discover(csv)
    assert dataset.root == tmp_path / "disk1" / "photos"
    assert [r.path for r in dataset.records] == ["cats/a.jpg", "dogs/b.jpg", "dogs/gone.jpg"]  # a missing file kept
    with_root = discover(csv, root=tmp_path / "disk1")
    assert with_root.root == tmp_path / "disk1" and with_root.records[0].path == "photos/cats/a.jpg"
    (tmp_path / "relative.csv").write_text("photos/cats/a.jpg,cat\n")
    assert discover(tmp_path / "relative.csv", root=tmp_path / "disk1").records[0].path == "photos/cats/a.jpg"
    with pytest.raises(UserError, match="is outside --root"):
        discover(csv, root=tmp_path / "disk1" / "photos" / "cats")
    with pytest.raises(UserError, match="--root is for a CSV manifest"):
        discover(tmp_path / "disk1", root=tmp_path)
