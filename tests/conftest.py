"""Shared fixtures: seeded torchvision state dicts saved to disk, and models exported from them once per session."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.extract.run import run_extract
from pipeline.models import ExportResult, ModelRepository, parse_model_name

STATE_DICT_SEED = 1234


def make_state_dict(model: str, seed: int = STATE_DICT_SEED) -> dict[str, torch.Tensor]:
    """A seeded untrained state dict of ``model`` (any name export takes), as its library names the keys, whose
    normalisation statistics and scales are not the identity.

    torchvision initialises batch-norm running means to 0 and variances to 1, and DINOv2-style ViTs start with
    layer scales of 1e-5 (every image then embeds alike); randomising them makes the parity tests check that
    normalisation is folded into the exported graph correctly, on embeddings that differ between images.
    """
    name = parse_model_name(model)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name.family == "timm":
        import timm

        state = timm.create_model(f"{name.architecture}.{name.tag}" if name.tag else name.architecture).state_dict()
    else:
        state = torchvision.models.get_model(name.architecture, weights=None).state_dict()
    for key, tensor in state.items():
        if name.default_backbone and key.endswith(("running_mean", "bn1.bias", "bn2.bias")):
            # Other models' activations start far smaller than ResNet's: there a shifted mean would hide every
            # image's own features (all images would embed alike)
            state[key] = 0.1 * torch.randn(tensor.shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif key.endswith(".gamma") or key.endswith("pos_embed"):  # layer scales, position embeddings
            state[key] = 0.5 + 0.5 * torch.rand(tensor.shape, generator=generator)
    return state


@pytest.fixture(scope="session")
def state_dict_file(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``(model, seed=1234, suffix=".pth") -> Path`` of a saved seeded state dict, made once per session."""
    made: dict[tuple, Path] = {}

    def make(model: str, seed: int = STATE_DICT_SEED, suffix: str = ".pth") -> Path:
        key = (model, seed, suffix)
        if key not in made:
            path = tmp_path_factory.mktemp("weights") / f"{parse_model_name(model).stem}-seed{seed}{suffix}"
            state = make_state_dict(model, seed)
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(state, str(path))
            else:
                torch.save(state, path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, state_dict_file) -> Callable[[str, int], ExportResult]:
    """Factory ``(model, image_size) -> ExportResult`` exporting from the seeded state dict, once per session."""
    made: dict[tuple, ExportResult] = {}

    def make(model: str, image_size: int | None = 224) -> ExportResult:
        key = (model, image_size)
        if key not in made:
            out = tmp_path_factory.mktemp(f"models-{parse_model_name(model).stem}-{image_size}")
            made[key] = ModelRepository(out).export(model, str(state_dict_file(model)), image_size)
        return made[key]

    return make


@pytest.fixture
def small_models(exported) -> Path:
    """A models folder holding resnet50 exported at 64 px from the seeded state dict (do not write to it)."""
    return exported("resnet50", 64).onnx_path.parent


@pytest.fixture
def seeded_weights(state_dict_file) -> str:
    """The weights the exported test models have, as ``--weights`` names them."""
    return str(state_dict_file("resnet50"))


@pytest.fixture
def extract_quietly(seeded_weights):
    """``run_extract`` for resnet50 with the test models' weights and no progress bar."""

    def run(data, cache, models_dir, **options):
        options.setdefault("weights", seeded_weights)
        return run_extract(data, models=["resnet50"], cache=cache, models_dir=models_dir, progress=False, **options)

    return run


@pytest.fixture
def messages(caplog) -> Callable[[], str]:
    """What the package logged since the test began (notices and warnings), one message a line."""
    caplog.set_level(logging.INFO, logger="pipeline")
    return lambda: "\n".join(record.getMessage() for record in caplog.records)


@pytest.fixture(scope="session", autouse=True)
def ray_temp_folder() -> Iterator[Path]:
    """Every Ray instance of the session (the fixture's, and those extract starts in child processes) keeps its
    files in a temporary folder of its own, removed at the end: none is left in the system's temp folder.

    Short on purpose: Ray's socket paths live under it, and a Unix socket path has at most 107 characters.
    """
    folder = Path(tempfile.mkdtemp(prefix="ray-"))
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = previous
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_instance():
    """A local Ray instance with 2 CPUs, started once; extract and fit join it instead of starting their own."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray,dev]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=os.environ["RAY_TMPDIR"])
    yield ray
    ray.shutdown()
