"""The neighbor index derived from a store: exact and approximate, kept beside the store, brought up to each version
by the rows of new shards, never returning deleted rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.extract.discover import ImageRecord
from pipeline.store import EmbeddingStore, FileState, Segment, neighbors
from tests.test_store import ATTRS, ROOT, sha

DIM = 32


def vectors(count: int, seed: int = 0) -> np.ndarray:
    """Clustered rows (20 clusters), like embeddings; any two distinct rows are far below 0.95."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, DIM)) * 2
    return (centres[rng.integers(0, 20, count)] + rng.normal(size=(count, DIM))).astype(np.float32)


def commit(store: EmbeddingStore, rows: dict[str, np.ndarray], live: list[str], fingerprint: str = "f1") -> None:
    """Write ``rows`` (path to embedding) as one run's shard, then commit ``live`` as the dataset."""
    segment = Segment("m", fingerprint, {**ATTRS, "fingerprint": fingerprint, "embedding_dim": DIM}, str(ROOT))
    for path, embedding in rows.items():
        segment.records.append(ImageRecord(path, path.split("/")[0], "train" if hash(path) % 4 else "test"))
        segment.states.append(FileState(sha(path), 10, 1))
        segment.embeddings.append(embedding)
    with store.writer() as writer:
        writer.append(segment)
        writer.commit(ROOT, [ImageRecord(p, p.split("/")[0]) for p in live], {"m": fingerprint})


def planted(count: int) -> tuple[dict[str, np.ndarray], set[tuple[str, str]]]:
    """``count`` rows, with an exact copy of row 0 and near copies (cosine >= 0.99) of rows 1..5."""
    X = vectors(count)
    rows = {f"c{i % 3}/{i:05d}.jpg": X[i] for i in range(count)}
    rng = np.random.default_rng(1)
    rows["copy/exact.jpg"] = X[0].copy()
    expected = {("c0/00000.jpg", "copy/exact.jpg")}
    for i in range(1, 6):
        rows[f"copy/near{i}.jpg"] = X[i] + 0.02 * np.linalg.norm(X[i]) / np.sqrt(DIM) * rng.normal(size=DIM)
        expected.add((f"c{i % 3}/{i:05d}.jpg", f"copy/near{i}.jpg"))
    return rows, expected


@pytest.fixture(params=["exact", "approximate"])
def search(request, monkeypatch) -> str:
    if request.param == "approximate":
        monkeypatch.setattr(neighbors, "EXACT_ROWS", 100)
        monkeypatch.setattr(neighbors, "TRAIN_PER_LIST", 10)
    return request.param


def found_pairs(store: EmbeddingStore, threshold: float = 0.95) -> set[tuple[str, str]]:
    pairs, _ = store.similar_pairs("m", threshold)
    paths = store.load("m", embeddings=False).paths
    return {tuple(sorted((str(paths[a]), str(paths[b])))) for a, b in zip(pairs.first, pairs.second)}


def test_planted_exact_and_near_duplicates_are_the_pairs_found(tmp_path, search):
    store = EmbeddingStore(tmp_path / "e.h5")
    rows, expected = planted(600)
    commit(store, rows, list(rows))
    assert found_pairs(store) == {tuple(sorted(pair)) for pair in expected}
    index = store.neighbor_index("m")
    assert index.exact == (search == "exact")
    assert ("exact" in index.method) == (search == "exact")
    assert (tmp_path / "e.h5.neighbors").is_dir()


def test_neighbors_of_a_stored_image_include_itself_first(tmp_path, search):
    store = EmbeddingStore(tmp_path / "e.h5")
    X = vectors(400)
    rows = {f"c{i % 3}/{i:05d}.jpg": X[i] for i in range(len(X))}
    commit(store, rows, list(rows))
    found = store.neighbors("m", X[[3, 250]], k=5)
    assert found.paths[:, 0].tolist() == ["c0/00003.jpg", "c1/00250.jpg"]
    assert found.similarity[:, 0] == pytest.approx(1.0, abs=0.01)
    assert (np.diff(found.similarity, axis=1) <= 1e-6).all()
    assert found.labels[0, 0] == "c0" and found.root == str(ROOT) and found.exact == (search == "exact")
    # the same k nearest as an exhaustive search
    Z = X - X.mean(axis=0)
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    truth = np.argsort(-(Z[[3, 250]] @ Z.T), axis=1)[:, :5]
    loaded = store.load("m", embeddings=False)
    expected = loaded.paths[truth]
    assert (found.paths == expected).mean() >= 0.9


def test_a_later_version_adds_only_new_shards_and_deleted_rows_never_return(tmp_path, search):
    store = EmbeddingStore(tmp_path / "e.h5")
    rows, _ = planted(600)
    first = {p: v for p, v in rows.items() if not p.startswith("copy/")}
    commit(store, first, list(first))
    built = store.neighbor_index("m")
    assert len(built) == 600

    copies = {p: v for p, v in rows.items() if p.startswith("copy/")}
    gone = ["c1/00001.jpg", "c0/00003.jpg"]  # two originals of near copies leave the dataset
    live = [p for p in rows if p not in gone]
    commit(store, copies, live)
    grown = store.neighbor_index("m")
    assert len(grown) == 604 and grown.built_rows == built.built_rows  # added and removed, not rebuilt
    paths = store.load("m", embeddings=False).paths
    assert not set(gone) & set(paths.tolist())
    found = store.neighbors("m", np.stack([rows[p] for p in gone]), k=10)
    assert not set(gone) & set(found.paths.ravel().tolist())
    assert found_pairs(store) == {("c0/00000.jpg", "copy/exact.jpg"), ("c2/00002.jpg", "copy/near2.jpg"),
                                  ("c1/00004.jpg", "copy/near4.jpg"), ("c2/00005.jpg", "copy/near5.jpg")}
    queries = np.stack([rows["copy/near2.jpg"], rows["c1/00010.jpg"], rows["c2/00599.jpg"]])
    incremental = store.neighbors("m", queries, k=4)
    for kept in (tmp_path / "e.h5.neighbors").iterdir():
        kept.unlink()
    fresh = store.neighbors("m", queries, k=4)  # built afresh at this version
    assert [set(row) for row in fresh.paths[:, :2]] == [set(row) for row in incremental.paths[:, :2]]


def test_an_earlier_version_reads_its_own_rows(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    X = vectors(50)
    rows = {f"c0/{i:03d}.jpg": X[i] for i in range(50)}
    commit(store, rows, list(rows))
    commit(store, {}, list(rows)[:40])  # ten rows deleted in version 2
    current = store.neighbors("m", X[45:46], k=1)
    assert current.paths[0, 0] != "c0/045.jpg"
    earlier = EmbeddingStore(f"{tmp_path / 'e.h5'}@1").neighbors("m", X[45:46], k=1)
    assert earlier.paths[0, 0] == "c0/045.jpg" and earlier.version == 1


def test_a_set_computed_anew_rebuilds_and_an_unreadable_index_is_built_again(tmp_path, caplog):
    store = EmbeddingStore(tmp_path / "e.h5")
    X = vectors(60)
    commit(store, {f"c0/{i:03d}.jpg": X[i] for i in range(60)}, [f"c0/{i:03d}.jpg" for i in range(60)])
    assert store.neighbor_index("m").fingerprint == "f1"
    commit(store, {f"c0/{i:03d}.jpg": -X[i] for i in range(60)}, [f"c0/{i:03d}.jpg" for i in range(60)],
           fingerprint="f2")
    assert store.neighbors("m", -X[7:8], k=1).paths[0, 0] == "c0/007.jpg"
    description = next(Path(tmp_path / "e.h5.neighbors").glob("*.npz"))
    description.write_bytes(b"not an index")
    assert store.neighbors("m", -X[9:10], k=1).paths[0, 0] == "c0/009.jpg"
    assert "building the neighbor index again" in caplog.text


def test_fewer_rows_than_k_leave_empty_places(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    X = vectors(3)
    commit(store, {f"c0/{i}.jpg": X[i] for i in range(3)}, [f"c0/{i}.jpg" for i in range(3)])
    found = store.neighbors("m", X[:1], k=5)
    assert found.rows[0, 3:].tolist() == [-1, -1] and found.paths[0, 3:].tolist() == ["", ""]
    assert np.isneginf(found.similarity[0, 3:]).all()


def test_lists_grow_with_the_rows():
    assert neighbors.lists_for(1_000_000) == 1024 and neighbors.lists_for(100_000) == 256
    assert neighbors.lists_for(10) == 16


def test_queries_of_another_width_are_one_sentence(tmp_path):
    from pipeline.errors import UserError

    store = EmbeddingStore(tmp_path / "e.h5")
    X = vectors(5)
    commit(store, {f"c0/{i}.jpg": X[i] for i in range(5)}, [f"c0/{i}.jpg" for i in range(5)])
    with pytest.raises(UserError, match="the queries have 8 values each and .*e.h5's m embeddings 32"):
        store.neighbors("m", np.zeros((1, 8), np.float32))
