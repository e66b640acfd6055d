"""Classifier bundles: round trip, provenance, and clear errors for files that are not bundles."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
import skops.io
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.errors import UserError
from pipeline.extract.decode import PIXELS_FINGERPRINT
from pipeline.files import sha256_file
from pipeline.fit.bundle import ClassifierBundle, provenance_of
from pipeline.serve.bundles import open_fitted_backbone
from pipeline.store import PIXELS
from tests.stores import blobs, feature_attrs


def bundle() -> tuple[ClassifierBundle, np.ndarray]:
    y = np.repeat(np.arange(3), 10)
    X = blobs(y, 6, 0.5, 0)
    fitted = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    attrs = {**feature_attrs("resnet50", 6), "embedding_dim": np.int64(6), "unrelated": "x"}
    made = ClassifierBundle(fitted, ["a", "b", "c"], "resnet50", "logreg", provenance_of(attrs), {"C": 1.0}, {}, 0)
    return made, X


def test_round_trip_predicts_identically_and_keeps_provenance(tmp_path):
    made, X = bundle()
    sha = made.save(tmp_path / "b.skops")
    assert sha == sha256_file(tmp_path / "b.skops")
    loaded = ClassifierBundle.load(tmp_path / "b.skops")
    np.testing.assert_array_equal(loaded.pipeline.predict_proba(X), made.pipeline.predict_proba(X))
    assert loaded.classes == ["a", "b", "c"] and loaded.onnx_sha256 == "sha-resnet50"
    assert loaded.provenance["embedding_dim"] == 6 and type(loaded.provenance["embedding_dim"]) is int
    assert "unrelated" not in loaded.provenance
    assert set(loaded.versions) >= {"scikit-learn", "numpy", "pipeline"}


def test_saving_twice_gives_the_same_bytes(tmp_path):
    made, _ = bundle()
    assert made.save(tmp_path / "1.skops") == made.save(tmp_path / "2.skops")


@pytest.mark.parametrize("content, message", [
    (None, "no classifier bundle at"),
    (b"not a pickle at all", r"is a joblib pickle \(a bundle of an earlier version, or not a bundle\)"),
    ({"some": "dict"}, "is not a classifier bundle written by pipeline.fit"),
    ({"format": "pipeline.classifier-bundle", "format_version": 99}, "is bundle format 99"),
    ({"format": "pipeline.classifier-bundle", "format_version": 1, "classes": []}, "lacks pipeline, features"),
])
def test_files_that_are_not_bundles_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "x.skops"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        skops.io.dump(content, path)
    with pytest.raises(UserError, match=message):
        ClassifierBundle.load(path)


def test_a_truncated_bundle_is_refused(tmp_path):
    made, _ = bundle()
    made.save(tmp_path / "b.skops")
    data = (tmp_path / "b.skops").read_bytes()
    (tmp_path / "b.skops").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is not a readable classifier bundle"):
        ClassifierBundle.load(tmp_path / "b.skops")


def test_a_pixel_classifier_of_an_earlier_pixel_recipe_gets_a_notice(tmp_path, caplog, messages):
    made, _ = bundle()
    for fingerprint, noticed in ((PIXELS_FINGERPRINT, False), ("pixels:32:v1", True)):
        pixels = ClassifierBundle(made.pipeline, made.classes, PIXELS, "logreg",
                                  {"kind": "pixels", "fingerprint": fingerprint}, {}, {}, 0)
        assert open_fitted_backbone(pixels, tmp_path / "p.skops", tmp_path, "cpu") is None
        said = messages()
        caplog.clear()
        assert ("fitted on pixel-baseline features of an earlier recipe (pixels:32:v1" in said) == noticed


class Payload:
    """Unpickling this writes a file: what a crafted bundle could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Stranger:
    """A type no bundle holds."""


def test_a_crafted_pickle_runs_nothing_unless_trusted(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "resnet50-logreg.joblib"
    joblib.dump({"format": "pipeline.classifier-bundle", "payload": Payload(marker)}, path)
    with pytest.raises(UserError, match=r"is a joblib pickle .* unpickling runs the code inside it; "
                       r"rewrite the bundles "
                       r"you made as safe skops files once \(.*bundles .*\), or pass --trust"):
        ClassifierBundle.load(path)
    assert not marker.exists()
    with pytest.raises(UserError):
        ClassifierBundle.load(path, trust=True)  # trusted: unpickled, and only then refused as no bundle
    assert marker.exists()


def test_a_skops_file_with_a_type_no_bundle_holds_is_refused_before_it_is_built(tmp_path):
    made, _ = bundle()
    made.provenance["extra"] = Stranger()
    made.save(tmp_path / "b.skops")
    with pytest.raises(UserError, match=r"holds types a classifier bundle never holds \(tests.test_bundle.Stranger\)"):
        ClassifierBundle.load(tmp_path / "b.skops")


def test_bundles_of_every_classifier_fit_makes_load_without_trust(tmp_path):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import Normalizer
    from sklearn.svm import SVC, LinearSVC

    made, X = bundle()
    y = np.repeat(np.arange(3), 10)
    sgd = SGDClassifier(loss="hinge", random_state=0).fit(X, y)
    for classifier in (CalibratedClassifierCV(SVC(), cv=3), CalibratedClassifierCV(LinearSVC(), cv=3),
                       CalibratedClassifierCV(FrozenEstimator(sgd)), SGDClassifier(loss="log_loss")):
        made.pipeline = make_pipeline(Normalizer(), classifier).fit(X, y)
        made.save(tmp_path / "b.skops")
        loaded = ClassifierBundle.load(tmp_path / "b.skops")
        np.testing.assert_allclose(loaded.pipeline.predict_proba(X), made.pipeline.predict_proba(X))
