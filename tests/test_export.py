"""Export: ONNX graphs that match their library in more than one runtime, manifests, re-export rules, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms import v2

from pipeline.errors import UserError
from pipeline.export import build_parser
from pipeline.extract.decode import decode_file
from pipeline.files import sha256_file
from pipeline.models import CURATED, DEFAULT_BACKBONES, ModelManifest, ModelRepository, parse_model_name
from pipeline.models.export import EmbeddingNet
from tests.conftest import make_state_dict

BACKBONES = DEFAULT_BACKBONES


def export_backbone(model, weights, image_size, out, seed=0):
    return ModelRepository(out).export(model, weights, image_size, seed)

BATCH_SIZES = (1, 3, 17)


def crops(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 RGB crops (noise plus gradients, so activations are not degenerate)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    base = rng.uniform(0, 255, (count, 1, 1, 3)) * ramp[None, :, None, None] * ramp[None, None, :, None]
    noise = rng.normal(0, 40, (count, size, size, 3))
    return np.clip(base + noise + 60, 0, 255).astype(np.uint8)


def torchvision_embeddings(model: str, images: np.ndarray) -> np.ndarray:
    """The reference: torchvision's model, its ToTensor/Normalize transforms and its feature extractor."""
    backbone = BACKBONES[model]
    network = getattr(torchvision.models, model)()
    network.load_state_dict(make_state_dict(model))
    extractor = create_feature_extractor(network.eval(), {backbone.embedding_layer: "embedding"})
    normalise = v2.Compose(
        [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(backbone.mean, backbone.std)]
    )
    batch = torch.stack([normalise(Image.fromarray(image)) for image in images])
    with torch.no_grad():
        return extractor(batch)["embedding"].flatten(1).numpy()


def assert_parity(got: np.ndarray, want: np.ndarray) -> None:
    cosine = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.99999
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def run_in_batches(run, images: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Run ``images`` through ``run`` in consecutive batches of 1, 3 and 17."""
    results, start = [], 0
    for size in BATCH_SIZES:
        results.append((size, run(images[start : start + size])))
        start += size
    return results


@pytest.mark.slow
@pytest.mark.parametrize("model", BACKBONES)
def test_exported_model_matches_torchvision_in_two_runtimes(model, exported):
    import cv2

    result = exported(model, 224)
    images = crops(sum(BATCH_SIZES), 224)
    want = torchvision_embeddings(model, images)
    assert want.std(axis=0).max() > 0  # embeddings differ between images

    session = onnxruntime.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    opencv = cv2.dnn.readNetFromONNX(str(result.onnx_path))

    def run_opencv(batch):
        opencv.setInput(batch, "images")
        return opencv.forward()

    for run in (lambda batch: session.run(["embedding"], {"images": batch})[0], run_opencv):
        start = 0
        for size, got in run_in_batches(run, images):
            assert got.shape == (size, BACKBONES[model].embedding_dim) and got.dtype == np.float32
            assert_parity(got, want[start : start + size])
            start += size


def test_embedding_net_normalises_like_torchvision():
    images = crops(2, 16)
    net = EmbeddingNet(torch.nn.Flatten(), BACKBONES["vgg16"].mean, BACKBONES["vgg16"].std)
    got = net(torch.from_numpy(images)).numpy()
    to_tensor = torchvision.transforms.ToTensor()
    normalise = torchvision.transforms.Normalize(BACKBONES["vgg16"].mean, BACKBONES["vgg16"].std)
    want = torch.stack([normalise(to_tensor(Image.fromarray(i))) for i in images]).flatten(1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_manifest_describes_the_onnx_file(exported, state_dict_file):
    result = exported("resnet50", 64)
    manifest = ModelManifest.load(result.onnx_path.with_suffix(".json"))
    assert manifest == result.manifest and manifest.model == "resnet50"
    assert manifest.onnx_sha256 == sha256_file(result.onnx_path)
    assert manifest.weights == {
        "source": "file",
        "file": str(state_dict_file("resnet50")),
        "sha256": sha256_file(state_dict_file("resnet50")),
        "license": "unknown: weights from a file of yours",
    }
    assert manifest.input == {
        "name": "images", "layout": "NHWC", "dtype": "uint8", "shape": ["batch", 64, 64, 3], "size": 64,
        "resize_size": 73, "resize_mode": "shorter", "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "recipe": {"library": "torchvision", "transforms_of": "ResNet50_Weights.IMAGENET1K_V1"},
    }
    assert manifest.output == {"name": "embedding", "dim": 2048, "layer": "avgpool"}
    assert {"torch", "torchvision", "onnx", "onnxruntime", "numpy", "python", "pipeline"} <= set(manifest.versions)
    assert datetime.fromisoformat(manifest.created).tzinfo is not None
    assert manifest.verification["min_cosine"] >= 0.99999 and manifest.verification["images"] == 4


def test_onnx_file_is_standard_and_batch_dynamic(exported):
    result = exported("resnet50", 64)
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    graph = onnx.load(str(result.onnx_path))
    assert [(o.domain, o.version) for o in graph.opset_import] == [("", result.manifest.opset)]
    assert {node.domain for node in graph.graph.node} == {""}
    assert not graph.functions
    (image_input,) = graph.graph.input
    dims = image_input.type.tensor_type.shape.dim
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    (output,) = graph.graph.output
    assert output.name == "embedding" and output.type.tensor_type.shape.dim[1].dim_value == 2048


def test_same_request_is_a_no_op_and_changes_re_export(tmp_path, exported, state_dict_file, offline_env):
    from_file = exported("resnet50", 64)
    out = from_file.onnx_path.parent
    assert not export_backbone("resnet50", str(state_dict_file("resnet50")), 64, out).exported

    out = tmp_path / "models"
    first = export_backbone("resnet50", "random", 64, out)
    stamp = os.stat(first.onnx_path).st_mtime_ns
    again = export_backbone("resnet50", "random", 64, out)
    assert first.exported and not again.exported and again.manifest == first.manifest
    assert os.stat(first.onnx_path).st_mtime_ns == stamp

    with pytest.raises(UserError):  # offline: the failed export leaves the current model in place
        export_backbone("resnet50", "imagenet", 64, out)
    assert sorted(p.name for p in out.iterdir()) == ["resnet50.json", "resnet50.onnx"]
    assert ModelManifest.load(out / "resnet50.json") == first.manifest

    reseeded = export_backbone("resnet50", "random", 64, out, seed=1)
    assert reseeded.exported and reseeded.manifest.onnx_sha256 != first.manifest.onnx_sha256
    assert reseeded.manifest.weights["seed"] == 1

    reseeded.onnx_path.write_bytes(b"damaged")  # a file that no longer matches its manifest is not current
    repaired = export_backbone("resnet50", "random", 64, out, seed=1)
    assert repaired.exported and sha256_file(repaired.onnx_path) == reseeded.manifest.onnx_sha256


def test_image_size_too_small_is_refused(tmp_path):
    with pytest.raises(UserError, match="too small"):
        export_backbone("timm/convnext_atto.d2_in1k", "random", 16, tmp_path)
    with pytest.raises(UserError, match="too small"):
        export_backbone("resnet50", "random", 16, tmp_path)


def test_help_documents_every_option():
    text = build_parser().format_help()
    for option in ("--model", "--weights", "--seed", "--image-size", "--out", "--force"):
        assert option in text
    for word in ("imagenet", "IMAGENET1K_V2", "random", "TORCH_HOME", ".safetensors", "vgg16", "resnet50",
                 "pretrained", "HF_HOME", "timm/NAME[.TAG]", "torchvision/NAME", "num_classes=0"):
        assert word in text


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.export", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_offline_imagenet_is_one_clear_line(tmp_path, offline_env):
    out = tmp_path / "models"
    completed = run_cli("--model", "vgg16", "--out", str(out), env=dict(os.environ))
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "vgg16-397923af.pth" in error_lines[0]
    assert not out.exists() or not list(out.iterdir())


def test_cli_exports_then_says_nothing_to_do(tmp_path):
    args = ("--model", "resnet50", "--weights", "random", "--image-size", "64", "--out", str(tmp_path))
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "exported" in first.stdout and "UNTRAINED RANDOM WEIGHTS" in first.stderr
    second = run_cli(*args)
    assert second.returncode == 0 and "up to date" in second.stdout and "nothing to do" in second.stdout
    assert json.loads((tmp_path / "resnet50.json").read_text())["weights"]["seed"] == 0


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """An empty torch hub cache and proxies pointing at a closed local port: downloads fail at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)


FAMILY_SAMPLES = [  # the smallest configuration of each kind, at small sizes
    ("timm/convnext_atto.d2_in1k", 96), ("timm/vit_small_patch14_dinov2.lvd142m", 112),
    ("timm/efficientnet_b0.ra_in1k", 96), ("torchvision/mobilenet_v3_small", None), ("torchvision/convnext_tiny", 96),
]


def library_embeddings(model: str, weights: Path, size: int | None, files: list[Path]) -> np.ndarray:
    """The reference a user of the library would compute: its model with the weights file, its own eval transform,
    and the input of its classification layer (timm: ``num_classes=0``)."""
    from pipeline.extract.decode import load_rgb

    name = parse_model_name(model)
    if name.family == "timm":
        import timm
        from timm.data import create_transform, resolve_data_config

        options = {"img_size": size} if size and "vit" in name.architecture else {}
        network = timm.create_model(f"{name.architecture}.{name.tag}", pretrained=True, num_classes=0,
                                    pretrained_cfg_overlay={"file": str(weights)}, **options).eval()
        transform = create_transform(
            **resolve_data_config({"input_size": (3, size, size)} if size else {}, model=network))
        forward = network
    else:
        network = torchvision.models.get_model(name.architecture, weights=None)
        network.load_state_dict(torch.load(weights))
        transform = torchvision.models.get_model_weights(name.architecture).DEFAULT.transforms()
        if size:
            transform.crop_size, transform.resize_size = [size], [
                round(transform.resize_size[0] * size / transform.crop_size[0])]
        head = [m for m in network.modules() if isinstance(m, torch.nn.Linear)][-1]
        captured = []
        head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        forward = lambda batch: (network.eval()(batch), captured.pop())[1]  # noqa: E731
    batch = torch.stack([transform(load_rgb(path.read_bytes())) for path in files])
    with torch.no_grad():
        return forward(batch).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("model,size", FAMILY_SAMPLES)
def test_embeddings_are_the_library_forward_on_its_own_transform(model, size, exported, state_dict_file, tmp_path):
    """From the image file to the embedding: decode's crop through the ONNX file equals the library's model on the
    library's transform of the same image (EXIF, CMYK, grey, alpha, palette)."""
    from tests.test_preprocessing import image_files

    result = exported(model, size)
    files = image_files(tmp_path)
    repository = ModelRepository(result.onnx_path.parent)
    session = repository.load(model).open("cpu")
    crops = np.stack([decode_file(path, [session.model.preprocessing]).crops[0] for path in files])
    got = session.embed(crops)
    want = library_embeddings(model, state_dict_file(model), size, files)
    assert got.shape == want.shape == (len(files), result.manifest.output["dim"])
    assert (want - want.mean(0)).std() > 1e-3 * np.abs(want).mean()  # the images embed differently
    assert_parity(got, want)


CURATED_NEW = [entry for entry in CURATED if not parse_model_name(entry.name).default_backbone]


@pytest.mark.slow
@pytest.mark.parametrize("entry", CURATED_NEW, ids=lambda entry: entry.name)
def test_curated_models_export_and_check_themselves(entry, tmp_path):
    """Each curated model at its own size and recipe: exported, checked against the library, described."""
    result = ModelRepository(tmp_path).export(entry.name, "random")
    manifest = result.manifest
    assert result.exported and manifest.output["dim"] == entry.embedding_dim
    assert manifest.input["size"] == entry.input_size and manifest.verification["min_cosine"] >= 0.9999
    assert manifest.name == parse_model_name(entry.name).stem and result.onnx_path.name == manifest.name + ".onnx"
    assert manifest.versions.get("timm") or entry.name.startswith("torchvision/")


def test_models_that_are_not_image_classifiers_are_refused(tmp_path):
    repository = ModelRepository(tmp_path)
    with pytest.raises(UserError, match="is not an image classifier"):
        repository.export("torchvision/fasterrcnn_resnet50_fpn", "random")
    with pytest.raises(UserError, match="no final Linear layer"):
        repository.export("torchvision/squeezenet1_0", "random")
    with pytest.raises(UserError, match=r"timm has no model 'convnxt_atto' \(did you mean timm/convnext_atto"):
        repository.export("timm/convnxt_atto", "random")
    with pytest.raises(UserError, match="timm has no pretrained tag 'nope' for convnext_atto; its tags: d2_in1k"):
        repository.export("timm/convnext_atto.nope", "random")
    with pytest.raises(UserError, match="takes 224 px images only"):
        repository.export("torchvision/vit_b_16", "random", 112)
    assert not list(tmp_path.iterdir())


def test_a_timm_name_without_timm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError,
                       match=r"needs timm to be exported: install the export extra \(pip install -e '.\[export\]'\)"):
        ModelRepository(tmp_path).export("timm/convnext_atto.d2_in1k", "random")


def test_an_export_that_fails_or_disagrees_is_refused_naming_the_step(tmp_path, monkeypatch):
    import pipeline.models.export as export

    monkeypatch.setattr(export, "VERIFY_MIN_COSINE", 1.5)
    with pytest.raises(UserError, match=r"timm/convnext_atto.d2_in1k: "
                       r"the exported ONNX graph disagrees with the library's forward"):
        ModelRepository(tmp_path).export("timm/convnext_atto.d2_in1k", "random", 64)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no way")))
    with pytest.raises(UserError, match=r"timm/convnext_atto.d2_in1k: "
                       r"torch.onnx.export cannot export it \(RuntimeError: no way\)"):
        ModelRepository(tmp_path).export("timm/convnext_atto.d2_in1k", "random", 64)
    assert not list(tmp_path.iterdir())  # nothing half-made is left
