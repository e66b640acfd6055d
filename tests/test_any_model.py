"""Every stage on models of each family, named as their library names them: extract (local and on Ray), fit and the
report, classify, deploy, ImageEmbedder and the store command; a model whose crop others share is decoded once."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.extract import run as extract
from pipeline.extract.features import feature_specs
from pipeline.fit.run import run_fit
from pipeline.models import ModelRepository
from pipeline.serve.classify import run_classify
from pipeline.serve.deploy import deploy_classifier
from pipeline.serve.embedder import ImageEmbedder
from pipeline.store import PIXELS, EmbeddingStore
from tests.images import class_folders

FAMILIES = [("timm/convnext_atto.d2_in1k", "timm-convnext_atto-d2_in1k"),
            ("torchvision/mobilenet_v3_small", "torchvision-mobilenet_v3_small")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("any-model")
    return class_folders(root / "pets", {"cat": 8, "dog": 8}), class_folders(root / "new", {"cat": 3, "dog": 3}, seed=9)


@pytest.mark.parametrize("model,stem", FAMILIES)
def test_every_stage_runs_on_a_model_of_each_family(model, stem, folders, exported, tmp_path):
    data, new = folders
    models_dir = exported(model, 64).onnx_path.parent
    cache = tmp_path / "store.h5"
    specs = extract.run_extract(data, models=[model], cache=cache, models_dir=models_dir, progress=False)
    assert [(s.name, s.embedded) for s in specs] == [(stem, 16), (PIXELS, 16)]
    attrs = EmbeddingStore(cache).load_attrs(stem)
    assert attrs["model"] == model and attrs["weights_license"].startswith("unknown")  # a test weights file
    assert attrs["embedding_dim"] == EmbeddingStore(cache).load(stem).embeddings.shape[1]

    report = run_fit(cache, models=[model], out=tmp_path / "classifiers", reuse=False)
    assert {row["features"] for row in report["results"]} == {stem, PIXELS}
    assert model in report["features"][stem]["description"] and "licence" in report["features"][stem]["description"]
    assert (tmp_path / "classifiers" / "report.html").exists()
    bundle = tmp_path / "classifiers" / f"{stem}-logreg.skops"
    counts = run_classify(new, bundle, output=tmp_path / "p.csv", models_dir=models_dir, cache=cache, progress=False)
    assert counts["classified"] == 6 and counts["cached"] == 0

    deployed = deploy_classifier(bundle, models_dir, out=tmp_path / "deployed.onnx")
    assert deployed.manifest.model == model and deployed.manifest.weights["license"]
    again = run_classify(new, deployed.onnx_path, output=tmp_path / "d.csv", models_dir=models_dir, cache=None,
                         progress=False)
    assert again["classified"] == 6

    embedder = ImageEmbedder(model, models_dir=models_dir, cache=cache).fit()
    paths = [str(path) for path in sorted(data.rglob("*.jpg"))[:4]]
    rows = embedder.transform(paths)
    stored = EmbeddingStore(cache).load(stem)
    lookup = {str(data / p): row for p, row in zip(stored.paths, stored.embeddings)}
    np.testing.assert_array_equal(rows, np.stack([lookup[p] for p in paths]))
    assert embedder.get_feature_names_out()[0] == f"{stem}_0"

    info = subprocess.run([sys.executable, "-m", "pipeline.store", "info", "--cache", str(cache)],
                          capture_output=True, text=True)
    assert info.returncode == 0 and stem in info.stdout


@pytest.mark.slow  # exports two ViT-B
def test_models_whose_crops_agree_share_one_crop(exported):
    """CLIP and SigLIP 2 both crop 0.9 of a bicubic resize; only their normalisation differs, which their graphs do."""
    models = ("timm/vit_base_patch16_clip_224.openai", "timm/vit_base_patch16_siglip_224.v2_webli", "resnet50")
    sessions = [ModelRepository(exported(model, 64).onnx_path.parent).load(model).open("cpu") for model in models]
    specs, preprocessings = feature_specs(sessions)
    assert sessions[0].manifest.input["mean"] != sessions[1].manifest.input["mean"]
    assert len(preprocessings) == 2 and [spec.crop_index for spec in specs[:3]] == [0, 0, 1]


def test_a_misspelt_model_is_one_line_with_the_closest_names(folders, tmp_path):
    commands = [
        ["pipeline.extract", str(folders[0]), "--models", "timm/convnxt_atto", "--cache", str(tmp_path / "x.h5"),
         "--models-dir", str(tmp_path / "models")],
        ["pipeline.extract", str(folders[0]), "--models", "vgg61", "--cache", str(tmp_path / "x.h5")],
        ["pipeline.export", "--model", "vgg61", "--out", str(tmp_path)],
        ["pipeline.classify", str(tmp_path), "--model", "resnt50"],
        ["pipeline.fit", "--models", "resnt50", "--cache", str(tmp_path / "x.h5")],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, command
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "did you mean" in errors[0] and "usage:" not in done.stderr, (command, done.stderr)


@pytest.mark.slow  # starts Ray, whose actors load the model: seconds
def test_ray_embeds_a_timm_model_as_the_local_backend_does(folders, exported, tmp_path, ray_instance):
    data, _ = folders
    model = "timm/convnext_atto.d2_in1k"
    models_dir = exported(model, 64).onnx_path.parent
    for backend in ("local", "ray"):
        extract.run_extract(data, models=[model], cache=tmp_path / f"{backend}.h5", models_dir=models_dir,
                            progress=False,
                            backend=backend, batch_size=4)
    local, ray = EmbeddingStore(tmp_path / "local.h5"), EmbeddingStore(tmp_path / "ray.h5")
    for name in local.feature_sets():
        np.testing.assert_array_equal(local.load(name).embeddings, ray.load(name).embeddings)
        assert json.loads(local.load_attrs(name).get("weights", "{}")) == json.loads(
            ray.load_attrs(name).get("weights", "{}"))
