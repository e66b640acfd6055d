"""``python -m pipeline.store``: info, failures, verify, convert, compact and drop, and their errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.errors import command
from pipeline.store import EmbeddingStore
from tests.stores import format1_store
from tests.test_store import DATASET, ROOT, listed_files, segment, shard_files


def cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.store", *arguments], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def cache(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}, {"dog/b.jpg": "truncated file"}))
    writer.append(segment({"c.jpg": 2}))
    writer.commit(ROOT, DATASET, {"m": "f1"})
    return store.path


def test_info_failures_and_verify(cache):
    info = cli("info", "--cache", str(cache))
    assert (info.returncode == 0 and "format 2, version 1" in info.stdout
            and "m: 2 rows, 1 failed, 2 shards" in info.stdout)
    failures = cli("failures", "m", "--cache", str(cache))
    assert failures.stdout == "dog/b.jpg\ttruncated file\n"
    assert "2 shards checked" in cli("verify", "--cache", str(cache)).stdout


def test_compact_and_drop(cache):
    compacted = cli("compact", "--cache", str(cache))
    assert compacted.returncode == 0 and "m: rewrote 2 shards as 1" in compacted.stdout
    assert len(listed_files(EmbeddingStore(cache))) == 1
    assert "no shard needs rewriting" in cli("compact", "--cache", str(cache)).stdout
    assert cli("drop", "m", "--cache", str(cache)).returncode == 0
    assert EmbeddingStore(cache).feature_sets() == [] and not listed_files(EmbeddingStore(cache))


def test_convert_a_format1_store(tmp_path):
    format1_store(tmp_path / "old.h5")
    converted = cli("convert", "--cache", str(tmp_path / "old.h5"))
    assert converted.returncode == 0 and "converting the store to format 2, once" in converted.stderr
    assert "format 2" in converted.stdout and "resnet50: 12 rows, 1 failed" in converted.stdout


def test_errors_are_one_sentence_and_status_2(cache, tmp_path):
    for arguments, message in (
        (("info", "--cache", str(tmp_path / "none.h5")), "error: no embedding store at"),
        (("failures", "--cache", str(cache)),
         f"error: say which feature set: {command('store')} failures SET (one of: m)"),
        (("drop", "vgg16", "--cache", str(cache)), f"error: {cache} has no 'vgg16' features (it has: m)."),
    ):
        result = cli(*arguments)
        assert result.returncode == 2 and result.stderr.startswith(message) and "Traceback" not in result.stderr
    (EmbeddingStore(cache).shards / sorted(shard_files(EmbeddingStore(cache)))[0]).unlink()
    verify = cli("verify", "--cache", str(cache))
    assert verify.returncode == 2 and "is missing" in verify.stderr and f"{command('store')} drop m" in verify.stderr
