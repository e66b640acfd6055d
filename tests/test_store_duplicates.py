"""Duplicate groups: pairs by hash and by similarity joined into groups, largest first, on both index kinds."""

from __future__ import annotations

import numpy as np

from pipeline.extract.discover import ImageRecord
from pipeline.store import EmbeddingStore, FileState, Pairs, Segment
from pipeline.store.duplicates import find_duplicates, group_duplicates, hash_pairs, threshold_for
from tests.test_store import ATTRS, ROOT
from tests.test_store_neighbors import DIM, planted, search, vectors  # noqa: F401 (search: a fixture)


def test_hash_pairs_link_each_copy_to_the_first_file_of_its_hash():
    first, second = hash_pairs(np.array(["b", "a", "", "b", "c", "b", ""], dtype=object))
    assert sorted(zip(first.tolist(), second.tolist())) == [(0, 3), (0, 5)]


def test_groups_are_chains_of_pairs_largest_first():
    pairs = Pairs(np.array([0, 1, 7]), np.array([1, 2, 8]), np.array([0.97, 0.96, 0.99], np.float32))
    sha = np.array(["", "", "", "x", "", "x", "", "", ""], dtype=object)
    groups = group_duplicates(9, pairs, sha)
    assert groups.count == 3 and groups.images() == 7
    assert groups.group.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert groups.rows.tolist() == [0, 1, 2, 3, 5, 7, 8]
    assert groups.exact.tolist() == [False, False, False, True, True, False, False]
    assert groups.similarity.tolist() == [np.float32(0.97), np.float32(0.97), np.float32(0.96), 1.0, 1.0,
                                          np.float32(0.99), np.float32(0.99)]
    nothing = group_duplicates(4, Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)),
                               np.array(["a", "b", "c", ""], dtype=object))
    assert nothing.count == 0 and not len(nothing.rows)


def write(store: EmbeddingStore, rows: dict[str, tuple[np.ndarray, str]], untrained: bool = False) -> None:
    """Rows of set ``m`` (path to embedding and file hash) committed as one run."""
    attrs = {**ATTRS, "embedding_dim": DIM, "untrained": untrained}
    segment = Segment("m", "f1", attrs, str(ROOT))
    for path, (embedding, sha256) in rows.items():
        segment.records.append(ImageRecord(path, path.split("/")[0]))
        segment.states.append(FileState(sha256, 10, 1))
        segment.embeddings.append(embedding)
    with store.writer() as writer:
        writer.append(segment)
        writer.commit(ROOT, [ImageRecord(p, p.split("/")[0]) for p in rows], {"m": "f1"})


def test_planted_exact_and_near_duplicates_are_grouped_by_both_searches(tmp_path, search):  # noqa: F811
    rows, expected = planted(600)
    hashes = {path: f"{number:064x}" for number, path in enumerate(rows)}
    hashes["copy/exact.jpg"] = hashes["c0/00000.jpg"]  # the same file
    store = EmbeddingStore(tmp_path / "e.h5")
    write(store, {path: (embedding, hashes[path]) for path, embedding in rows.items()})
    found = find_duplicates(store, "m")
    groups = {}
    for number, path in zip(found.groups.group, found.paths):
        groups.setdefault(int(number), set()).add(str(path))
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, expected))
    exact = {str(p) for p, same in zip(found.paths, found.groups.exact) if same}
    assert exact == {"c0/00000.jpg", "copy/exact.jpg"}
    assert found.threshold == threshold_for("m") == 0.95 and found.rows == 606 and not found.untrained
    assert ("exact" in found.method) == (search == "exact")
    if search == "approximate":
        assert found.recall_pairs == 0 or found.recall == 1.0


def test_a_recall_below_one_is_measured_and_reported(tmp_path, monkeypatch):
    from pipeline.store import neighbors

    monkeypatch.setattr(neighbors, "EXACT_ROWS", 100)
    monkeypatch.setattr(neighbors, "TRAIN_PER_LIST", 10)
    monkeypatch.setattr(neighbors, "PAIR_PROBES", 1)
    X = vectors(800)
    store = EmbeddingStore(tmp_path / "e.h5")
    write(store, {f"c0/{i:04d}.jpg": (X[i], f"{i:064x}") for i in range(800)})
    pairs, index = store.similar_pairs("m", 0.3)  # a low threshold: many pairs across cells, missed by one probe
    assert not index.exact and pairs.recall_pairs > 100 and 0 < pairs.recall < 1


def test_an_untrained_set_is_searched_and_says_so(tmp_path):
    X = vectors(20)
    store = EmbeddingStore(tmp_path / "e.h5")
    write(store, {f"c0/{i:02d}.jpg": (X[i % 10], f"{i:064x}") for i in range(20)}, untrained=True)
    found = find_duplicates(store, "m")
    assert found.untrained and found.groups.count == 10
