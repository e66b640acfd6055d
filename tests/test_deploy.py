"""deploy: a fitted classifier merged behind its backbone runs without pickle and gives the bundle's probabilities."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import joblib
import numpy as np
import onnx
import onnxruntime
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer

from pipeline.errors import UserError
from pipeline.extract.run import run_extract
from pipeline.files import sha256_file
from pipeline.fit import heads
from pipeline.fit.bundle import ClassifierBundle
from pipeline.fit.run import run_fit
from pipeline.models import DeployedManifest, ModelManifest, open_deployed
from pipeline.models.manifest import OPSET
from pipeline.serve.classify import run_classify
from pipeline.serve.deploy import OUTPUT_NAME, deploy_classifier, head_graph
from tests.images import photo, save
from tests.stores import synthetic_store


def head_probabilities(fitted: Pipeline, X: np.ndarray) -> np.ndarray:
    model = head_graph(fitted, X.shape[1], OPSET)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {"embedding": X})[0]


@pytest.mark.filterwarnings("ignore:.*has no pixels feature set")
@pytest.mark.parametrize("kind, classes", [("in-memory", 3), ("in-memory", 2), ("linear-svm", 2), ("out-of-core", 3),
                                           ("out-of-core", 2)])
def test_every_head_fit_makes_converts_to_the_same_probabilities(tmp_path, monkeypatch, kind, classes):
    if kind == "linear-svm":
        monkeypatch.setattr(heads, "RBF_MAX_TRAIN", 10)  # the SVM of large training sets, on a small one
    per_class = dict(list({"a": 40, "b": 30, "c": 20}.items())[:classes])
    store = synthetic_store(tmp_path / "s.h5", per_class, features={"resnet50": (24, 1.5)})
    run_fit(store.path, models=["resnet50"], out=tmp_path / "out", n_jobs=1, curve=False,
            out_of_core=kind == "out-of-core", chunk_rows=64, epochs=2)
    X = store.load("resnet50").embeddings
    kernels = {"in-memory": "rbf", "linear-svm": "linear", "out-of-core": None}
    for classifier in ("logreg", "svm"):
        bundle = ClassifierBundle.load(tmp_path / "out" / f"resnet50-{classifier}.skops")
        if classifier == "svm":
            assert bundle.params.get("kernel") == kernels[kind] and ("loss" in bundle.params) == (kind == "out-of-core")
        want = bundle.pipeline.predict_proba(X)
        assert want.std() > 0.01  # not a constant answer
        np.testing.assert_allclose(head_probabilities(bundle.pipeline, X), want, atol=1e-5)


def test_the_l2_scaler_converts_too():
    X = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    fitted = Pipeline([("scale", Normalizer()), ("clf", LogisticRegression())]).fit(X, y)
    np.testing.assert_allclose(head_probabilities(fitted, X), fitted.predict_proba(X), atol=1e-6)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, exported, state_dict_file):
    """Three classes of generated photos, extracted with resnet50 at 64 px, with logreg and svm fitted on them."""
    work = tmp_path_factory.mktemp("deploy")
    models_dir = exported("resnet50", 64).onnx_path.parent
    data = work / "pets"
    for c, (name, brightness) in enumerate((("bright", 1.0), ("dim", 0.6), ("dark", 0.25))):
        for i in range(6):
            save(data / name / f"{i}.png", (photo(48 + i, 40, seed=i + 100 * c) * brightness).astype(np.uint8))
    run_extract(data, models=["resnet50"], cache=work / "pets.h5", models_dir=models_dir,
                weights=str(state_dict_file("resnet50")),
                progress=False)
    run_fit(work / "pets.h5", out=work / "classifiers", n_jobs=1, curve=False)
    return work, models_dir


def rows(path):
    return {row["path"]: row for row in csv.DictReader(open(path))}


def test_a_deployed_classifier_predicts_what_its_bundle_predicts_without_unpickling(fitted, tmp_path, monkeypatch):
    work, models_dir = fitted
    bundle_path = work / "classifiers" / "resnet50-svm.skops"
    result = deploy_classifier(bundle_path, models_dir, out=tmp_path / "svm.onnx")
    assert result.deployed and result.onnx_path == tmp_path / "svm.onnx"
    manifest = open_deployed(tmp_path / "svm.onnx").manifest
    backbone = ModelManifest.load(models_dir / "resnet50.json")
    bundle = ClassifierBundle.load(bundle_path)
    assert manifest.classes == bundle.classes and manifest.onnx_sha256 == sha256_file(tmp_path / "svm.onnx")
    assert manifest.classifier["bundle_sha256"] == sha256_file(bundle_path)
    assert manifest.classifier["backbone_onnx_sha256"] == backbone.onnx_sha256
    assert manifest.weights == backbone.weights and manifest.input == backbone.input
    verification = manifest.verification
    assert verification["max_abs_difference"] <= 1e-4 and verification["embeddings_max_abs_difference"] <= 1e-4
    assert verification["embeddings_unsaturated"] > 128  # the conversion was checked where probabilities vary
    model = onnx.load(tmp_path / "svm.onnx")
    assert json.loads({p.key: p.value for p in model.metadata_props}["classes"]) == bundle.classes
    session = onnxruntime.InferenceSession(str(tmp_path / "svm.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(uint8)")]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [(OUTPUT_NAME, ["batch", 3])]

    run_classify(work / "pets", bundle_path, output=tmp_path / "bundle.csv", models_dir=models_dir, cache=None,
                 progress=False)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a deployed classifier must not load a pickle")

    monkeypatch.setattr(joblib, "load", no_unpickling)
    counts = run_classify(work / "pets", tmp_path / "svm.onnx", output=tmp_path / "onnx.csv",
                          models_dir=tmp_path / "nothing",
                          cache=work / "pets.h5", progress=False)
    assert counts["classified"] == 18 and counts["cached"] == 0
    want, got = rows(tmp_path / "bundle.csv"), rows(tmp_path / "onnx.csv")
    assert got.keys() == want.keys()
    for path, row in want.items():
        assert got[path]["prediction"] == row["prediction"]
        assert float(got[path]["probability"]) == pytest.approx(float(row["probability"]), abs=1e-5)


def test_deploying_again_is_a_no_op_until_the_bundle_changes(fitted, tmp_path):
    work, models_dir = fitted
    classifiers = tmp_path / "classifiers"
    shutil.copytree(work / "classifiers", classifiers)
    first = deploy_classifier(classifiers / "resnet50-logreg.skops", models_dir)
    assert first.deployed and first.onnx_path == classifiers / "resnet50-logreg.onnx"
    assert (classifiers / "resnet50-logreg.json").exists()
    again = deploy_classifier(classifiers / "resnet50-logreg.skops", models_dir)
    assert not again.deployed and again.manifest == first.manifest
    bundle = ClassifierBundle.load(classifiers / "resnet50-logreg.skops")
    bundle.classes = ["one", "two", "three"]
    bundle.save(classifiers / "resnet50-logreg.skops")
    changed = deploy_classifier(classifiers / "resnet50-logreg.skops", models_dir, trust=True)
    assert changed.deployed and open_deployed(changed.onnx_path).manifest.classes == ["one", "two", "three"]


def test_deploy_refuses_unlisted_pixel_and_mismatched_bundles(fitted, tmp_path):
    work, models_dir = fitted
    stranger = tmp_path / "stranger.skops"
    shutil.copy(work / "classifiers" / "resnet50-logreg.skops", stranger)
    with pytest.raises(UserError, match=r"stranger.skops is not beside a report.json .* "
                       r"so it is not known to be a bundle fit wrote"):
        deploy_classifier(stranger, models_dir)
    assert not (tmp_path / "stranger.onnx").exists()
    with pytest.raises(UserError, match="classifies raw 32x32 pixels"):
        deploy_classifier(work / "classifiers" / "pixels-logreg.skops", models_dir, out=tmp_path / "p.onnx")
    bundle = ClassifierBundle.load(stranger)
    bundle.provenance["onnx_sha256"] = "0" * 64
    bundle.save(stranger)
    with pytest.raises(UserError,
                       match="fitted on resnet50 embeddings of ONNX sha256 000000000000 .* but .*resnet50.onnx has"):
        deploy_classifier(stranger, models_dir, trust=True)
    listed = work / "classifiers" / "resnet50-logreg.skops"
    with pytest.raises(UserError, match="must end in .onnx"):
        deploy_classifier(listed, models_dir, out=tmp_path / "x.skops")
    for taken in (models_dir / "resnet50.onnx", work / "classifiers" / "report.onnx"):  # a backbone's, fit's report
        with pytest.raises(UserError, match=f"{taken.stem}.json exists and is not a deployed classifier's manifest"):
            deploy_classifier(listed, models_dir, out=taken)
    shutil.copy(models_dir / "resnet50.onnx", tmp_path / "lone.onnx")  # a backbone without its manifest
    with pytest.raises(UserError, match="lone.onnx exists without a deployed classifier's manifest beside it"):
        deploy_classifier(listed, models_dir, out=tmp_path / "lone.onnx")
    (tmp_path / "lone.onnx").unlink()

    bundle = ClassifierBundle.load(listed)
    bundle.pipeline.steps[-1] = ("clf", DummyClassifier().fit(np.zeros((3, 1)), [0, 1, 2]))
    bundle.save(stranger)
    with pytest.raises(UserError, match="skl2onnx cannot convert its DummyClassifier"):
        deploy_classifier(stranger, models_dir, out=tmp_path / "dummy.onnx", trust=True)
    bundle.pipeline.steps[-1] = ("clf", DummyClassifier().fit(np.zeros((3, 1)), [1, 2, 3]))
    bundle.save(stranger)
    with pytest.raises(UserError, match="does not predict the indices of its 3 classes"):
        deploy_classifier(stranger, models_dir, out=tmp_path / "dummy.onnx", trust=True)
    assert not list(tmp_path.glob("*.onnx"))


def test_classify_refuses_a_changed_deployed_file_a_backbone_and_another_precision(fitted, tmp_path):
    work, models_dir = fitted
    deployed = deploy_classifier(work / "classifiers" / "resnet50-logreg.skops", models_dir, out=tmp_path / "d.onnx")
    with pytest.raises(UserError, match="runs its backbone at fp32, merged into the file"):
        run_classify(work / "pets", deployed.onnx_path, output=None, precision="int8", cache=None)
    with pytest.raises(UserError, match="resnet50.json describes a backbone, not a classifier"):
        run_classify(work / "pets", models_dir / "resnet50.onnx", output=None, cache=None)
    with open(deployed.onnx_path, "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(UserError, match=r"d.onnx does not match its manifest .*d.json .* "
                       r"deploy it again: .*resnet50-logreg"
                       r".skops --out .*d.onnx\."):
        run_classify(work / "pets", deployed.onnx_path, output=None, cache=None)
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(UserError, match="d.json is not the manifest of a deployed classifier"):
        DeployedManifest.load(tmp_path / "d.json")


def test_cli_deploys_and_says_so_in_one_line(fitted, tmp_path):
    work, models_dir = fitted
    command = [sys.executable, "-m", "pipeline.deploy", work / "classifiers" / "resnet50-logreg.skops",
               "--models-dir", models_dir, "--out", tmp_path / "cli.onnx"]
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "deployed resnet50-logreg.skops as" in done.stdout and "3 classes" in done.stdout
    done = subprocess.run(list(map(str, command[:4])) + ["--models-dir", str(tmp_path / "none"), "--out",
                          str(tmp_path / "other.onnx")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_deploy_runs_nothing_of_a_crafted_bundle(fitted, tmp_path):
    from tests.test_classify import crafted_folder

    _, models_dir = fitted
    marker = tmp_path / "ran"
    bundle = crafted_folder(tmp_path / "received", marker)
    with pytest.raises(UserError, match="is a joblib pickle .* pass --trust"):
        deploy_classifier(bundle, models_dir, out=tmp_path / "d.onnx")
    assert not marker.exists() and not (tmp_path / "d.onnx").exists()
