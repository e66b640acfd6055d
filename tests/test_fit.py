"""fit end to end on synthetic stores: accuracy, report, figures, bundles, reproducibility and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.fit import run as fit
from pipeline.fit import training
from pipeline.fit.bundle import ClassifierBundle
from pipeline.fit.run import run_fit
from pipeline.store import PIXELS, EmbeddingStore
from tests.stores import synthetic_store

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.filterwarnings("ignore:.*has no pixels feature set")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit of a separable 4-class store (noisy pixels), shared by the tests that only read its output."""
    root = tmp_path_factory.mktemp("fit")
    synthetic_store(root / "s.h5", per_class=25, classes=4)
    report = run_fit(root / "s.h5", out=root / "out", n_jobs=1)
    return root, report


def test_separable_embeddings_beat_the_pixel_baseline(fitted):
    _, report = fitted
    scores = {(r["features"], r["classifier"]): r["test"]["accuracy"] for r in report["results"]}
    assert set(scores) == {(f, c) for f in ("vgg16", "resnet50", PIXELS) for c in ("logreg", "svm")}
    for (features, _), accuracy in scores.items():
        assert accuracy >= 0.99 if features != PIXELS else accuracy < 0.99
    assert report["data"]["n_train"] == 80 and report["data"]["n_test"] == 20


def test_report_figures_and_bundles_exist_and_match(fitted):
    root, report = fitted
    out = root / "out"
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]
    assert (out / "report.md").read_text().startswith("# Classifier report")
    assert (out / "learning-curve.png").read_bytes()[:8] == PNG
    for result in report["results"]:
        test = result["test"]
        assert {"accuracy", "balanced_accuracy", "macro_f1", "top_k", "per_class"} <= set(test)
        assert set(test["top_k"]) == {"top3"} and set(test["per_class"]) == {f"class{c}" for c in range(4)}
        assert result["params"]["C"] > 0 and result["train_seconds"] >= 0 and result["n_test"] == 20
        assert (out / result["confusion_figure"]).read_bytes()[:8] == PNG
        assert sha256_file(out / result["bundle"]["path"]) == result["bundle"]["sha256"]
    assert [b["path"] for b in report["bundles"]] == [r["bundle"]["path"] for r in report["results"]]
    curves = report["learning_curve"]["curves"]
    assert set(curves) == {"vgg16", "resnet50", PIXELS}
    assert curves["resnet50"]["per_class"] == [1, 2, 5, 10, 20.0]
    assert report["features"]["resnet50"]["provenance"]["weights"] == {"source": "imagenet", "name": "IMAGENET1K_V1"}


def test_bundles_round_trip_and_predict_like_the_report(fitted):
    root, report = fitted
    features = EmbeddingStore(root / "s.h5").load("resnet50")
    bundle = ClassifierBundle.load(root / "out" / "resnet50-svm.skops")
    assert bundle.classes == [f"class{c}" for c in range(4)] and bundle.onnx_sha256 == "sha-resnet50"
    assert bundle.metrics["test"]["accuracy"] == next(
        r["test"]["accuracy"] for r in report["results"] if r["bundle"]["path"] == "resnet50-svm.skops")
    predicted = np.array(bundle.classes)[bundle.pipeline.predict(features.embeddings)]
    assert (predicted == features.classes[features.labels]).mean() >= 0.99


def test_same_seed_reproduces_the_fit_exactly(tmp_path):
    synthetic_store(tmp_path / "s.h5", per_class=12, classes=3, features={"resnet50": (8, 1.5), PIXELS: (6, 3.0)})
    first = run_fit(tmp_path / "s.h5", out=tmp_path / "a", seed=7, n_jobs=2)
    second = run_fit(tmp_path / "s.h5", out=tmp_path / "b", seed=7, n_jobs=1)

    def timeless(report):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in report["results"]]

    assert timeless(first) == timeless(second)
    assert first["learning_curve"]["curves"] == second["learning_curve"]["curves"]
    other = run_fit(tmp_path / "s.h5", out=tmp_path / "c", seed=8, n_jobs=1, curve=False)
    assert other["data"]["n_train"] == first["data"]["n_train"] and timeless(other) != timeless(first)



def test_recorded_train_validation_test_split(tmp_path):
    def split(i, label):
        return "test" if i < 3 else "validation" if i < 6 else "train"

    synthetic_store(tmp_path / "s.h5", per_class=15, classes=3, split=split, features={"resnet50": (8, 0.3)})
    report = run_fit(tmp_path / "s.h5", out=tmp_path / "out", n_jobs=1, curve=False)
    assert report["data"]["split"] == "the train/validation/test split recorded by extract"
    assert (report["data"]["n_train"], report["data"]["n_validation"], report["data"]["n_test"]) == (36, 9, 9)
    assert {r["selection"] for r in report["results"]} == {"scored on the recorded validation split"}
    assert report["learning_curve"] is None


def test_train_and_validation_folders_fit_on_train_and_score_on_validation(tmp_path):
    def split(i, label):
        return "validation" if i < 4 else "train"

    synthetic_store(tmp_path / "s.h5", per_class=14, classes=3, split=split, features={"resnet50": (8, 0.5)})
    report = run_fit(tmp_path / "s.h5", out=tmp_path / "out", n_jobs=1, curve=False, test_size=0.5)
    assert (report["data"]["n_train"], report["data"]["n_validation"], report["data"]["n_test"]) == (30, 0, 12)
    assert report["data"]["split"].startswith("fitted on the train folder (30 images; settings by cross-validation")
    assert "scored on the validation folder (12 images)" in report["data"]["split"]
    assert all("cross-validation" in r["selection"] for r in report["results"])
    assert "scored on the validation folder" in (tmp_path / "out" / "report.md").read_text()


def test_the_test_part_chooses_nothing(tmp_path):
    def split(i, label):
        return "test" if i < 4 else "train"

    def noise(name, X):
        return np.where((np.arange(len(X)) % 16 < 4)[:, None], 100 * np.sin(X * 7), X)

    synthetic_store(tmp_path / "a.h5", per_class=16, classes=3, split=split, features={"resnet50": (8, 1.0)})
    synthetic_store(tmp_path / "b.h5", per_class=16, classes=3, split=split, features={"resnet50": (8, 1.0)},
                    edit=noise)
    clean, noisy = (run_fit(tmp_path / f"{n}.h5", out=tmp_path / n, n_jobs=1, curve=False) for n in "ab")
    for a, b in zip(clean["results"], noisy["results"]):
        assert (a["params"], a["validation_score"]) == (b["params"], b["validation_score"])
        assert a["test"]["accuracy"] > b["test"]["accuracy"]


def test_reuse_only_when_store_arguments_and_bundles_are_unchanged(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", per_class=8, classes=2, features={"resnet50": (4, 0.5)})
    kwargs = dict(out=tmp_path / "o", n_jobs=1, classifiers=["logreg"], curve=False, reuse=True)
    assert "reused" not in run_fit(store.path, **kwargs)
    assert run_fit(store.path, **kwargs)["reused"]
    assert "reused" not in run_fit(store.path, **{**kwargs, "seed": 1})
    assert run_fit(store.path, **{**kwargs, "seed": 1})["reused"]
    (tmp_path / "o" / "resnet50-logreg.skops").write_bytes(b"changed")
    assert "reused" not in run_fit(store.path, **{**kwargs, "seed": 1})


def test_an_interrupted_fit_leaves_the_previous_report_and_bundles(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path / "s.h5", per_class=8, classes=2, features={"resnet50": (4, 0.5), PIXELS: (4, 2)})
    run_fit(store.path, out=tmp_path / "o", n_jobs=1, classifiers=["logreg"], curve=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    monkeypatch.setattr(training, "fit_head", _stopping_after(1))
    with pytest.raises(KeyboardInterrupt):
        run_fit(store.path, out=tmp_path / "o", n_jobs=1, classifiers=["logreg"], curve=False, seed=3)
    after = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir() if p.is_file()}
    assert after == before
    monkeypatch.undo()
    report = run_fit(store.path, out=tmp_path / "o", n_jobs=1, classifiers=["logreg"], curve=False, seed=3)
    assert report["seed"] == 3 and not (tmp_path / "o" / fit.STAGING).exists()


def _stopping_after(fits: int):
    """A fit_head that works ``fits`` times, then behaves like Ctrl-C."""
    real, done = training.fit_head, []

    def fit_head(*args, **kwargs):
        if len(done) == fits:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    return fit_head


def test_untrained_features_are_flagged_in_figures_and_text(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", per_class=8, classes=2, untrained=True,
                            features={"resnet50": (4, 0.5), PIXELS: (4, 2)})
    report = run_fit(store.path, out=tmp_path / "o", n_jobs=1, classifiers=["logreg"])
    assert report["learning_curve"]["curves"]["resnet50"]["label"] == "resnet50 (untrained)"
    assert report["learning_curve"]["description"].endswith("some backbones have UNTRAINED random weights.")
    assert "**resnet50: UNTRAINED random weights" in (tmp_path / "o" / "report.md").read_text()


def test_unlabelled_rows_are_left_out_and_models_can_be_chosen(tmp_path):
    synthetic_store(tmp_path / "s.h5", per_class=10, classes=2, unlabelled=5)
    report = run_fit(tmp_path / "s.h5", models=["resnet50"], classifiers=["logreg"], out=tmp_path / "o", n_jobs=1)
    assert [r["features"] for r in report["results"]] == ["resnet50", PIXELS]
    assert report["data"]["n_train"] + report["data"]["n_test"] == 20


def test_a_store_without_pixels_is_fitted_without_baseline_and_says_so(tmp_path, messages):
    synthetic_store(tmp_path / "s.h5", per_class=6, classes=2, features={"resnet50": (4, 0.3)})
    report = run_fit(tmp_path / "s.h5", out=tmp_path / "o", n_jobs=1, classifiers=["logreg"])
    assert "has no pixels feature set, so the report has no raw-pixel baseline" in messages()
    assert [r["features"] for r in report["results"]] == ["resnet50"]


def test_class_weighting_is_applied_on_imbalanced_data(tmp_path):
    synthetic_store(tmp_path / "s.h5", per_class={"common": 40, "rare": 6}, features={"resnet50": (8, 2.0)})
    report = run_fit(tmp_path / "s.h5", out=tmp_path / "o", n_jobs=1, class_weight="balanced", curve=False)
    assert all(r["params"]["class_weight"] == "balanced" for r in report["results"])


def test_few_images_per_class_fall_back_to_fewer_folds(tmp_path):
    synthetic_store(tmp_path / "s.h5", per_class=3, classes=2, features={"resnet50": (8, 0.3)})
    report = run_fit(tmp_path / "s.h5", out=tmp_path / "o", n_jobs=1, folds=5, test_size=0.2)
    result = report["results"][0]
    assert result["n_train"] == 4 and "2 folds instead of 5" in result["notes"][0]


def nan_rows(name, X):
    if name == "resnet50":
        X[3, 1] = np.nan
    return X


def inf_rows(name, X):
    if name == PIXELS:
        X[5, 0] = -np.inf
    return X


@pytest.mark.parametrize("make, kwargs, message", [
    (None, {}, "no embedding store at"),
    (dict(per_class=10, classes=2, unlabelled=0, features={"resnet50": (4, 1.0)}), {"models": ["vgg16"]},
     "has no 'vgg16' features \\(it has: resnet50\\)"),
    (dict(per_class={"only": 10}), {}, "labelled images of only one class \\('only'\\)"),
    (dict(per_class={"a": 10, "b": 1}), {}, "class 'b' has 1 training image\\(s\\).*at least 2 per class"),
    (dict(per_class=10, classes=2, edit=nan_rows), {}, "1 resnet50 embeddings hold NaN or infinite values \\(first: "),
    (dict(per_class=10, classes=2, edit=inf_rows), {}, "1 pixels embeddings hold NaN or infinite values"),
    (dict(per_class=10, classes=2), {"n_jobs": 0}, "--n-jobs 0 runs nothing"),
    (dict(per_class=10, classes=2), {"classifiers": ["tree"]}, "unknown classifier 'tree'"),
    (dict(per_class=6, classes=2,
          split=lambda i, label: "test" if i < 2 else "validation" if label == "class1" else "train"),
     {}, "class 'class1' .* has all its training images in the validation split"),
    (dict(per_class=10, classes=2), {"test_size": 1.0}, "--test-size 1.0 must be"),
    (dict(per_class=10, classes=2, split=lambda i, label: "test" if i < 2 else "train"), {"test_size": 5},
     "--test-size 5 must be"),
])
def test_bad_input_gets_one_clear_error(tmp_path, make, kwargs, message):
    if make is not None:
        synthetic_store(tmp_path / "s.h5", **make)
    with pytest.raises(UserError, match=message):
        run_fit(tmp_path / "s.h5", out=tmp_path / "o", **{"n_jobs": 1, **kwargs})


def test_a_store_without_labels_is_refused(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", per_class={"a": 0}, unlabelled=6)
    with pytest.raises(UserError, match="has no labelled images to fit on"):
        run_fit(store.path, out=tmp_path / "o")


def test_cli_prints_the_table_and_fails_in_one_line(tmp_path):
    synthetic_store(tmp_path / "s.h5", per_class=10, classes=2, features={"resnet50": (8, 0.3), PIXELS: (4, 3.0)})
    command = [sys.executable, "-m", "pipeline.fit", "--cache", str(tmp_path / "s.h5"), "--out", str(tmp_path / "o"),
               "--classifiers", "logreg", "--n-jobs", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "features  classifier  accuracy" in done.stdout and "resnet50  logreg" in done.stdout
    assert (f"report: {tmp_path / 'o' / 'report.html'} (open it in a browser), "
            f"{tmp_path / 'o' / 'report.md'}") in done.stdout
    failed = subprocess.run(command[:4] + [str(tmp_path / "missing.h5")], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and failed.stderr.startswith("error: no embedding store at")
    assert len(failed.stderr.strip().splitlines()) == 1


def test_cli_fits_out_of_core(tmp_path):
    synthetic_store(tmp_path / "s.h5", per_class=60, classes=3, features={"resnet50": (16, 0.5), PIXELS: (4, 3.0)})
    command = [sys.executable, "-m", "pipeline.fit", "--cache", str(tmp_path / "s.h5"), "--out", str(tmp_path / "o"),
               "--n-jobs", "1", "--out-of-core", "--chunk-rows", "50", "--epochs", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resnet50  svm" in done.stdout and "none is drawn with --out-of-core" in done.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {r["params"]["loss"] for r in report["results"]} == {"log_loss", "hinge"}
    bundle = ClassifierBundle.load(tmp_path / "o" / "resnet50-logreg.skops")
    assert bundle.pipeline.named_steps["clf"].__class__.__name__ == "SGDClassifier"
    bad = subprocess.run(command + ["--chunk-rows", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--chunk-rows 0 must be at least 1" in bad.stderr


@pytest.mark.slow  # starts Ray
def test_the_search_on_the_ray_joblib_backend_gives_the_same_fit(tmp_path, ray_instance):
    store = synthetic_store(tmp_path / "s.h5", per_class=20, classes=3)
    on_loky = run_fit(store.path, out=tmp_path / "loky", curve=False, n_jobs=2)
    on_ray = run_fit(store.path, out=tmp_path / "ray", curve=False, n_jobs=2, joblib_backend="ray")
    summary = lambda report: [  # noqa: E731
        (r["features"], r["classifier"], r["params"], r["validation_score"], r["test"]["accuracy"])
        for r in report["results"]
    ]
    assert summary(on_ray) == summary(on_loky)
    assert ray_instance.is_initialized()  # joined, and left running


def test_a_second_fit_into_the_same_folder_gets_a_clear_error(tmp_path):
    import filelock

    store = synthetic_store(tmp_path / "s.h5", per_class=10, classes=2)
    (tmp_path / "out").mkdir()
    with (
        filelock.FileLock(tmp_path / "out" / fit.LOCK),  # as a running fit holds it
        pytest.raises(UserError, match="another fit is writing .*out; wait for it to finish, or use another --out"),
    ):
        run_fit(store.path, out=tmp_path / "out", n_jobs=1, curve=False)
    assert run_fit(store.path, out=tmp_path / "out", n_jobs=1, curve=False)["results"]
