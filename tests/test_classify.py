"""classify end to end: a fitted bundle predicts folders, bad files get error rows, exit codes, choices and checks."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import joblib
import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.extract.decode import calibration_crops
from pipeline.extract.discover import discover
from pipeline.extract.run import run_extract
from pipeline.files import sha256_file
from pipeline.fit.bundle import ClassifierBundle
from pipeline.fit.run import run_fit
from pipeline.models import ModelRepository
from pipeline.serve import embedder
from pipeline.serve.classify import choose_bundle, run_classify
from pipeline.store import EmbeddingStore
from tests.images import photo, save


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, exported, state_dict_file):
    """Two classes of generated photos (bright and dark), extracted with resnet50 at 64 px, fitted."""
    work = tmp_path_factory.mktemp("classify")
    models_dir = exported("resnet50", 64).onnx_path.parent
    data = work / "pets"
    for name, brightness in (("bright", 1.0), ("dark", 0.25)):
        for i in range(8):
            save(data / name / f"{i}.png",
                 (photo(48 + i, 40, seed=i + (100 if name == "dark" else 0)) * brightness).astype(np.uint8))
    weights = str(state_dict_file("resnet50"))
    run_extract(data, models=["resnet50"], cache=work / "pets.h5", models_dir=models_dir, weights=weights,
                progress=False)
    report = run_fit(work / "pets.h5", out=work / "classifiers", n_jobs=1, classifiers=["logreg"], curve=False)
    return work, models_dir, report


def new_folder(root, with_bad: bool = True):
    """A flat folder of new images, plus a corrupt JPEG and a text file named .jpg."""
    for i in range(3):
        save(root / f"new{i}.png", photo(50, 44, seed=200 + i))
    if with_bad:
        (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
        (root / "notes.jpg").write_text("a text file with an image name")
    return root


def test_every_good_image_gets_a_prediction_and_bad_ones_an_error_row(fitted, tmp_path):
    work, models_dir, _ = fitted
    folder = new_folder(tmp_path / "new")
    bundle = work / "classifiers" / "resnet50-logreg.skops"
    counts = run_classify(folder, bundle, output=tmp_path / "p.csv", top_k=2, models_dir=models_dir, cache=None,
                          progress=False)
    assert counts == {"images": 5, "classified": 3, "unreadable": 2, "cached": 0, "labelled": 0, "correct": 0}
    with open(tmp_path / "p.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "prediction", "probability", "top2", "top2_probability", "error"]
    by_name = {row["path"].rsplit("/", 1)[1]: row for row in rows}
    assert set(by_name) == {"new0.png", "new1.png", "new2.png", "corrupt.jpg", "notes.jpg"}
    for name in ("new0.png", "new1.png", "new2.png"):
        row = by_name[name]
        assert row["prediction"] in ("bright", "dark") and row["error"] == "" and row["top2"] != row["prediction"]
        assert float(row["probability"]) + float(row["top2_probability"]) == pytest.approx(1, abs=1e-5)
    assert by_name["notes.jpg"]["prediction"] == "" and "not an image" in by_name["notes.jpg"]["error"]
    assert by_name["corrupt.jpg"]["error"]


def test_a_file_that_vanishes_mid_run_gets_an_error_row_and_costs_no_other(fitted, tmp_path, monkeypatch):
    work, models_dir, _ = fitted
    folder = new_folder(tmp_path / "new", with_bad=False)
    bundle = work / "classifiers" / "resnet50-logreg.skops"
    run_classify(folder, bundle, output=tmp_path / "before.csv", models_dir=models_dir, cache=None, progress=False)
    vanished, decode, first = folder / "new1.png", embedder.decode_file, []

    def decode_while_a_file_vanishes(path, *args, **kwargs):
        if not first:  # listed, not yet read
            first.append(path)
            vanished.unlink()
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(embedder, "decode_file", decode_while_a_file_vanishes)
    counts = run_classify(folder, bundle, output=tmp_path / "p.csv", models_dir=models_dir, cache=None, progress=False,
                          workers=1)
    assert (counts["classified"], counts["unreadable"]) == (2, 1)
    with open(tmp_path / "before.csv") as file:
        before = {row["path"]: row for row in csv.DictReader(file)}
    with open(tmp_path / "p.csv") as file:
        for row in csv.DictReader(file):
            if row["path"] == str(vanished):
                assert row["error"] == "missing: no such file" and row["prediction"] == ""
            else:
                assert (row["prediction"], row["probability"]) == (
                    before[row["path"]]["prediction"], before[row["path"]]["probability"])


def test_predictions_equal_the_bundle_on_stored_embeddings_and_reuse_them(fitted, tmp_path):
    work, models_dir, _ = fitted
    bundle = ClassifierBundle.load(work / "classifiers" / "resnet50-logreg.skops")
    stored = EmbeddingStore(work / "pets.h5").load("resnet50")
    expected = bundle.pipeline.predict_proba(stored.embeddings)
    for cache in (None, work / "pets.h5"):
        out = tmp_path / f"p{cache is None}.jsonl"
        counts = run_classify(work / "pets", work / "classifiers" / "resnet50-logreg.skops", output=out, top_k=1,
                              models_dir=models_dir, cache=cache, progress=False)
        assert counts["cached"] == (16 if cache else 0) and counts["labelled"] == 16
        rows = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
        for path, probabilities in zip(stored.paths, expected):
            row = rows[str(work / "pets" / path)]
            assert row["prediction"] == bundle.classes[int(np.argmax(probabilities))]
            assert row["probability"] == pytest.approx(probabilities.max(), abs=1e-4)
            assert row["label"] == str(stored.classes[stored.labels[list(stored.paths).index(path)]])


def test_a_pixel_baseline_bundle_classifies_and_jsonl_rows_carry_errors(fitted, tmp_path):
    work, models_dir, _ = fitted
    folder = new_folder(tmp_path / "new")
    counts = run_classify(folder, work / "classifiers" / "pixels-logreg.skops", output=tmp_path / "p.jsonl", top_k=5,
                          models_dir=tmp_path / "no-models-needed", cache=work / "pets.h5", progress=False)
    assert counts["classified"] == 3 and counts["unreadable"] == 2
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    good = [row for row in rows if not row["error"]]
    assert len(good) == 3 and all(
        len(row["top_k"]) == 2 and row["prediction"] == row["top_k"][0]["class"] for row in good)
    bad = [row for row in rows if row["error"]]
    assert all(row["prediction"] is None and row["probability"] is None and row["top_k"] == [] for row in bad)
    assert not (tmp_path / "p.jsonl.partial").exists()


def test_the_best_bundle_is_chosen_from_the_report_and_checked(fitted, tmp_path):
    work, _, report = fitted
    classifiers = work / "classifiers"
    best = max(report["bundles"], key=lambda b: b["validation_score"])
    assert choose_bundle(None, None, None, classifiers) == classifiers / best["path"]
    assert choose_bundle(None, "pixels", None, classifiers).name == "pixels-logreg.skops"
    assert choose_bundle(None, "resnet50", "logreg", classifiers).name == "resnet50-logreg.skops"
    with pytest.raises(UserError, match="lists no vgg16 classifier"):
        choose_bundle(None, "vgg16", None, classifiers)
    with pytest.raises(UserError, match="run fit first"):
        choose_bundle(None, None, None, tmp_path)
    copy = tmp_path / "classifiers"
    copy.mkdir()
    (copy / "report.json").write_text((classifiers / "report.json").read_text())
    for listed in report["bundles"]:
        (copy / listed["path"]).write_bytes(b"tampered")
    with pytest.raises(UserError, match="is not the file .* lists \\(sha256 differs\\)"):
        choose_bundle(None, None, None, copy)


def test_a_bundle_of_another_model_file_is_refused_naming_both(fitted, tmp_path):
    work, models_dir, _ = fitted
    bundle = ClassifierBundle.load(work / "classifiers" / "resnet50-logreg.skops")
    bundle.provenance["onnx_sha256"] = "0" * 64
    bundle.save(tmp_path / "other.skops")
    with pytest.raises(UserError, match="was fitted on resnet50 embeddings of ONNX sha256 000000000000 .* "
                       "but .*resnet50.onnx has sha256"):
        run_classify(work / "pets", tmp_path / "other.skops", output=None, models_dir=models_dir, cache=None,
                     trust=True)


def test_unlisted_or_changed_bundles_are_not_loaded_unless_trusted(fitted, tmp_path):
    work, models_dir, _ = fitted
    stranger = tmp_path / "stranger.skops"
    shutil.copy(work / "classifiers" / "resnet50-logreg.skops", stranger)
    with pytest.raises(UserError,
                       match=r"stranger.skops is not beside a report.json \(none at .*\), so it is not known"):
        run_classify(work / "pets", stranger, output=None, models_dir=models_dir, cache=None)
    assert run_classify(work / "pets", stranger, output=tmp_path / "p.csv", models_dir=models_dir, cache=None,
                        trust=True)["images"]
    listed = tmp_path / "listed"
    shutil.copytree(work / "classifiers", listed)
    with open(listed / "resnet50-logreg.skops", "ab") as stream:
        stream.write(b"\0")  # changed since fit listed it
    with pytest.raises(UserError, match="is not the file .*report.json lists .*sha256 changed"):
        run_classify(work / "pets", listed / "resnet50-logreg.skops", output=None, models_dir=models_dir, cache=None)


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.classify", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_exit_codes_and_table(fitted, tmp_path):
    work, models_dir, _ = fitted
    common = ["--classifiers-dir", work / "classifiers", "--models-dir", models_dir, "--cache", work / "pets.h5",
              "--model", "resnet50"]
    clean = run(new_folder(tmp_path / "clean", with_bad=False), *common, cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert len(clean.stdout.splitlines()) == 3 and "new0.png  " in clean.stdout
    assert "classified 3 of 3 images" in clean.stderr
    mixed = run(new_folder(tmp_path / "mixed"), *common, "--output", tmp_path / "p.csv", cwd=tmp_path)
    assert mixed.returncode == 1 and "2 files could not be decoded" in mixed.stderr
    with open(tmp_path / "p.csv") as file:
        assert len(list(csv.reader(file))) == 6
    (tmp_path / "empty").mkdir()
    for bad in (["empty"], ["clean", "--output", "p.txt"], ["clean", "--top-k", "0"], ["clean", "--batch-size", "0"],
                ["missing"], ["clean", "--classifier", work / "classifiers" / "resnet50-logreg.skops"]):
        done = run(*bad, *common, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1, bad


def test_another_precision_is_refused_unless_allowed(fitted, tmp_path):
    work, models_dir, _ = fitted
    private = tmp_path / "models"
    shutil.copytree(models_dir, private)
    repository = ModelRepository(private)
    source = repository.load("resnet50")
    repository.variant(source, "int8", calibration_crops(discover(work / "pets"), source.preprocessing), 8)
    folder = new_folder(tmp_path / "new", with_bad=False)
    bundle = work / "classifiers" / "resnet50-logreg.skops"
    with pytest.raises(UserError, match="fitted on fp32 embeddings.*not int8.*--allow-precision-change"):
        run_classify(folder, bundle, output=None, models_dir=private, cache=None, precision="int8", progress=False)
    fp32 = run_classify(folder, bundle, output=tmp_path / "fp32.csv", models_dir=private, cache=None, progress=False)
    int8 = run_classify(folder, bundle, output=tmp_path / "int8.csv", models_dir=private, cache=None, precision="int8",
                        allow_precision_change=True, progress=False)
    assert fp32["classified"] == int8["classified"] == 3
    rows = []
    for name in ("fp32.csv", "int8.csv"):
        with open(tmp_path / name) as file:
            rows.append(list(csv.DictReader(file)))
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]]
    probabilities = [[float(r["probability"]) for r in table] for table in rows]
    assert probabilities[0] != probabilities[1]  # the int8 model really ran
    assert np.allclose(*probabilities, atol=0.05)


def test_a_folder_whose_classes_the_classifier_does_not_know_gets_one_warning(fitted, tmp_path, caplog, messages):
    work, models_dir, _ = fitted
    for name in ("cat", "dog"):  # class folders of another dataset
        save(tmp_path / "other" / name / "0.png", photo(50, 44, seed=7))
    bundle = work / "classifiers" / "resnet50-logreg.skops"
    counts = run_classify(tmp_path / "other", bundle, output=tmp_path / "p.csv", models_dir=models_dir, cache=None,
                          progress=False)
    assert counts["labelled"] == 2 and counts["correct"] == 0
    (warning,) = [line for line in messages().splitlines() if line.startswith("none of")]
    assert "(cat, dog) is a class of" in warning and "(bright, dark)" in warning
    caplog.clear()
    run_classify(work / "pets", bundle, output=tmp_path / "q.csv", models_dir=models_dir, cache=None, progress=False)
    assert "none of" not in messages()  # its own classes: no warning


def test_each_store_has_its_own_classifiers_and_classify_picks_those_of_its_cache(fitted, tmp_path, monkeypatch):
    work, models_dir, _ = fitted
    monkeypatch.chdir(tmp_path)
    shutil.copy(work / "pets.h5", tmp_path / "a.h5")
    shutil.copytree(work / "pets.h5.shards", tmp_path / "a.h5.shards")
    report = run_fit(tmp_path / "a.h5", n_jobs=1, classifiers=["logreg"], curve=False)  # no out: the store's own
    assert (tmp_path / "models" / "classifiers" / "a" / "report.json").exists() and report["bundles"]
    from pipeline.files import classifiers_dir

    assert classifiers_dir(tmp_path / "a.h5") == classifiers_dir("features/a.h5") == (
        tmp_path / "models" / "classifiers" / "a").relative_to(tmp_path)
    chosen = choose_bundle(None, None, None, classifiers_dir(tmp_path / "a.h5"))
    assert chosen.parent == classifiers_dir("a.h5") and chosen.name == "resnet50-logreg.skops"


def crafted_folder(folder, marker):
    """A classifiers folder as someone else could send it: a pickle named as a bundle, which would write ``marker``
    when unpickled, and a report.json beside it listing its sha256."""
    from tests.test_bundle import Payload

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "resnet50-logreg.joblib"
    joblib.dump({"format": "pipeline.classifier-bundle", "payload": Payload(marker)}, path)
    report = {"bundles": [{"path": path.name, "sha256": sha256_file(path), "features": "resnet50",
                           "classifier": "logreg", "validation_score": 1.0}]}
    (folder / "report.json").write_text(json.dumps(report))
    return path


def test_a_crafted_bundle_listed_in_its_own_report_runs_nothing(fitted, tmp_path):
    work, models_dir, _ = fitted
    marker = tmp_path / "ran"
    bundle = crafted_folder(tmp_path / "received", marker)
    assert choose_bundle(None, None, None, tmp_path / "received") == bundle
    with pytest.raises(UserError, match="is a joblib pickle .* pass --trust"):
        run_classify(work / "pets", bundle, output=None, models_dir=models_dir, cache=None, progress=False)
    done = run("pets", "--classifiers-dir", tmp_path / "received", "--models-dir", models_dir, cwd=work)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "joblib pickle" in done.stderr
    assert not marker.exists()


def test_bundles_of_the_landed_version_are_rewritten_once_as_skops(fitted, tmp_path):
    from pipeline.fit.bundle import _fields
    from pipeline.fit.upgrade import upgrade_bundles

    work, models_dir, _ = fitted
    folder = tmp_path / "classifiers"
    shutil.copytree(work / "classifiers", folder)
    report = json.loads((folder / "report.json").read_text())
    for entry in report["bundles"]:  # as the landed version wrote them: joblib pickles
        bundle = ClassifierBundle.load(folder / entry["path"])
        legacy = (folder / entry["path"]).with_suffix(".joblib")
        joblib.dump({"format": "pipeline.classifier-bundle", "format_version": 1, **_fields(bundle)}, legacy,
                    compress=3)
        (folder / entry["path"]).unlink()
        entry.update(path=legacy.name, sha256=sha256_file(legacy))
    (folder / "report.json").write_text(json.dumps(report))
    legacy = folder / "resnet50-logreg.joblib"
    with pytest.raises(UserError, match="joblib pickle"):
        run_classify(work / "pets", legacy, output=None, models_dir=models_dir, cache=None, progress=False)
    trusted = run_classify(work / "pets", legacy, output=None, models_dir=models_dir, cache=None, progress=False,
                           trust=True)
    written = upgrade_bundles(folder)
    assert sorted(p.name for p in written) == ["pixels-logreg.skops", "resnet50-logreg.skops"]
    assert choose_bundle(None, "resnet50", None, folder).name == "resnet50-logreg.skops"
    upgraded = run_classify(work / "pets", folder / "resnet50-logreg.skops", output=None, models_dir=models_dir,
                            cache=None,
                            progress=False)
    assert upgraded["correct"] == trusted["correct"] and upgraded["classified"] == trusted["classified"]
