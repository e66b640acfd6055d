"""The repository of exported models: a name resolved once into a verified ExportedModel, exports and variants made
when they must be, and models exported by the landed version (before other families) used unchanged."""

from __future__ import annotations

import json
import pickle
import shutil

import h5py
import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.extract.decode import calibration_crops
from pipeline.extract.discover import discover
from pipeline.fit.run import run_fit
from pipeline.models import ExportedModel, ModelRepository, Preprocessing, quantize
from pipeline.serve.classify import run_classify
from pipeline.serve.deploy import deploy_classifier
from pipeline.store import EmbeddingStore
from tests.images import class_folders, photo, save

ATTO = "timm/convnext_atto.d2_in1k"


@pytest.fixture
def repository(tmp_path, exported):
    """A private models folder holding the 64 px resnet50 test export."""
    source = exported("resnet50", 64).onnx_path.parent
    folder = tmp_path / "models"
    shutil.copytree(source, folder)
    return ModelRepository(folder)


def test_a_name_in_any_form_resolves_to_one_verified_model(repository):
    model = repository.load("resnet50")
    assert isinstance(model, ExportedModel) and model.name == "resnet50" and model.precision == "fp32"
    assert model.fingerprint == model.manifest.onnx_sha256 and model.preprocessing == Preprocessing(73, 64)
    assert repository.load("torchvision/resnet50") == model
    assert pickle.loads(pickle.dumps(model)) == model  # what Ray actors receive
    with pytest.raises(UserError, match=r"no int8 variant of resnet50 .* --precision int8 --calibration DATA\."):
        repository.load("resnet50-int8")
    with pytest.raises(UserError, match="unknown model 'resnet5'"):
        repository.load("resnet5")


def test_a_changed_file_is_found_once_and_named_with_its_remedy(repository):
    model = repository.load("resnet50")
    model.onnx_path.write_bytes(b"changed")
    with pytest.raises(UserError,
                       match=r"does not match its manifest .* make it again: .*export --model resnet50 --weights "):
        model.verify()
    assert repository.current("resnet50") is None


def test_get_exports_what_is_missing_and_what_has_other_weights(tmp_path, caplog):
    repository = ModelRepository(tmp_path)
    first = repository.get(ATTO, "random", image_size=64)
    assert first.name == "timm-convnext_atto-d2_in1k" and first.manifest.weights_id == "random:seed=0"
    assert (tmp_path / "timm-convnext_atto-d2_in1k.onnx").exists()
    assert repository.get(ATTO) == first == repository.get("timm-convnext_atto-d2_in1k", "random")
    other = repository.get(ATTO, str(save_atto_weights(tmp_path / "atto.safetensors")))
    assert other.manifest.weights["source"] == "file" and other.preprocessing.crop_size == 64  # the size it had
    assert (tmp_path / "timm-convnext_atto-d2_in1k.previous.onnx").exists()
    assert "has weights random:seed=0, not" in caplog.text and "kept the export being replaced" in caplog.text


def save_atto_weights(path):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("convnext_atto").state_dict(), str(path))
    return path


def test_variants_are_made_once_from_their_source(repository, tmp_path):
    images = tmp_path / "images"
    for i in range(24):
        save(images / f"{i}.jpg", photo(70, 90, seed=i))
    source = repository.load("resnet50")
    crops = calibration_crops(discover(images), source.preprocessing)
    int8 = repository.variant(source, "int8", crops, calibration_images=6)
    assert int8.name == "resnet50-int8" and int8.manifest.derived_from["onnx_sha256"] == source.fingerprint
    assert int8.manifest.calibration["operators"] == "every operator"
    assert int8.manifest.verification["mean_cosine"] >= quantize.MIN_MEAN_COSINE
    assert repository.variant(source, "int8") == int8 == repository.load("resnet50", "int8")
    assert repository.variant(source, "fp32") == source


def test_an_int8_variant_below_the_fidelity_bar_is_refused_and_not_kept(repository, tmp_path, monkeypatch):
    for i in range(20):
        save(tmp_path / "images" / f"{i}.jpg", photo(70, 90, seed=i))
    source = repository.load("resnet50")
    monkeypatch.setattr(quantize, "MIN_MEAN_COSINE", 1.01)  # no variant can reach it: both operator sets are tried
    with pytest.raises(UserError,
                       match=r"int8 variant reaches only a mean cosine of 0\.9\d+ to fp32 .* use --precision fp32"):
        repository.variant(source, "int8", calibration_crops(discover(tmp_path / "images"), source.preprocessing), 4)
    assert sorted(p.name for p in repository.folder.iterdir()) == ["resnet50.json", "resnet50.onnx"]


def landed_manifest(path):
    """Rewrite a manifest into the form the landed version wrote (no licence, resize mode or library recipe)."""
    record = json.loads(path.read_text())
    record["weights"].pop("license")
    for key in ("resize_mode", "recipe"):
        record["input"].pop(key)
    record["verification"] = {"images": 2, "min_cosine": 0.9999999, "max_relative_error": 1e-6}
    path.write_text(json.dumps(record))


def landed_store(path):
    """Remove what the landed version did not write from a store's feature sets."""
    for file in [path, *path.with_name(path.name + ".shards").glob("*/*.h5")]:
        with h5py.File(file, "r+") as store:
            for group in store.values():
                if isinstance(group, h5py.Group):
                    for key in ("weights_license", "resize_mode"):
                        group.attrs.pop(key, None)


def test_exports_stores_bundles_and_deployments_of_the_landed_version_keep_working(repository, tmp_path):
    landed_manifest(repository.folder / "resnet50.json")
    model = repository.load("resnet50")
    assert model.manifest.license.startswith("not recorded") and model.preprocessing == Preprocessing(73, 64)
    data = class_folders(tmp_path / "pets", {"cat": 6, "dog": 6})
    cache = tmp_path / "store.h5"
    from pipeline.extract.run import run_extract

    run_extract(data, models=["resnet50"], cache=cache, models_dir=repository.folder, progress=False)
    landed_store(cache)
    assert "weights_license" not in EmbeddingStore(cache).load_attrs("resnet50")
    report = run_fit(cache, out=tmp_path / "classifiers", reuse=False)
    assert {row["features"] for row in report["results"]} == {"resnet50", "pixels"}
    bundle = tmp_path / "classifiers" / "resnet50-logreg.skops"
    counts = run_classify(data, bundle, output=None, models_dir=repository.folder, cache=cache, progress=False)
    assert counts["classified"] == 12 and counts["cached"] == 12
    deployed = deploy_classifier(bundle, repository.folder, out=tmp_path / "deployed.onnx")
    counts = run_classify(data, deployed.onnx_path, output=None, models_dir=repository.folder, cache=None,
                          progress=False)
    assert counts["classified"] == 12
    assert np.isfinite(EmbeddingStore(cache).load("resnet50").embeddings).all()
