"""Versions: a reader reads the version it opened whole while writers commit and compact; versions past the
retention are removed crash-safely; any kept version can be read again, by fit too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import h5py
import pytest

from pipeline.errors import UserError
from pipeline.extract.discover import ImageRecord
from pipeline.fit.bundle import ClassifierBundle
from pipeline.fit.run import run_fit
from pipeline.store import EmbeddingStore
from tests.stores import synthetic_store
from tests.test_store import DATASET, ROOT, listed_files, segment, sha, shard_files

WRITER = """
import json, sys
import numpy as np
from pipeline.extract.discover import ImageRecord
from pipeline.store import EmbeddingStore
from tests.test_store import ROOT, segment

path, log, commits = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
pool = [f"c{i % 3}/{i:03d}.jpg" for i in range(40)]
live = {}
versions = {}
for generation in range(1, commits + 1):
    gone = [p for p in live if rng.random() < 0.2]
    for p in gone:
        del live[p]
    changed = {p: float(generation * 1000 + n) for n, p in enumerate(pool) if rng.random() < 0.25}
    live.update(changed)
    with EmbeddingStore(path).writer() as writer:
        before = writer.location.current_index(arrays=False).version
        writer.append(segment(changed))
        writer.commit(ROOT, [ImageRecord(p) for p in sorted(live)], {"m": "f1"})  # and compacts past a threshold
        if generation % 7 == 0:
            writer.compact(force=True)
        for version in range(before + 1, writer.location.current_index(arrays=False).version + 1):
            versions[version] = dict(live)
    with open(log, "w") as stream:
        json.dump(versions, stream)
"""


def observe(path) -> tuple[int, dict[str, float], list[float], dict[str, float]]:
    """One round of reads at one version: loaded rows, streamed rows, and lookups by content hash."""
    store = EmbeddingStore(path).snapshot()
    loaded = store.load("m")
    content = {str(p): float(e[0]) for p, e in zip(loaded.paths, loaded.embeddings)}
    with store.rows("m") as rows:
        streamed = rows.read(0, len(rows))[:, 0].tolist() if len(rows) else []
    found = store.lookup("m", "f1")
    looked_up = {p: float(found[sha(p)][0]) for p in content}
    assert loaded.version == store.pinned
    return store.pinned, content, streamed, looked_up


@pytest.mark.slow  # about half a minute: 56 commits beside a reader that never stops
def test_readers_read_the_version_they_opened_whole_while_a_writer_commits_and_compacts(tmp_path):
    path, log = tmp_path / "e.h5", tmp_path / "versions.json"
    with EmbeddingStore(path).writer() as writer:  # a first version for the reader to open
        writer.append(segment({"first.jpg": 1.0}))
        writer.commit(ROOT, [ImageRecord("first.jpg")], {"m": "f1"})
    writing = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(log), "48"])
    observed = []
    while writing.poll() is None or not observed:
        observed.append(observe(path))
    assert writing.returncode == 0
    versions = {int(v): content for v, content in json.loads(log.read_text()).items()}
    versions[1] = {"first.jpg": 1.0}
    assert len(versions) >= 50 and len({v for v, *_ in observed}) > 5  # many commits, read at many versions
    for version, content, streamed, looked_up in observed:
        assert content == versions[version]
        assert streamed == list(content.values()) and looked_up == content
    unpinned = EmbeddingStore(path).load("m")  # a plain load reads the current version
    assert unpinned.version == max(versions)


CLEANUP_KILLED = """
import os, signal, sys
import pipeline.store.writer as store_writer
from pipeline.store import EmbeddingStore

garbage = store_writer.garbage

def stop_after_the_first_deletion(*args):
    found = garbage(*args)
    if found:
        found[0].unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return found

store_writer.garbage = stop_after_the_first_deletion
with EmbeddingStore(sys.argv[1]).writer() as writer:
    writer.cleanup(older_than=0)
"""


def store_of_versions(path) -> EmbeddingStore:
    """Versions 1 to 4: each commit changes every row, so that each version lists shards of its own."""
    store = EmbeddingStore(path)
    for generation in range(1, 5):
        with store.writer() as writer:
            writer.append(segment({"cat/a.jpg": generation, "dog/b.jpg": 10 * generation}))
            writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    return store


def test_a_cleanup_killed_midway_leaves_every_kept_version_whole_and_the_next_writer_finishes_it(tmp_path):
    store = store_of_versions(tmp_path / "e.h5")
    assert store.kept_versions() == [1, 2, 3] and len(shard_files(store)) == 4
    kill = subprocess.run([sys.executable, "-c", CLEANUP_KILLED, str(store.path)], timeout=120)
    assert kill.returncode == -signal.SIGKILL
    assert store.kept_versions() == [3]  # the version files went first; one of their shards since
    for version in (3, 4):
        loaded = EmbeddingStore(store.path, version=version).load("m")
        assert dict(zip(loaded.paths, loaded.embeddings[:, 0])) == {"cat/a.jpg": version, "dog/b.jpg": 10 * version}
    assert len(shard_files(store)) == 3
    with store.writer():  # the next writer finishes the cleanup
        pass
    assert set(shard_files(store)) == listed_files(store) | EmbeddingStore(store.path, 3).index().listed()


def test_a_version_past_the_retention_is_one_sentence_and_the_previous_one_always_stays(tmp_path):
    store = store_of_versions(tmp_path / "e.h5")
    with store.writer() as writer:
        assert writer.cleanup(older_than=3600) == []  # all superseded seconds ago
        assert writer.cleanup(older_than=0) == [1, 2]
    assert store.kept_versions() == [3]
    with pytest.raises(UserError, match=r"e.h5 no longer keeps version 2: versions are kept 24 hours after they are "
                                        r"superseded \(and always the previous one\); it keeps versions 3 to 3 and the "
                                        r"current version 4"):
        EmbeddingStore(f"{store.path}@2").load("m")
    with pytest.raises(UserError, match="has no version 9 .its current version is 4"):
        EmbeddingStore(store.path, version=9).load("m")
    with pytest.raises(UserError, match=r"e.h5@3 names a version to read; a run writes the next version"):
        EmbeddingStore(f"{store.path}@3").writer()


def test_versions_say_when_which_run_and_what_each_commit_changed(tmp_path):
    store = store_of_versions(tmp_path / "e.h5")
    with store.writer() as writer:
        writer.commit(ROOT, DATASET[:1], {"m": "f1"})  # dog/b.jpg left the dataset
    assert store.version_index(5, arrays=False).changes == {"m": {"added": 0, "deleted": 1}}
    current = store.current_index(arrays=False)  # half of a shard deleted: the commit compacted it
    assert current.version == 6 and current.changes == {"m": {"added": 0, "deleted": 0, "compacted": 1}}
    assert store.version_index(4, arrays=False).changes == {"m": {"added": 2, "deleted": 2}} and current.committed
    listing = subprocess.run([sys.executable, "-m", "pipeline.store", "versions", "--cache", str(store.path)],
                             capture_output=True, text=True, timeout=120)
    lines = listing.stdout.splitlines()
    assert lines[0].endswith("6 versions kept") and lines[-1].endswith("m 1; m compacted (1 shard)  (current)")
    assert "m 1; m +0 -1" in lines[-2] and "m 2; m +2 -2" in lines[-3]


def test_a_store_of_the_landed_format_2_reads_unchanged_and_its_history_starts_at_the_next_commit(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}))
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})
    with h5py.File(store.path, "a") as landed:  # as the landed version wrote it: no history attributes
        for name in ("committed", "run", "changes"):
            del landed.attrs[name]
    assert store.current_index().committed == "" and store.kept_versions() == []
    assert dict(zip(store.load("m").paths, store.load("m").embeddings[:, 0])) == {"cat/a.jpg": 1.0}
    with store.writer() as writer:
        writer.append(segment({"dog/b.jpg": 2}))
        writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert store.kept_versions() == [1] and EmbeddingStore(store.path, 1).load("m").paths.tolist() == ["cat/a.jpg"]
    with store.writer() as writer:
        assert writer.cleanup(older_than=0) == []  # the previous version, whatever its age


def test_fitting_a_kept_version_again_gives_the_same_report(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", per_class=12)
    first = run_fit(store.path, out=tmp_path / "a", n_jobs=1, classifiers=["logreg"], curve=False)
    with store.writer() as writer:  # two versions later, the store holds other rows
        writer.compact(force=True)
        writer.drop("vgg16")
    assert "vgg16" not in store.feature_sets()
    again = run_fit(f"{store.path}@1", out=tmp_path / "b", n_jobs=1, classifiers=["logreg"], curve=False)
    assert first["store_version"] == again["store_version"] == 1 and again["store"].endswith("s.h5@1")

    def numbers(report):
        return [(r["features"], r["params"], r["validation_score"], r["test"]) for r in report["results"]]

    assert numbers(again) == numbers(first) and {r["features"] for r in again["results"]} >= {"vgg16"}
    bundle = ClassifierBundle.load(tmp_path / "b" / "vgg16-logreg.skops")
    assert bundle.provenance["store"].endswith("s.h5@1")
    assert "store_version" in json.loads((tmp_path / "b" / "report.json").read_text())
