"""extract --backend ray on a real local Ray instance (2 CPUs): same store as the local backend, \
killed workers and drivers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray,dev]')")

from pipeline.errors import UserError  # noqa: E402
from pipeline.extract import cluster  # noqa: E402
from pipeline.extract import run as extract  # noqa: E402
from pipeline.extract.cluster import EmbedActor, ShardOutput, decode_batch, embed_on_ray, plan_workers  # noqa: E402
from pipeline.extract.decode import MAX_PIXELS  # noqa: E402
from pipeline.extract.discover import ImageRecord  # noqa: E402
from pipeline.extract.features import feature_specs  # noqa: E402
from pipeline.extract.plan import ExtractRun, WorkItem  # noqa: E402
from pipeline.models import DEFAULT_BACKBONES, ModelRepository  # noqa: E402
from pipeline.store import PIXELS, EmbeddingStore, FileState  # noqa: E402
from pipeline.store.shards import ShardEntry  # noqa: E402
from tests.images import class_folders, pets  # noqa: E402


def unlisted(cache: Path) -> list[str]:
    store = EmbeddingStore(cache)
    listed = {entry.file for s in store.index(arrays=False).sets.values() for entry in s.shards}
    return [p.name for p in store.shards.glob("*/*") if p.relative_to(store.shards).as_posix() not in listed]


def unkept(cache: Path) -> list[str]:
    """Shard files beside the store that no kept version lists (the current one, or an earlier one within the
    retention): what a killed run or commit left behind, pending shards included."""
    store = EmbeddingStore(cache)
    kept = store.current_index(arrays=False).listed().union(
        *(store.version_index(v, arrays=False).listed() for v in store.kept_versions()))
    return [name for name in unlisted(cache) if name not in kept]


def assert_same_store(a: Path, b: Path, any_order: bool = False) -> None:
    """Both stores hold the same rows bit for bit, in the same order unless ``any_order``, and the same failures."""
    first, second = EmbeddingStore(a), EmbeddingStore(b)
    assert first.feature_sets() == second.feature_sets()
    for name in first.feature_sets():
        x, y = first.load(name), second.load(name)
        if any_order:
            x, y = (replace(s, **{f: getattr(s, f)[np.argsort(s.paths)]
                                  for f in ("paths", "embeddings", "labels", "splits", "sha256")}) for s in (x, y))
        np.testing.assert_array_equal(x.paths, y.paths)
        np.testing.assert_array_equal(x.embeddings, y.embeddings)
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.splits, y.splits)
        np.testing.assert_array_equal(x.sha256, y.sha256)
        assert x.attrs == y.attrs
        assert first.counts(name) == second.counts(name)


@pytest.mark.slow  # starts Ray, whose actors load the model: seconds
def test_ray_store_equals_local_store_and_runs_are_incremental(
    tmp_path, small_models, extract_quietly, seeded_weights, ray_instance, capsys
):
    data = pets(tmp_path / "pets")
    extract_quietly(data, tmp_path / "local.h5", small_models, batch_size=3)
    specs = extract_quietly(data, tmp_path / "ray.h5", small_models, batch_size=3, backend="ray")
    assert [(s.name, s.embedded, s.skipped) for s in specs] == [("resnet50", 9, 1), (PIXELS, 9, 1)]
    assert_same_store(tmp_path / "local.h5", tmp_path / "ray.h5")
    assert ray.is_initialized()  # a running instance is joined, and left running

    command = [str(data), "--models", "resnet50", "--cache", str(tmp_path / "ray.h5"),
               "--models-dir", str(small_models), "--weights", seeded_weights, "--backend", "ray"]
    assert extract.main(command) == 0
    assert "nothing to do" in capsys.readouterr().out
    class_folders(data, {"bird": 2}, seed=50)
    for cache in ("local.h5", "ray.h5"):  # one actor of two threads this time
        specs = extract_quietly(data, tmp_path / cache, small_models, batch_size=3, workers=1,
                                backend="ray" if cache == "ray.h5" else "local")
        assert (specs[0].embedded, specs[0].skipped) == (2, 0)  # only the new images
    assert_same_store(tmp_path / "local.h5", tmp_path / "ray.h5")


def _embedding_actor_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::MapWorker") and b"EmbedActor" in command:
                pids.add(int(entry.name))
    return pids


@pytest.mark.slow  # starts Ray, whose actors load the model: seconds
def test_a_worker_killed_mid_run_changes_nothing(tmp_path, small_models, extract_quietly, ray_instance):
    data = class_folders(tmp_path / "many", {"a": 120, "b": 120}, size=(120, 160))
    extract_quietly(data, tmp_path / "local.h5", small_models, batch_size=4)
    shards = tmp_path / "ray.h5.shards" / "resnet50"
    killed = []

    def kill_one_actor_once_rows_arrive() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = _embedding_actor_pids()
            if pids and any(shards.glob("*.h5")):
                os.kill(min(pids), signal.SIGKILL)
                killed.append(min(pids))
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_actor_once_rows_arrive)
    killer.start()
    specs = extract_quietly(data, tmp_path / "ray.h5", small_models, batch_size=4, backend="ray", journal_rows=8)
    killer.join()
    assert killed, "the run ended before an actor could be killed"
    assert (specs[0].embedded, specs[0].skipped) == (240, 0)
    assert_same_store(tmp_path / "local.h5", tmp_path / "ray.h5")


KILLED_DRIVER = """
import sys
from pipeline.extract.run import run_extract
run_extract(sys.argv[1], models=["resnet50"], cache=sys.argv[2], batch_size=4, models_dir=sys.argv[3],
            weights=sys.argv[4],
            progress=False, journal_rows=8, backend="ray")
"""


@pytest.mark.slow  # starts Ray, whose actors load the model: seconds
def test_a_killed_driver_resumes_to_the_uninterrupted_store(
    tmp_path, small_models, extract_quietly, seeded_weights, ray_instance
):
    data = class_folders(tmp_path / "many", {"a": 100, "b": 100}, size=(120, 160))
    extract_quietly(data, tmp_path / "local.h5", small_models, batch_size=4)
    cache, shards = tmp_path / "ray.h5", tmp_path / "ray.h5.shards" / "resnet50"
    # The driver starts its own local Ray instance; its process group goes down with it, as in a killed job.
    driver = subprocess.Popen(
        [sys.executable, "-c", KILLED_DRIVER, str(data), str(cache), str(small_models), seeded_weights],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None and len(list(shards.glob("*.h5"))) < 2:
        time.sleep(0.01)
    assert driver.poll() is None, "the driver ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    settled = None  # an actor may outlive the driver for a moment and finish its shard: wait until none changes
    while settled != (settled := sorted(shards.glob("*"))):
        time.sleep(2)
    done = len(EmbeddingStore(cache).writer().known(
        "resnet50", EmbeddingStore(tmp_path / "local.h5").load_attrs("resnet50")["fingerprint"]))
    assert 0 < done < 200  # rows in the shards the actors had written

    specs = extract_quietly(data, cache, small_models, batch_size=4, backend="ray")
    assert specs[0].embedded == 200 - done  # only what the killed run's workers had not written
    assert not unkept(cache)  # every shard a worker wrote is listed, or was deleted
    # The same rows bit for bit; the killed run's shards come first, so the order is the uninterrupted run's
    # only when its actors had finished a prefix of the work (two actors finish their blocks in either order).
    assert_same_store(tmp_path / "local.h5", cache, any_order=True)


@pytest.mark.slow  # starts Ray, whose actors load the model: seconds
def test_workers_follow_the_cluster_and_refuse_cuda_without_gpus(ray_instance):
    assert plan_workers("auto", None).actors == 2 and plan_workers("cpu", None).threads == 1
    assert plan_workers("cpu", 1).threads == 2  # one actor gets both CPUs, as threads
    assert plan_workers("cpu", 1).remote_args == {"num_cpus": 1.0}  # as a decoding task: fused, never waiting
    with pytest.raises(UserError, match="the Ray cluster has no GPUs"):
        plan_workers("cuda", None)


@pytest.mark.slow  # starts Ray actors
def test_actors_refuse_a_model_file_other_than_the_drivers_in_one_sentence(tmp_path, small_models, ray_instance):
    image = class_folders(tmp_path / "one", {"a": 1}) / "a" / "0.jpg"
    session = ModelRepository(small_models).load("resnet50").open("cpu")
    # as if another node held another export under the same path
    session.model = replace(session.model, manifest=replace(session.manifest, onnx_sha256="0" * 64))
    specs, preprocessings = feature_specs([session])
    items = [WorkItem(ImageRecord("a/0.jpg"), FileState("", 1, 1), [spec.name for spec in specs])]
    output = ShardOutput(EmbeddingStore(tmp_path / "e.h5").writer(), str(tmp_path / "one"), 8)
    outcomes = embed_on_ray(ExtractRun(specs, preprocessings, 4, items), [str(image)], plan_workers("cpu", 1), output,
                            "cpu", MAX_PIXELS)
    with pytest.raises(UserError,
                       match=r"^on a Ray worker: .*resnet50.onnx on this node .* is not the model the driver"):
        list(outcomes)


def decoded_batch(data: Path, names: list[str], preprocessing=None) -> dict[str, np.ndarray]:
    """A decode task's output for files of ``data``, every file needing both feature sets."""
    if preprocessing is None:
        preprocessing = DEFAULT_BACKBONES["resnet50"].preprocessing()
    paths = np.array([str(data / name) for name in names], dtype=object)
    columns = {"index": np.arange(len(names)), "needed": np.full(len(names), 3), "path": paths,
               "record": np.array(names, dtype=object), "size": np.full(len(names), 7), "mtime": np.full(len(names), 8)}
    return decode_batch(columns, [preprocessing])


def test_decode_tasks_record_failures_in_their_row(tmp_path):
    data = pets(tmp_path / "pets")
    columns = decoded_batch(data, ["cat/0.jpg", "dog/corrupt.jpg", "gone.jpg"])
    assert columns["crop0"].shape == (3, 224, 224, 3) and columns["pixels"].shape == (3, 3072)
    assert columns["error"][0] == "" and columns["error"][1] and columns["error"][2] == "missing: no such file"
    assert columns["sha256"][1] and not columns["sha256"][2] and not columns["crop0"][1].any()
    assert list(columns["record"]) == ["cat/0.jpg", "dog/corrupt.jpg", "gone.jpg"] and (columns["size"] == 7).all()


def test_an_actor_writes_its_rows_as_pending_shards_and_returns_only_their_metadata(tmp_path, small_models):
    data = pets(tmp_path / "pets")
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    target = writer.target(str(data))
    session = ModelRepository(small_models).load("resnet50").open("cpu")
    actor = EmbedActor([session.model], "cpu", 1, 2, target)
    names = ["cat/0.jpg", "cat/1.jpg", "dog/corrupt.jpg"]
    crops = decoded_batch(data, names, session.manifest.preprocessing)
    columns = actor(crops)
    assert not any(key.startswith("features") for key in columns)  # no embedding goes back to the driver
    written = [ShardEntry(**entry) for entry in json.loads(columns["shards"][0])]
    assert [e.file.split("/")[0] for e in written] == ["resnet50", PIXELS] and [e.rows for e in written] == [2, 2]
    assert all(e.failures == 1 and (store.shards / e.file).stat().st_size == e.bytes for e in written)
    assert list(columns["shards"][1:]) == ["", ""]
    writer.commit(data, [ImageRecord(name, name.split("/")[0]) for name in names], {})  # the driver's commit
    features = store.load("resnet50")
    assert list(features.paths) == names[:2] and list(store.failures("resnet50").paths) == ["dog/corrupt.jpg"]
    np.testing.assert_allclose(features.embeddings, session.embed(crops["crop0"][:2]), rtol=1e-5, atol=1e-5)


def test_the_driver_refuses_shards_it_cannot_see(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    with pytest.raises(UserError,
                       match="a Ray worker wrote .*, which this machine cannot see: put --cache on a filesystem"):
        cluster._check_driver_sees_the_shard(store.writer(), ShardEntry("resnet50/000000-x.h5", "", 10, 1, 0))


def test_without_ray_the_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    with pytest.raises(UserError, match=r"needs Ray: pip install -e '\.\[ray\]'"):
        cluster.connect()


def test_an_unreachable_ray_address_is_one_sentence_within_seconds():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(UserError, match=f"nothing answers at RAY_ADDRESS=127.0.0.1:{port}"):
        cluster._check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
