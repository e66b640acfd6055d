"""Format-1 stores (one HDF5 file): read as they are, converted once, crash-safely, by the first write."""

from __future__ import annotations

import signal
import subprocess
import sys

import h5py
import numpy as np

from pipeline.extract.discover import ImageRecord
from pipeline.store import EmbeddingStore
from tests.stores import PIXELS, ROOT, format1_journal_segment, format1_store


def assert_holds(store: EmbeddingStore, expected: dict[str, dict]) -> None:
    """The store's sets hold exactly the expected rows, in order, through every reader."""
    assert store.feature_sets() == sorted(expected)
    for name, want in expected.items():
        loaded = store.load(name)
        assert list(loaded.paths) == want["paths"] and list(loaded.splits) == want["splits"]
        assert list(loaded.sha256) == want["sha256"] and loaded.labels.tolist() == want["labels"].tolist()
        np.testing.assert_array_equal(loaded.embeddings, want["embeddings"])
        assert loaded.attrs["fingerprint"] == want["attrs"]["fingerprint"] and list(loaded.classes) == ["cat", "dog"]
        assert list(store.failures(name).paths) == want["failures"]
        assert store.counts(name) == (len(want["paths"]), len(want["failures"]))
        with store.rows(name) as rows:
            np.testing.assert_array_equal(np.concatenate([rows.read(a, b) for a, b in rows.blocks()]),
                                          want["embeddings"])
        found = store.lookup(name, want["attrs"]["fingerprint"])
        np.testing.assert_array_equal(found[want["sha256"][3]], want["embeddings"][3])


def test_a_format1_store_is_read_as_it_is(tmp_path):
    path = tmp_path / "old.h5"
    expected = format1_store(path)
    before = path.read_bytes()
    store = EmbeddingStore(path)
    assert store.root_attrs()["format_version"] == 1
    assert_holds(store, expected)
    assert path.read_bytes() == before and not store.shards.exists()  # reading changes nothing


def test_the_first_write_converts_it_once_and_says_so(tmp_path, caplog, messages):
    path = tmp_path / "old.h5"
    expected = format1_store(path)
    store = EmbeddingStore(path)
    with store.writer():
        pass
    assert "converting the store to format 2, once" in messages()
    caplog.clear()
    with h5py.File(path, "r") as index:
        assert index.attrs["format_version"] == 2 and index.attrs["version"] == 1
    assert_holds(store, expected)
    assert all(name.endswith("-conversion.h5") for name in (p.name for p in store.shards.glob("*/*.h5")))
    with store.writer():
        pass
    assert "converting" not in messages()  # once


def test_an_interrupted_format1_run_becomes_pending_shards(tmp_path):
    path = tmp_path / "old.h5"
    expected = format1_store(path)
    format1_journal_segment(path, "resnet50", {"bird/0.jpg": 5.0})
    store = EmbeddingStore(path)
    with store.writer() as writer:
        assert len(writer.known("resnet50", expected["resnet50"]["attrs"]["fingerprint"])) == 13 + 1
        records = [ImageRecord(p, p.split("/")[0], s) for p, s in zip(expected["resnet50"]["paths"],
                                                                       expected["resnet50"]["splits"])]
        writer.commit(ROOT, records + [ImageRecord("bird/0.jpg", "bird"), ImageRecord("dog/broken.jpg", "dog")], {})
    assert not store.journal.exists()
    loaded = store.load("resnet50")
    assert loaded.paths[-1] == "bird/0.jpg" and loaded.classes[loaded.labels[-1]] == "bird"
    assert (loaded.embeddings[-1] == 5.0).all() and store.counts(PIXELS) == (12, 0)


CONVERSION_KILLED = """
import sys, time
import pipeline.store.legacy as legacy
from pipeline.store import EmbeddingStore

write_shard = legacy.write_shard_blocks

def one_shard_then_stop(*args):
    write_shard(*args)
    print("written", flush=True)
    time.sleep(300)

legacy.write_shard_blocks = one_shard_then_stop
with EmbeddingStore(sys.argv[1]).writer():
    pass
"""


def test_a_conversion_killed_midway_leaves_the_format1_store_whole(tmp_path):
    path = tmp_path / "old.h5"
    expected = format1_store(path)
    before = path.read_bytes()
    process = subprocess.Popen([sys.executable, "-c", CONVERSION_KILLED, str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "written"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert path.read_bytes() == before  # still the format-1 file, whole
    assert_holds(EmbeddingStore(path), expected)
    with EmbeddingStore(path).writer():  # converted this time; the killed attempt's shard is deleted
        pass
    assert_holds(EmbeddingStore(path), expected)
    assert len(list((tmp_path / "old.h5.shards").glob("*/*.h5"))) == 2

