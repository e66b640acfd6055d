"""Shared fixtures: seeded torchvision state dicts saved to disk, and models exported from them once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.models import ExportResult, ModelRepository
from pipeline.extract import run_extract

STATE_DICT_SEED = 1234


def make_state_dict(model: str, seed: int = STATE_DICT_SEED) -> dict[str, torch.Tensor]:
    """A seeded untrained torchvision state dict whose batch-norm statistics are not the identity.

    torchvision initialises running means to 0 and variances to 1; randomising them makes the parity
    tests check that batch norm is folded into the exported graph correctly.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    state = getattr(torchvision.models, model)(weights=None).state_dict()
    for key, tensor in state.items():
        if key.endswith("running_mean") or key.endswith("bn1.bias") or key.endswith("bn2.bias"):
            state[key] = 0.1 * torch.randn(tensor.shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(tensor.shape, generator=generator)
    return state


@pytest.fixture(scope="session")
def state_dict_file(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``(model, seed=1234, suffix=".pth") -> Path`` of a saved seeded state dict, made once per session."""
    made: dict[tuple, Path] = {}

    def make(model: str, seed: int = STATE_DICT_SEED, suffix: str = ".pth") -> Path:
        key = (model, seed, suffix)
        if key not in made:
            path = tmp_path_factory.mktemp("weights") / f"{model}-seed{seed}{suffix}"
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

    def make(model: str, image_size: int = 224) -> ExportResult:
        key = (model, image_size)
        if key not in made:
            out = tmp_path_factory.mktemp(f"models-{model}-{image_size}")
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
        return run_extract(data, ["resnet50"], cache, models_dir=models_dir, progress=False, **options)

    return run


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
