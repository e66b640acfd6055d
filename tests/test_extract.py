"""extract end to end: stored embeddings equal torchvision's, incremental runs, layouts, kills and errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.errors import UserError, command
from pipeline.extract import features
from pipeline.extract import run as extract
from pipeline.extract.decode import PIXELS_FINGERPRINT, decode_file
from pipeline.extract.run import run_extract
from pipeline.models import DEFAULT_BACKBONES, ModelRepository
from pipeline.store import PIXELS, EmbeddingStore
from tests.conftest import make_state_dict
from tests.images import class_folders, hostile_corpus, pets, photo, save


def reference_embeddings(model: str, root: Path, paths, size: int) -> np.ndarray:
    """torchvision all the way: PIL loading (upright, RGB), Resize + CenterCrop + ToTensor + Normalize, the model."""
    backbone = DEFAULT_BACKBONES[model]
    network = getattr(torchvision.models, model)()
    network.load_state_dict(make_state_dict(model))
    extractor = create_feature_extractor(network.eval(), {backbone.embedding_layer: "embedding"})
    prepare = transforms.Compose([
        transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(backbone.mean, backbone.std),
    ])
    images = []
    for path in paths:
        with Image.open(root / path) as image:
            images.append(prepare(ImageOps.exif_transpose(image).convert("RGB")))
    with torch.no_grad():
        return extractor(torch.stack(images))["embedding"].flatten(1).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embeddings_equal_torchvision_and_failures_are_recorded(tmp_path, small_models, extract_quietly):
    data = pets(tmp_path / "pets")
    specs = extract_quietly(data, tmp_path / "e.h5", small_models, batch_size=3)
    assert [(s.name, s.embedded, s.skipped) for s in specs] == [("resnet50", 9, 1), (PIXELS, 9, 1)]

    store = EmbeddingStore(tmp_path / "e.h5")
    features = store.load("resnet50")
    assert sorted(features.paths) == sorted(
        ["cat/0.jpg", "cat/1.jpg", "cat/sub/2.png", "cat/3.jpg", "cat/gray.png", "dog/0.jpg", "dog/1.jpg",
         "dog/sub/2.png", "dog/rotated.jpg"]
    )
    want = reference_embeddings("resnet50", data, features.paths, 64)
    assert cosine(features.embeddings, want).min() >= 0.999
    np.testing.assert_allclose(features.embeddings, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert list(features.classes) == ["cat", "dog"]
    assert [features.classes[i] for i in features.labels] == [p.split("/")[0] for p in features.paths]
    assert features.attrs["image_size"] == 64 and features.attrs["precision"] == "fp32"
    assert features.attrs["provider"] == "CPUExecutionProvider" and features.attrs["weights_source"] == "file"
    assert features.attrs["onnx_sha256"] == features.attrs["fingerprint"]

    pixels = store.load(PIXELS)
    assert pixels.embeddings.shape == (9, 3072) and list(pixels.paths) == list(features.paths)
    failures = store.failures("resnet50")
    assert list(failures.paths) == ["dog/corrupt.jpg"] and "Truncated" in failures.reasons[0]
    assert store.root_attrs()["dataset_root"] == str(data)


def test_second_run_computes_nothing_and_changes_are_incremental(tmp_path, small_models, extract_quietly):
    data = pets(tmp_path / "pets")
    cache = tmp_path / "e.h5"
    extract_quietly(data, cache, small_models)
    stamp = cache.stat().st_mtime_ns
    again = extract_quietly(data, cache, small_models)
    assert [(s.embedded, s.skipped) for s in again] == [(0, 0), (0, 0)]
    assert cache.stat().st_mtime_ns == stamp  # not even rewritten

    (data / "cat" / "0.jpg").unlink()
    save(data / "cat" / "new.png", photo(64, 64, seed=99))
    save(data / "dog" / "1.jpg", photo(80, 80, seed=100))  # same name, new content
    os.utime(data / "dog" / "1.jpg", ns=(1, 1))
    specs = extract_quietly(data, cache, small_models)
    assert [(s.embedded, s.skipped) for s in specs] == [(2, 0), (2, 0)]
    features = EmbeddingStore(cache).load("resnet50")
    assert "cat/0.jpg" not in features.paths and len(features.paths) == len(set(features.paths)) == 9
    row = list(features.paths).index("dog/1.jpg")
    want = reference_embeddings("resnet50", data, ["dog/1.jpg"], 64)
    assert cosine(features.embeddings[row : row + 1], want)[0] >= 0.999


def test_split_layout_csv_and_flat_folders(tmp_path, small_models, extract_quietly):
    class_folders(tmp_path / "split" / "train", {"cat": 2, "dog": 2})
    class_folders(tmp_path / "split" / "validation", {"cat": 1, "dog": 1}, seed=10)
    extract_quietly(tmp_path / "split", tmp_path / "split.h5", small_models)
    features = EmbeddingStore(tmp_path / "split.h5").load("resnet50")
    assert sorted(set(features.splits)) == ["train", "validation"]
    assert all(p.startswith(s + "/") for p, s in zip(features.paths, features.splits))

    csv = tmp_path / "split" / "labels.csv"
    csv.write_text("path,label,split\ntrain/cat/0.jpg,tabby,test\ntrain/dog/0.jpg,,\n")
    extract_quietly(csv, tmp_path / "csv.h5", small_models)
    features = EmbeddingStore(tmp_path / "csv.h5").load("resnet50")
    rows = {p: (label, s) for p, label, s in zip(features.paths, features.labels, features.splits)}
    assert rows == {"train/cat/0.jpg": (0, "test"), "train/dog/0.jpg": (-1, "")}
    assert list(features.classes) == ["tabby"]

    anywhere = tmp_path / "manifests" / "anywhere.csv"  # absolute paths on "another disk", one gone
    anywhere.parent.mkdir()
    anywhere.write_text(f"{tmp_path}/split/train/cat/0.jpg,cat\n{tmp_path}/split/validation/dog/0.jpg,dog\n"
                        f"{tmp_path}/split/train/cat/gone.jpg,cat\n")
    specs = extract_quietly(anywhere, tmp_path / "anywhere.h5", small_models)
    store = EmbeddingStore(tmp_path / "anywhere.h5")
    assert store.root_attrs()["dataset_root"] == str(tmp_path / "split")
    assert sorted(store.load("resnet50").paths) == ["train/cat/0.jpg", "validation/dog/0.jpg"]
    assert failure_reasons(tmp_path / "anywhere.h5") == {"train/cat/gone.jpg": "missing: no such file"}
    assert (specs[0].embedded, specs[0].skipped) == (2, 1)

    for i in range(2):
        save(tmp_path / "flat" / f"{i}.jpg", photo(50, 50, seed=i))
    extract_quietly(tmp_path / "flat", tmp_path / "flat.h5", small_models)
    assert list(EmbeddingStore(tmp_path / "flat.h5").load("resnet50").labels) == [-1, -1]


def test_other_models_and_datasets_never_mix_without_overwrite(tmp_path, small_models, exported, extract_quietly):
    data = pets(tmp_path / "pets")
    cache = tmp_path / "e.h5"
    extract_quietly(data, cache, small_models)
    other_models = exported("resnet50", 224).onnx_path.parent
    with pytest.raises(UserError, match=r"holds resnet50 features from another model file \(weights file:.*64 px"):
        extract_quietly(data, cache, other_models)
    specs = extract_quietly(data, cache, other_models, overwrite=True)
    assert specs[0].embedded == 9 and specs[1].embedded == 0  # pixels are still valid
    assert EmbeddingStore(cache).load("resnet50").attrs["image_size"] == 224

    elsewhere = class_folders(tmp_path / "elsewhere", {"x": 1})
    with pytest.raises(UserError, match="holds images of"):
        extract_quietly(elsewhere, cache, other_models)


def test_pixels_of_an_earlier_recipe_are_made_again_once(
    tmp_path, small_models, extract_quietly, monkeypatch, messages
):
    data = pets(tmp_path / "pets")
    cache = tmp_path / "e.h5"
    with monkeypatch.context() as patched:
        patched.setattr(features, "PIXELS_FINGERPRINT", "pixels:32:v1")
        extract_quietly(data, cache, small_models)
    assert EmbeddingStore(cache).load_attrs(PIXELS)["fingerprint"] == "pixels:32:v1"
    specs = extract_quietly(data, cache, small_models)  # no --overwrite needed, the backbone's rows are kept
    assert [(s.name, s.embedded) for s in specs] == [("resnet50", 0), (PIXELS, 9)]
    assert "pixel-baseline features of an earlier recipe (pixels:32:v1)" in messages()
    stored = EmbeddingStore(cache).load(PIXELS)
    assert stored.attrs["fingerprint"] == PIXELS_FINGERPRINT and len(stored.paths) == 9
    path = list(stored.paths).index("cat/0.jpg")
    np.testing.assert_array_equal(stored.embeddings[path], decode_file(data / "cat" / "0.jpg", []).pixels)
    assert [s.embedded for s in extract_quietly(data, cache, small_models)] == [0, 0]


def test_precisions_are_separate_feature_sets_and_int8_is_calibrated_on_the_data(tmp_path, exported, extract_quietly):
    models_dir = tmp_path / "models"
    shutil.copytree(exported("resnet50", 64).onnx_path.parent, models_dir)
    data = pets(tmp_path / "pets")
    cache = tmp_path / "e.h5"
    specs = extract_quietly(data, cache, models_dir, precision="int8", calibration_images=4)
    assert [spec.name for spec in specs] == ["resnet50-int8", PIXELS] and specs[0].embedded == 9
    int8 = EmbeddingStore(cache).load("resnet50-int8")
    manifest = json.loads((models_dir / "resnet50-int8.json").read_text())
    assert int8.attrs["precision"] == "int8" and int8.attrs["model"] == "resnet50"
    assert int8.attrs["fingerprint"] == manifest["onnx_sha256"] == int8.attrs["onnx_sha256"]
    assert int8.attrs["source_onnx_sha256"] == manifest["derived_from"]["onnx_sha256"]
    assert int8.attrs["calibration_images"] == 4
    hashes = "\n".join(manifest["calibration"]["sha256"]).encode()
    assert int8.attrs["calibration_sha256"] == hashlib.sha256(hashes).hexdigest()

    assert extract_quietly(data, cache, models_dir)[0].name == "resnet50-int8"  # auto keeps the store's precision
    specs = extract_quietly(data, cache, models_dir, precision="fp32")  # the int8 set is untouched beside it
    assert specs[0].name == "resnet50" and specs[0].embedded == 9 and specs[1].embedded == 0
    store = EmbeddingStore(cache)
    fp32 = store.load("resnet50")
    assert {"resnet50", "resnet50-int8", PIXELS} <= set(store.feature_sets())
    assert fp32.attrs["precision"] == "fp32" and fp32.attrs["fingerprint"] == int8.attrs["source_onnx_sha256"]
    order = np.argsort(fp32.paths)
    a, b = fp32.embeddings[order], store.load("resnet50-int8").embeddings[np.argsort(int8.paths)]
    assert (np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min() >= 0.99
    # A second int8 run reuses the variant and the rows; auto on the CPU is fp32.
    assert extract_quietly(data, cache, models_dir, precision="int8")[0].embedded == 0
    assert extract_quietly(data, cache, models_dir, device="cpu")[0].name == "resnet50"
    with pytest.raises(UserError, match="--precision int4 is not one of"):
        extract_quietly(data, cache, models_dir, precision="int4")


def test_ctrl_c_keeps_finished_batches(tmp_path, small_models, monkeypatch, extract_quietly):
    data = pets(tmp_path / "pets")
    cache = tmp_path / "e.h5"
    extract_quietly(class_folders(tmp_path / "first", {"x": 1}), tmp_path / "other.h5", small_models)
    calls = {"n": 0}
    real = extract.record_batch

    def interrupted_on_third_batch(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(extract, "record_batch", interrupted_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_quietly(data, cache, small_models, batch_size=2)
    monkeypatch.setattr(extract, "record_batch", real)
    fingerprint = EmbeddingStore(tmp_path / "other.h5").load_attrs("resnet50")["fingerprint"]
    # two batches of two, in pending shards
    assert len(EmbeddingStore(cache).writer().known("resnet50", fingerprint)) == 4
    specs = extract_quietly(data, cache, small_models, batch_size=2)
    assert specs[0].embedded == 5 and specs[0].skipped == 1
    assert len(set(EmbeddingStore(cache).load("resnet50").paths)) == 9


def failure_reasons(cache: Path, name: str = "resnet50") -> dict[str, str]:
    failures = EmbeddingStore(cache).failures(name)
    return dict(zip(failures.paths.tolist(), failures.reasons.tolist()))


def unlisted(cache: Path) -> list[str]:
    """Shard files beside the store that its index does not list: pending ones, or leftovers of a killed commit."""
    store = EmbeddingStore(cache)
    listed = {entry.file for s in store.index(arrays=False).sets.values() for entry in s.shards}
    return sorted(p.relative_to(store.shards).as_posix() for p in store.shards.glob("*/*") if
                  p.relative_to(store.shards).as_posix() not in listed)


def unkept(cache: Path) -> list[str]:
    """Shard files beside the store that no kept version lists (the current one, or an earlier one within the
    retention): what a killed run or commit left behind, pending shards included."""
    store = EmbeddingStore(cache)
    kept = store.current_index(arrays=False).listed().union(
        *(store.version_index(v, arrays=False).listed() for v in store.kept_versions()))
    return [name for name in unlisted(cache) if name not in kept]


def assert_same_images(expected: Path, actual: Path, images: int) -> None:
    """``actual`` holds each of ``expected``'s ``images`` resnet50 rows once, with its embedding and label, \
in any order."""
    want, got = EmbeddingStore(expected).load("resnet50"), EmbeddingStore(actual).load("resnet50")
    assert len(got.paths) == len(set(got.paths)) == images and sorted(got.paths) == sorted(want.paths)
    order = {path: row for row, path in enumerate(got.paths)}
    at = [order[path] for path in want.paths]
    np.testing.assert_allclose(got.embeddings[at], want.embeddings, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.labels[at], want.labels)


KILLED_RUN = """
import sys
from pipeline.extract.run import run_extract
run_extract(sys.argv[1], models=["resnet50"], cache=sys.argv[2], batch_size=2, models_dir=sys.argv[3],
            weights=sys.argv[4],
            progress=False, journal_rows=2)
"""


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(
    tmp_path, small_models, extract_quietly, seeded_weights
):
    data = tmp_path / "many"
    class_folders(data, {"a": 20, "b": 20}, size=(300, 400))
    uninterrupted = tmp_path / "whole.h5"
    extract_quietly(data, uninterrupted, small_models)

    cache = tmp_path / "killed.h5"
    shards = tmp_path / "killed.h5.shards" / "resnet50"
    kills = 0
    for delay in (0.0, 0.3):
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, str(data), str(cache), str(small_models), seeded_weights])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if len(list(shards.glob("*.h5"))) >= 2:
                time.sleep(delay)
                break
            time.sleep(0.01)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        if cache.exists():
            EmbeddingStore(cache).feature_sets()  # the file opens after every kill
    assert kills >= 1

    extract_quietly(data, cache, small_models)
    assert not unkept(cache)  # every pending shard committed
    assert_same_images(uninterrupted, cache, 40)


@pytest.mark.slow  # eight runs killed at random moments: about a minute
def test_kill_9_at_eight_random_moments_never_costs_or_doubles_an_image(tmp_path, small_models, extract_quietly,
                                                                          seeded_weights):
    data = class_folders(tmp_path / "many", {"a": 15, "b": 15}, size=(200, 260))
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    uninterrupted = tmp_path / "whole.h5"
    extract_quietly(data, uninterrupted, small_models)
    command = [sys.executable, "-c", KILLED_RUN, str(data), "", str(small_models), seeded_weights]
    started = time.monotonic()
    subprocess.run(command[:4] + [str(tmp_path / "timed.h5")] + command[5:], check=True, capture_output=True)
    whole_run = time.monotonic() - started  # start-up, embedding, and the commit at the end
    cache = tmp_path / "killed.h5"
    rng = np.random.default_rng(7)
    for delay in sorted(rng.uniform(0.2, 1.0, 8) * whole_run):
        process = subprocess.Popen(command[:4] + [str(cache)] + command[5:], stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if cache.exists():
            EmbeddingStore(cache).feature_sets()  # the file opens after every kill
    extract_quietly(data, cache, small_models)
    assert EmbeddingStore(cache).counts("resnet50") == EmbeddingStore(uninterrupted).counts("resnet50") == (30, 1)
    assert_same_images(uninterrupted, cache, 30)
    assert not list(tmp_path.glob(".killed.h5.*.tmp")) and not unkept(cache)  # a commit killed midway leaves nothing


COMMIT_KILLED_AT = """
import sys, time
from pathlib import Path
import pipeline.store.compact as compact
import pipeline.store.index as index
import pipeline.store.writer as store_writer
from pipeline.extract.run import run_extract

marker, where = Path(sys.argv[5]), sys.argv[6]

def stop_here():
    marker.touch()
    time.sleep(300)  # the test kills the process here

write_view, write_index, write_shard = index._write_view, store_writer.write_index, compact.write_shard_blocks

def view_then_stop(group, *args):  # the new index half-written: one feature set's group, not the next
    write_view(group, *args)
    group.file.flush()
    stop_here()

def shard_then_stop(*args):  # compacting: a new shard written, the index that lists it not yet
    write_shard(*args)
    stop_here()

written = []

def second_index_then_stop(*args):  # the compacted index in place, the shards it retires not yet deleted
    write_index(*args)
    written.append(1)
    if len(written) == 2:
        stop_here()

compact.SMALL_SHARDS = 0  # every commit compacts its small shards
if where == "writing":
    index._write_view = view_then_stop
elif where == "compacting":
    compact.write_shard_blocks = shard_then_stop
else:
    store_writer.write_index = second_index_then_stop
run_extract(sys.argv[1], models=["resnet50"], cache=sys.argv[2], batch_size=2, models_dir=sys.argv[3],
            weights=sys.argv[4],
            progress=False, journal_rows=2)
"""


@pytest.mark.parametrize("where", ["writing", "compacting", "deleting"])
def test_kill_9_inside_the_commit_or_compaction_loses_and_doubles_nothing(tmp_path, small_models, extract_quietly,
                                                                          seeded_weights, where):
    data = class_folders(tmp_path / "many", {"a": 4, "b": 4}, size=(120, 160))
    cache, marker = tmp_path / "killed.h5", tmp_path / "in-commit"
    extract_quietly(data, cache, small_models, journal_rows=2)
    class_folders(data / "a" / "more", {"c": 4}, size=(100, 150), seed=50)  # 4 more images of class a
    uninterrupted = tmp_path / "whole.h5"
    extract_quietly(data, uninterrupted, small_models)

    command = [sys.executable, "-c", COMMIT_KILLED_AT, data, cache, small_models, seeded_weights, marker, where]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(list(map(str, command)), stderr=stderr)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), (tmp_path / "stderr.txt").read_text() or "the commit was never reached"
    process.send_signal(signal.SIGKILL)
    process.wait()
    rows = EmbeddingStore(cache).counts("resnet50")[0]  # the index opens: the old one, or the new one whole
    assert rows == (8 if where == "writing" else 12)
    assert unlisted(cache)  # pending shards, a compaction's new shard, or the shards it retired

    specs = extract_quietly(data, cache, small_models)
    assert specs[0].embedded == 0  # everything the killed run computed was kept
    assert not unkept(cache) and not list(tmp_path.glob(".killed.h5.*.tmp"))
    assert_same_images(uninterrupted, cache, 12)


def test_a_file_that_changes_or_vanishes_mid_run_costs_no_other_image(tmp_path, small_models, extract_quietly,
                                                                       monkeypatch):
    data = pets(tmp_path / "pets")
    changed, vanished = data / "dog" / "0.jpg", data / "dog" / "1.jpg"
    decode, first = extract.decode_file, []

    def decode_while_files_move(path, *args, **kwargs):
        if not first:  # after the run has listed the files, before it reads any
            first.append(Path(path))
            vanished.unlink()
            save(changed, photo(90, 70, seed=321))  # new content under the same name
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(extract, "decode_file", decode_while_files_move)
    cache = tmp_path / "e.h5"
    specs = extract_quietly(data, cache, small_models, batch_size=3, workers=1)
    assert first[0] not in (changed, vanished) and (specs[0].embedded, specs[0].skipped) == (8, 2)
    features = EmbeddingStore(cache).load("resnet50")
    assert len(features.paths) == len(set(features.paths)) == 8 and "dog/1.jpg" not in features.paths
    reasons = failure_reasons(cache)
    assert set(reasons) == {"dog/1.jpg", "dog/corrupt.jpg"} and reasons["dog/1.jpg"] == "missing: no such file"
    session = ModelRepository(small_models).load("resnet50").open("cpu")
    for path, row in zip(features.paths, features.embeddings):  # every row is its file's content as read
        alone = session.embed(decode_file(data / path, [session.manifest.preprocessing]).crops[0][None])[0]
        np.testing.assert_allclose(row, alone, rtol=1e-4, atol=1e-4, err_msg=path)

    monkeypatch.undo()
    again = extract_quietly(data, cache, small_models)
    # The changed file was stat'ed before it changed, so it is read again (and embedded again) once.
    assert (again[0].embedded, again[0].skipped) == (1, 0)
    whole = tmp_path / "whole.h5"
    extract_quietly(data, whole, small_models)
    assert_same_images(whole, cache, 8)
    assert EmbeddingStore(cache).counts("resnet50") == EmbeddingStore(whole).counts("resnet50") == (8, 1)


def test_missing_models_are_exported_first(tmp_path, state_dict_file):
    data = class_folders(tmp_path / "pets", {"cat": 1})
    models_dir = tmp_path / "models"
    specs = run_extract(
        data, models=["resnet50"], cache=tmp_path / "e.h5", models_dir=models_dir,
        weights=str(state_dict_file("resnet50")), progress=False,
    )
    assert (models_dir / "resnet50.onnx").exists() and specs[0].embedded == 1
    assert EmbeddingStore(tmp_path / "e.h5").load("resnet50").attrs["weights_source"] == "file"


def test_models_with_other_weights_are_exported_again_not_used(tmp_path, small_models, messages):
    models_dir = tmp_path / "models"
    shutil.copytree(small_models, models_dir)
    data = class_folders(tmp_path / "pets", {"cat": 1})
    specs = run_extract(data, models=["resnet50"], cache=tmp_path / "e.h5", models_dir=models_dir, weights="random",
                        progress=False)
    err = messages()
    assert "has weights file:" in err and "kept the export being replaced as" in err
    attrs = EmbeddingStore(tmp_path / "e.h5").load("resnet50").attrs
    assert attrs["weights_id"] == "random:seed=0" and attrs["image_size"] == 64 and specs[0].embedded == 1
    previous = json.loads((models_dir / "resnet50.previous.json").read_text())  # the user's export is never lost
    assert previous["weights"]["source"] == "file"
    assert hashlib.sha256((models_dir / "resnet50.previous.onnx").read_bytes()).hexdigest() == previous["onnx_sha256"]


def test_exported_models_are_used_as_they_are_and_weights_can_differ_per_model(tmp_path, small_models, messages):
    models_dir = tmp_path / "models"
    shutil.copytree(small_models, models_dir)  # exported from a weights file, as make models WEIGHTS=PATH does
    data = class_folders(tmp_path / "pets", {"cat": 1})
    before = (models_dir / "resnet50.onnx").stat().st_mtime_ns
    specs = run_extract(data, models=["resnet50"], cache=tmp_path / "e.h5", models_dir=models_dir,
                        progress=False)  # no --weights
    assert specs[0].embedded == 1 and specs[0].attrs["weights_source"] == "file"
    assert (models_dir / "resnet50.onnx").stat().st_mtime_ns == before and "exporting" not in messages()
    specs = run_extract(data, models=["resnet50"], cache=tmp_path / "f.h5", models_dir=models_dir,
                        weights=["resnet50=random"],
                        progress=False)
    assert specs[0].attrs["weights_id"] == "random:seed=0"
    with pytest.raises(UserError, match="names vgg16, which is not among --models"):
        run_extract(data, models=["resnet50"], cache=tmp_path / "g.h5", models_dir=models_dir, weights=["vgg16=random"])


def test_unreadable_files_are_failures_and_tried_again(tmp_path, small_models, extract_quietly):
    data = class_folders(tmp_path / "pets", {"cat": 2})
    (data / "cat" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    cache = tmp_path / "e.h5"
    assert extract_quietly(data, cache, small_models)[0].skipped == 1
    reasons = failure_reasons(cache)
    assert list(reasons) == ["cat/dangling.jpg"] and reasons["cat/dangling.jpg"].startswith("unreadable")
    save(tmp_path / "nowhere.jpg", photo(40, 40))  # the link now resolves
    specs = extract_quietly(data, cache, small_models)
    assert (specs[0].embedded, specs[0].skipped) == (1, 0)
    assert len(EmbeddingStore(cache).load("resnet50").paths) == 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.extract", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_exit_status_and_summary(tmp_path, small_models, seeded_weights):
    data = pets(tmp_path / "pets")
    common = ("--models", "resnet50", "--models-dir", str(small_models), "--cache", str(tmp_path / "e.h5"),
              "--weights", seeded_weights)
    done = run_cli(str(data), *common)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("resnet50 (weights file:") and ", fp32) [UNTRAINED" not in lines[0]
    assert ": embedded 9, failed 1; inference " in lines[0] and "s on CPUExecutionProvider;" in lines[0]
    assert lines[1] == "pixels: embedded 9, failed 1; the store holds 9 embeddings, 1 failed"
    assert lines[2].startswith("extract: 10 images in ") and "images/s" in lines[2] and "; store: " in lines[2]  # once
    assert "the store holds 9 embeddings, 1 failed" in done.stdout
    hint = f"{command('store')} failures resnet50 --cache {tmp_path / 'e.h5'}"  # runs as typed, nothing activated
    assert "1 image of the dataset could not be decoded or was too large" in done.stderr and hint in done.stderr
    listed = subprocess.run(hint.split(), capture_output=True, text=True, check=True).stdout
    assert listed.startswith("dog/corrupt.jpg\t") and "Truncated" in listed
    strict = run_cli(str(data), *common, "--strict")
    assert strict.returncode == extract.EXIT_SKIPPED and "embedded 0, failed 0;" in strict.stdout
    assert "nothing to do" in strict.stdout
    (data / "dog" / "corrupt.jpg").unlink()
    assert run_cli(str(data), *common, "--strict").returncode == 0
    missing = run_cli(str(tmp_path / "nowhere"), *common)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: ") and "does not exist" in missing.stderr
    assert run_cli(str(data), *common, "--batch-size", "0").returncode == 2


def test_help_documents_every_option():
    text = extract.build_parser().format_help()
    for option in ("--models", "--cache", "--batch-size", "--device", "--workers", "--models-dir", "--weights",
                   "--overwrite", "--strict", "Exit status"):
        assert option in text


@pytest.mark.slow
@pytest.mark.parametrize("model", DEFAULT_BACKBONES)
def test_full_size_embeddings_equal_torchvision(tmp_path, exported, state_dict_file, model):
    import sklearn.datasets

    data = pets(tmp_path / "pets")
    photos = Path(sklearn.datasets.__file__).parent / "images"  # two real JPEG photographs, 640x427
    for name in ("china.jpg", "flower.jpg"):
        shutil.copy(photos / name, data / "cat" / name)
    models_dir = exported(model, 224).onnx_path.parent
    weights = str(state_dict_file(model))
    run_extract(data, models=[model], cache=tmp_path / "e.h5", models_dir=models_dir, weights=weights, progress=False)
    features = EmbeddingStore(tmp_path / "e.h5").load(model)
    want = reference_embeddings(model, data, features.paths, 224)
    assert features.embeddings.shape == (11, DEFAULT_BACKBONES[model].embedding_dim)
    assert cosine(features.embeddings, want).min() >= 0.999


def test_journal_of_another_folder_is_not_mixed_in(tmp_path, small_models, extract_quietly):
    from pipeline.extract.discover import ImageRecord
    from pipeline.store import FileState, Segment

    cache = tmp_path / "e.h5"
    leftover = Segment("resnet50", "f", {"embedding_dim": 2048}, "/some/other/folder")
    leftover.records.append(ImageRecord("cat/0.jpg"))
    leftover.states.append(FileState("x", 1, 1))
    leftover.embeddings.append(np.zeros(2048, np.float32))
    EmbeddingStore(cache).writer().append(leftover)
    data = class_folders(tmp_path / "pets", {"cat": 1})
    with pytest.raises(UserError, match="interrupted run on /some/other/folder"):
        extract_quietly(data, cache, small_models)
    assert extract_quietly(data, cache, small_models, overwrite=True)[0].embedded == 1
    assert list(EmbeddingStore(cache).load("resnet50").paths) == ["cat/0.jpg"]


def test_too_large_images_are_recorded_then_tried_again_under_a_higher_limit(tmp_path, small_models, extract_quietly):
    data = class_folders(tmp_path / "pets", {"cat": 2})
    save(data / "cat" / "big.png", photo(300, 400))
    specs = extract_quietly(data, tmp_path / "e.h5", small_models, max_pixels=100_000)
    assert (specs[0].embedded, specs[0].skipped) == (2, 1)
    reasons = list(failure_reasons(tmp_path / "e.h5").values())
    assert reasons == ["too large: 400x300 pixels, above the limit of 100,000 (--max-pixels)"]
    specs = extract_quietly(data, tmp_path / "e.h5", small_models)  # the default limit
    assert (specs[0].embedded, specs[0].skipped) == (1, 0)
    assert EmbeddingStore(tmp_path / "e.h5").counts("resnet50") == (3, 0)
    with pytest.raises(UserError, match="--max-pixels 0 must be at least 1"):
        extract_quietly(data, tmp_path / "e.h5", small_models, max_pixels=0)


def test_a_hostile_corpus_embeds_every_good_file_once_in_its_own_row(tmp_path, small_models, extract_quietly, messages):
    data, good, bad = hostile_corpus(tmp_path / "hostile")
    specs = extract_quietly(data, tmp_path / "e.h5", small_models, batch_size=4)
    assert re.search(r"skipped 1 file\(s\) .* not valid UTF-8 \(first: 'mixed/odd-\\udcff-bytes.jpg'\)", messages())
    assert (specs[0].embedded, specs[0].skipped) == (len(good), len(bad))
    store = EmbeddingStore(tmp_path / "e.h5")
    features = store.load("resnet50")
    assert sorted(features.paths) == sorted(good)  # each once
    reasons = failure_reasons(tmp_path / "e.h5")
    assert set(reasons) == bad and reasons["mixed/bomb.png"].startswith("too large")
    session = ModelRepository(small_models).load("resnet50").open("cpu")
    for path, row in zip(features.paths, features.embeddings):  # the row of each path is that file's own embedding
        alone = session.embed(decode_file(data / path, [session.manifest.preprocessing]).crops[0][None])[0]
        np.testing.assert_allclose(row, alone, rtol=1e-4, atol=1e-4, err_msg=path)


def test_pixels_of_an_unknown_recipe_are_kept_unless_overwrite(tmp_path, small_models, extract_quietly, monkeypatch):
    data = pets(tmp_path / "pets")
    cache = tmp_path / "e.h5"
    with monkeypatch.context() as patched:  # as a newer version would write them
        patched.setattr(features, "PIXELS_FINGERPRINT", "pixels:32:v9")
        extract_quietly(data, cache, small_models)
    with pytest.raises(UserError, match=r"holds pixels features .*recipe pixels:32:v9.*--overwrite"):
        extract_quietly(data, cache, small_models)
    assert EmbeddingStore(cache).load_attrs(PIXELS)["fingerprint"] == "pixels:32:v9"
    specs = extract_quietly(data, cache, small_models, overwrite=True)
    assert [(s.name, s.embedded) for s in specs] == [("resnet50", 0), (PIXELS, 9)]
    assert EmbeddingStore(cache).load_attrs(PIXELS)["fingerprint"] == PIXELS_FINGERPRINT


def test_float16_storage_halves_the_bytes_reads_as_float32_and_a_set_keeps_one_storage(tmp_path, small_models,
                                                                                        extract_quietly):
    data = pets(tmp_path / "pets")
    full, half = tmp_path / "full.h5", tmp_path / "half.h5"
    extract_quietly(data, full, small_models)
    extract_quietly(data, half, small_models, storage="float16")
    exact, stored = EmbeddingStore(full).load("resnet50"), EmbeddingStore(half).load("resnet50")
    assert stored.attrs["storage"] == "float16" and stored.embeddings.dtype == np.float32
    assert np.array_equal(stored.embeddings, exact.embeddings.astype(np.float16).astype(np.float32))
    shards = lambda cache: sum(p.stat().st_size for p in Path(f"{cache}.shards").glob("resnet50/*.h5"))  # noqa: E731
    assert shards(half) < 0.7 * shards(full)
    with pytest.raises(UserError, match=r"half.h5 holds resnet50 as float16, and a set keeps one storage; extract "
                                        r"with --storage float16 to add to it, or --overwrite to make it again as "
                                        r"float32"):
        extract_quietly(data, half, small_models, storage="float32")
    (data / "cat" / "new.jpg").write_bytes((data / "cat" / "0.jpg").read_bytes())
    specs = extract_quietly(data, half, small_models)  # not asked: as the store holds each set
    assert specs[0].embedded == 1 and EmbeddingStore(half).load_attrs("resnet50")["storage"] == "float16"
    specs = extract_quietly(data, half, small_models, storage="float32", overwrite=True)
    assert specs[0].embedded == 10 and EmbeddingStore(half).load("resnet50").attrs["storage"] == "float32"
