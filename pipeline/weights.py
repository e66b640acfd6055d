"""Weights for a backbone: ImageNet through torchvision's cache, seeded random, or a user's state dict, with provenance."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import urllib.error
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from typing import TYPE_CHECKING

from pipeline.backbones import BACKBONES, Backbone
from pipeline.errors import UserError
from pipeline.files import sha256_file

if TYPE_CHECKING:  # torch is imported where it is used, so that parsing --weights needs only the run-time deps
    import torch
    from torch import nn


RANDOM = "random"
IMAGENET = "imagenet"
_STATE_DICT_WRAPPERS = ("state_dict", "model")


@dataclass(frozen=True)
class WeightsRequest:
    """What ``--weights`` asked for, parsed but not yet loaded.

    Attributes
    ----------
    source : str
        ``"imagenet"``, ``"random"`` or ``"file"``.
    name : str or None
        torchvision weights name (``IMAGENET1K_V1``) for ImageNet weights.
    path : Path or None
        State-dict file for ``"file"``.
    seed : int
        Seed of the random initialisation for ``"random"``.
    """

    source: str
    name: str | None = None
    path: Path | None = None
    seed: int = 0

    def identity(self) -> str:
        """Return the weights identity a manifest records (see ``ModelManifest.weights_id``), hashing files."""
        if self.source == IMAGENET:
            return f"imagenet:{self.name}"
        if self.source == RANDOM:
            return f"random:seed={self.seed}"
        return f"file:{sha256_file(self.path)}"


def parse_weights(backbone: Backbone, text: str, seed: int = 0) -> WeightsRequest:
    """Interpret a ``--weights`` value for ``backbone``.

    Parameters
    ----------
    backbone : Backbone
        The model the weights are for.
    text : str
        ``imagenet`` (the backbone's default ImageNet weights), a torchvision weights name such as
        ``IMAGENET1K_V2``, ``random``, or the path of a state-dict file.
    seed : int
        Seed for ``random``.

    Raises
    ------
    UserError
        For an ImageNet name the backbone lacks, or a path that does not exist.
    """
    if text == IMAGENET:
        return WeightsRequest(IMAGENET, name=backbone.default_imagenet_weights)
    if text == RANDOM:
        return WeightsRequest(RANDOM, seed=seed)
    if re.fullmatch(r"IMAGENET1K_\w+", text):
        if text not in backbone.imagenet_weights:
            choices = ", ".join(backbone.imagenet_weights)
            raise UserError(f"{backbone.name} has no {text} weights here; choose one of: {choices}.")
        return WeightsRequest(IMAGENET, name=text)
    path = Path(text).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(text, [IMAGENET, RANDOM, *backbone.imagenet_weights], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(
            f"weights file {path} does not exist{hint}; pass imagenet, random, or the path of a torchvision state dict."
        )
    return WeightsRequest("file", path=path.resolve())


def weights_per_model(values: Sequence[str] | str | None, models: Sequence[str]) -> dict[str, str | None]:
    """What ``--weights`` says for each model: ``VALUE`` for every model, ``MODEL=VALUE`` for one.

    A model ``--weights`` says nothing of maps to None: use the export in the models folder as it is
    (whatever weights it was exported with), and export it with ImageNet weights only when it is missing.

    Raises
    ------
    UserError
        ``MODEL=`` naming a model that is not being run, or two values for one model.
    """
    chosen: dict[str, str | None] = dict.fromkeys(models)
    everyone, named = None, {}
    for value in [values] if isinstance(values, str) else values or []:
        model, equals, text = value.partition("=")
        if equals and model in BACKBONES:
            if model not in chosen:
                raise UserError(f"--weights {value} names {model}, which is not among --models ({' '.join(models)}).")
            if model in named:
                raise UserError(f"--weights gives {model} twice ({named[model]} and {text}); give it once.")
            named[model] = text
        elif everyone is not None:
            raise UserError(f"--weights has two values for every model ({everyone} and {value}); write MODEL=VALUE "
                            "for one model, e.g. --weights resnet50=PATH vgg16=imagenet.")
        else:
            everyone = value
    return {model: named.get(model, everyone) for model in chosen}


def load_trunk(backbone: Backbone, request: WeightsRequest) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``backbone`` with the requested weights, replace its head by an identity, and set eval mode.

    Returns
    -------
    trunk : torch.nn.Module
        Maps normalised NCHW float images to the penultimate embedding.
    provenance : dict
        Where the weights came from, recorded in the manifest (see ``ModelManifest.weights``).

    Raises
    ------
    UserError
        ImageNet weights that can neither be found in the cache nor downloaded, or a state-dict file that
        is unreadable or does not fit the architecture.
    """
    import torch
    from torch import nn

    if request.source == RANDOM:
        torch.manual_seed(request.seed)  # torchvision initialises the layers from the global generator
    model = _build(backbone)
    if request.source == RANDOM:
        provenance = {"source": RANDOM, "seed": request.seed, "sha256": _state_dict_sha256(model.state_dict())}
    elif request.source == IMAGENET:
        state_dict, provenance = _imagenet_state_dict(backbone, request.name)
        model.load_state_dict(state_dict)
    else:
        _load_user_state_dict(backbone, model, request.path)
        provenance = {"source": "file", "file": str(request.path), "sha256": sha256_file(request.path)}
    model.set_submodule(backbone.head, nn.Identity())
    return model.eval(), provenance


def imagenet_cache_file(backbone: Backbone, name: str) -> tuple[str, Path]:
    """Return the download URL of ImageNet weights ``name`` and the file torchvision caches it as.

    The cache folder is torch.hub's: ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch`` by default).
    """
    import torch
    import torchvision

    url = getattr(torchvision.models, backbone.weights_enum)[name].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _build(backbone: Backbone) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, backbone.name)(weights=None)


def _imagenet_state_dict(backbone: Backbone, name: str) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    import torchvision

    url, cache_file = imagenet_cache_file(backbone, name)
    weights = getattr(torchvision.models, backbone.weights_enum)[name]
    try:
        state_dict = weights.get_state_dict(progress=True, check_hash=True)
    except urllib.error.URLError as error:
        raise UserError(
            f"could not download the {name} weights of {backbone.name} ({error.reason}); with no network, put "
            f"{url} at {cache_file} (TORCH_HOME moves that cache), or pass --weights PATH to a state dict "
            "(WEIGHTS=PATH with make), or --weights random for untrained weights."
        ) from None
    except OSError as error:  # an unwritable cache folder, a full disk, a dropped connection
        raise UserError(
            f"could not fetch {url} into {cache_file} ({error}); check that folder (TORCH_HOME moves it) and "
            "the network, or pass --weights PATH to a state dict."
        ) from None
    except RuntimeError as error:  # a download that fails its hash check, or a damaged cached file
        raise UserError(
            f"the {name} weights at {cache_file} could not be loaded ({str(error).splitlines()[0]}); delete the "
            "file if it exists and run again."
        ) from None
    return state_dict, {
        "source": IMAGENET,
        "name": name,
        "url": url,
        "file": cache_file.name,
        "sha256": _official_sha256(cache_file),
    }


def _official_sha256(cache_file: Path) -> str:
    """The sha256 of a cached ImageNet weights file, refused unless it matches the hash in the file's name."""
    import torch

    # torchvision names each weights file after the first hex digits of its sha256 (resnet50-0676ba61.pth);
    # torch.hub checks them only while downloading, so a damaged or substituted cache file would pass unseen.
    digest = sha256_file(cache_file)
    match = re.search(torch.hub.HASH_REGEX, cache_file.name)
    if match and not digest.startswith(match.group(1)):
        raise UserError(
            f"the cached weights {cache_file} are not the official file (its sha256 does not start with "
            f"{match.group(1)}); delete it so that it downloads again, or pass it as --weights PATH."
        )
    return digest


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load and safetensors raise many types for a damaged file
        raise UserError(
            f"could not read the weights file {path} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "it must be a complete state dict saved with torch.save (.pth/.pt) or safetensors (.safetensors)."
        ) from None


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    # Training checkpoints often nest the weights ({"state_dict": ...}) and DataParallel prefixes "module.".
    if isinstance(state, Mapping):
        for key in _STATE_DICT_WRAPPERS:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; save the model with torch.save(model.state_dict()).")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def _load_user_state_dict(backbone: Backbone, model: nn.Module, path: Path) -> None:
    given = _unwrap(_read_state_dict(path), path)
    expected = model.state_dict()
    head = set(backbone.head_keys)  # the head is removed, so its keys may be absent or of another class count
    missing = [k for k in expected if k not in given and k not in head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [
        f"{k} {tuple(given[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in given
        if k in expected and k not in head and given[k].shape != expected[k].shape
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise UserError(
            f"{path} is not a torchvision {backbone.name} state dict ({'; '.join(problems)}); "
            f"export it from torchvision.models.{backbone.name}()."
        )
    model.load_state_dict({k: v for k, v in given.items() if k not in head}, strict=False)


def _state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
