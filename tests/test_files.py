"""File helpers: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.files import atomic_path, sha256_file, write_json_atomic


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 9000  # spans several read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"


def test_write_json_atomic_creates_folders(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_json_atomic(target, {"x": [1, 2]})
    assert json.loads(target.read_text()) == {"x": [1, 2]}


def test_the_run_lock_refuses_a_second_holder_and_leaves_no_file(tmp_path):
    from pipeline.errors import UserError
    from pipeline.files import exclusive

    lock = tmp_path / "store.h5.lock"
    with exclusive(lock, "busy"):
        assert lock.exists()
        with pytest.raises(UserError, match="busy"), exclusive(lock, "busy"):
            pass
    assert not lock.exists()  # no empty lock file left behind
    with exclusive(lock, "busy"):  # and it can be taken again
        pass
    assert not list(tmp_path.iterdir())
