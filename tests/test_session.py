"""onnxruntime sessions: checked against the manifest, CPU fallback, embeddings of the right shape."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.files import available_cores
from pipeline.models import ModelRepository, cuda
from pipeline.models.session import CPU, _cpu_notice, _cuda_session


def open_backbone(models_dir, name, device="auto"):
    return ModelRepository(models_dir).load(name).open(device)


def test_cpu_session_embeds_batches(exported):
    result = exported("resnet50", 64)
    backbone = open_backbone(result.onnx_path.parent, "resnet50", device="cpu")
    assert backbone.provider == CPU and backbone.manifest == result.manifest
    crops = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    embeddings = backbone.embed(crops)
    assert embeddings.shape == (5, 2048) and embeddings.dtype == np.float32
    np.testing.assert_allclose(backbone.embed(crops[2:3])[0], embeddings[2], rtol=1e-5, atol=1e-6)
    options = backbone.session.get_session_options()
    assert options.intra_op_num_threads == available_cores()
    # no spin-waiting between batches: the decode threads need those cores
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_auto_falls_back_to_the_cpu_with_a_notice(exported, messages):
    result = exported("resnet50", 64)
    _cpu_notice.cache_clear()  # the notice is printed once per process
    backbone = open_backbone(result.onnx_path.parent, "resnet50", device="auto")
    open_backbone(result.onnx_path.parent, "resnet50", device="auto")
    if _cuda_session(result.onnx_path, __import__("onnxruntime").SessionOptions(), strict=False) is None:
        assert backbone.provider == CPU
        notices = messages()
        assert notices.count("notice: no usable CUDA device") == 1
        assert f"({cuda.problem()})" in notices  # the cause, as the doctor says it
        with pytest.raises(UserError, match="--device cuda was asked for, but"):
            open_backbone(result.onnx_path.parent, "resnet50", device="cuda")
    else:
        assert backbone.provider == "CUDAExecutionProvider"


def test_model_that_does_not_match_its_manifest_is_refused(exported, tmp_path):
    result = exported("resnet50", 64)
    shutil.copy(result.onnx_path.with_suffix(".json"), tmp_path / "resnet50.json")
    with pytest.raises(UserError, match="does not match its manifest"):
        open_backbone(tmp_path, "resnet50")
    (tmp_path / "resnet50.onnx").write_bytes(b"changed")
    with pytest.raises(UserError, match="--force"):
        open_backbone(tmp_path, "resnet50")
    with pytest.raises(UserError, match="vgg16 is not exported in .*transfer export --model vgg16"):
        open_backbone(tmp_path, "vgg16")


def test_io_binding_path_gives_the_same_embeddings(exported):
    backbone = open_backbone(exported("resnet50", 64).onnx_path.parent, "resnet50", device="cpu")
    crops = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(backbone.embed_bound(crops), backbone.embed(crops))
    assert backbone.default_batch_size == 16
