"""The demo: ImageNet weights when cached, else random ones with a banner."""

from __future__ import annotations

import pytest

from pipeline import demo
from pipeline.backbones import BACKBONES
from pipeline.weights import imagenet_cache_file


def test_demo_weights_follow_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert demo.demo_weights("resnet50") == "random"
    _, cache_file = imagenet_cache_file(BACKBONES["resnet50"], "IMAGENET1K_V1")
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b"")
    assert demo.demo_weights("resnet50") == "imagenet"


@pytest.mark.slow
def test_demo_exports_both_models_with_a_banner(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert demo.main(["--models-dir", str(tmp_path / "models"), "--image-size", "32"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("UNTRAINED RANDOM WEIGHTS") == 2
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "resnet50.json", "resnet50.onnx", "vgg16.json", "vgg16.onnx"
    ]
