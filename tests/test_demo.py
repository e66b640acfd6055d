"""The demo: ImageNet weights when cached, else random ones with a banner; every stage, reused on a second run."""

from __future__ import annotations

import pytest

from pipeline import demo
from pipeline.extract.discover import discover
from pipeline.store import EmbeddingStore


def test_demo_weights_follow_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert demo.demo_weights("resnet50") == "random"
    cache_file = demo.imagenet_cache_file("resnet50")
    assert cache_file.name == "resnet50-0676ba61.pth"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b"")
    assert demo.demo_weights("resnet50") == "imagenet"


def test_digits_are_written_once_as_split_class_folders(tmp_path):
    assert demo.write_digits(tmp_path, per_class=4) == 40
    dataset = discover(tmp_path)
    assert dataset.layout == "splits" and dataset.classes == [str(d) for d in range(10)]
    assert sum(r.split == "test" for r in dataset.records) == 10
    stamp = (tmp_path / dataset.records[0].path).stat().st_mtime_ns
    demo.write_digits(tmp_path, per_class=4)
    assert (tmp_path / dataset.records[0].path).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_its_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["--models-dir", str(tmp_path / "models"), "--data", str(tmp_path / "digits"),
            "--cache", str(tmp_path / "demo.h5"), "--per-class", "3", "--image-size", "32",
            "--classifiers-dir", str(tmp_path / "classifiers")]
    assert demo.main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("UNTRAINED RANDOM WEIGHTS") == 1 and "vgg16 and resnet50" in captured.err
    assert "/vgg16          30 x 4096 (30 computed now" in captured.out
    assert sorted(EmbeddingStore(tmp_path / "demo.h5").feature_sets()) == ["pixels", "resnet50", "vgg16"]
    for row in ("vgg16 (untrained)     logreg", "resnet50 (untrained)  svm", "pixels                logreg"):
        assert row in captured.out
    assert "10 of 10 test scans classified" in captured.out
    predictions = (tmp_path / "digits-test-predictions.csv").read_text().splitlines()
    assert len(predictions) == 11 and predictions[0].startswith("path,prediction,probability,top2")
    report = (tmp_path / "classifiers" / "report.json").read_bytes()
    assert demo.main(args) == 0
    again = capsys.readouterr().out
    assert "up to date" in again and "(0 computed now" in again and "reused" in again
    assert (tmp_path / "classifiers" / "report.json").read_bytes() == report
