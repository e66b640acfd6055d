"""Pending shards, what a set already holds, the listing, and the commit's rules (latest wins, kept classes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.extract.discover import ImageRecord
from pipeline.store import EmbeddingStore
from pipeline.store.commit import Listing, RunName, carry, garbage, pending_shards
from pipeline.store.spec import path_keys
from tests.test_store import DATASET, ROOT, by_path, records, segment, shard_files


def test_the_listing_is_sorted_by_key_and_keeps_class_indices():
    listing = Listing.of(records(("b.jpg", "dog", "test"), ("a.jpg", "cat", "train"), ("c.jpg", None, "")))
    assert list(listing.keys) == sorted(path_keys(["a.jpg", "b.jpg", "c.jpg"]))
    assert listing.names == ["cat", "dog"] and listing.order.dtype == np.int32
    classes, labels = listing.classes(["dog", "bird"])  # indices written before never move
    assert classes == ["dog", "bird", "cat"]
    by_path_key = dict(zip(listing.keys, labels))
    assert [by_path_key[k] for k in path_keys(["a.jpg", "b.jpg", "c.jpg"])] == [2, 0, -1]
    found, at = listing.find(path_keys(["c.jpg", "z.jpg"]))
    assert list(found) == [True, False] and int(listing.order[at[0]]) == 2


def test_pending_shards_are_in_run_order_and_only_those_of_this_version(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}))
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})  # version 1
    later = EmbeddingStore(store.path).writer()
    later.append(segment({"dog/b.jpg": 2}))
    later.append(segment({"c.jpg": 3}))
    index = store.index()
    names = [p.name for p in pending_shards(store.shards, index)]
    assert len(names) == 2 and names == sorted(names, key=lambda n: Path(n).name)
    stale = store.shards / "m" / f"000000-{RunName(0).run}-0000000009-local.h5"  # written on version 0, never listed
    shutil.copy(store.shards / names[0], stale)
    assert stale not in [store.shards / p.name for p in pending_shards(store.shards, index)]
    assert stale in garbage(store.shards, index, names)


def test_duplicate_rows_in_pending_shards_are_listed_once(tmp_path):
    # A Ray batch retried after its worker wrote the shard: the same rows twice, under two writer names.
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}))
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}))
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    loaded = store.load("m")
    assert sorted(loaded.paths) == ["cat/a.jpg", "dog/b.jpg"] and store.counts("m") == (2, 0)
    assert len(shard_files(store)) == 1  # the superseded copy is retired


def test_carried_shards_stay_pending_on_the_next_version(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}))
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})
    writer.append(segment({"dog/b.jpg": 2}))
    index = store.index()
    pending = pending_shards(store.shards, index)
    carry(store.shards, pending, index.version + 1)  # as a drop or a compaction does before its index
    assert [p.name.split("-")[0] for p in pending_shards(store.shards, index)] == ["m/000002"]
    EmbeddingStore(store.path).writer().commit(ROOT, DATASET[:2], {"m": "f1"})
    assert by_path(store) == {"cat/a.jpg": 1, "dog/b.jpg": 2}


def test_labels_and_splits_follow_the_listing_without_new_shards(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}))
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    before = shard_files(store)
    writer.commit(ROOT, [ImageRecord("cat/a.jpg", "lynx", "validation"), ImageRecord("dog/b.jpg", "dog", "test")],
                  {"m": "f1"})
    loaded = store.load("m")
    assert shard_files(store) == before
    assert [loaded.classes[i] for i in loaded.labels] == ["lynx", "dog"] and list(loaded.splits) == [
        "validation", "test"]
    assert list(loaded.classes) == ["cat", "dog", "lynx"]
