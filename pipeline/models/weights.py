"""Weights for a model: what ``--weights`` asks for, the library's pretrained files (torch hub and Hugging Face
caches), seeded random weights, a user's state dict, and the provenance each leaves in the manifest."""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import socket
import urllib.error
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.models.registry import TIMM, ModelName, parse_model_name

if TYPE_CHECKING:  # torch is imported where it is used, so that parsing --weights needs only the run-time deps
    import torch


RANDOM = "random"
IMAGENET = "imagenet"
PRETRAINED = "pretrained"
FILE = "file"
_STATE_DICT_WRAPPERS = ("state_dict", "model")


@dataclass(frozen=True)
class WeightsRequest:
    """What ``--weights`` asked for, parsed but not yet loaded.

    Attributes
    ----------
    source : str
        ``"pretrained"`` (the library's weights for the model), ``"imagenet"`` (vgg16's and resnet50's, by
        their torchvision names, as manifests have always recorded them), ``"random"`` or ``"file"``.
    name : str or None
        A torchvision weights name (``IMAGENET1K_V1``); None for the library's default.
    path : Path or None
        State-dict file for ``"file"``.
    seed : int
        Seed of the random initialisation for ``"random"``.
    """

    source: str
    name: str | None = None
    path: Path | None = None
    seed: int = 0

    def matches(self, weights: Mapping[str, Any]) -> bool:
        """Whether a manifest's weights provenance is what this request asks for (hashing a file to know)."""
        source = weights.get("source")
        if self.source == RANDOM:
            return source == RANDOM and weights.get("seed") == self.seed
        if self.source == FILE:
            return source == FILE and weights.get("sha256") == sha256_file(self.path)
        if self.source == IMAGENET:
            return source == IMAGENET and weights.get("name") == self.name
        return source == PRETRAINED and self.name in (None, weights.get("name"))


def parse_weights(model: ModelName, text: str, seed: int = 0) -> WeightsRequest:
    """Interpret a ``--weights`` value for ``model``.

    Parameters
    ----------
    model : ModelName
        The model the weights are for.
    text : str
        ``pretrained`` (the library's weights; for vgg16 and resnet50 the same as ``imagenet``), ``imagenet``
        (vgg16, resnet50 and torchvision models), a torchvision weights name such as ``IMAGENET1K_V2``,
        ``random``, or the path of a state-dict file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).
    seed : int
        Seed for ``random``.

    Raises
    ------
    UserError
        For a weights name the model lacks, or a path that does not exist.
    """
    backbone = model.default_backbone
    if text == RANDOM:
        return WeightsRequest(RANDOM, seed=seed)
    if backbone is not None:
        if text in (IMAGENET, PRETRAINED):
            return WeightsRequest(IMAGENET, name=backbone.default_imagenet_weights)
        if re.fullmatch(r"IMAGENET1K_\w+", text):
            if text not in backbone.imagenet_weights:
                choices = ", ".join(backbone.imagenet_weights)
                raise UserError(f"{backbone.name} has no {text} weights here; choose one of: {choices}.")
            return WeightsRequest(IMAGENET, name=text)
    elif text == PRETRAINED or (text == IMAGENET and model.family != TIMM):
        return WeightsRequest(PRETRAINED)
    elif text == IMAGENET:
        raise UserError(f"{model.name}: timm's weights are named by the model's tag, not 'imagenet'; pass --weights "
                        "pretrained.")
    elif model.family != TIMM and re.fullmatch(r"[A-Z][A-Z0-9_]+", text):
        return WeightsRequest(PRETRAINED, name=text)  # checked against the model's weights enum when it is built
    path = Path(text).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(text, [PRETRAINED, IMAGENET, RANDOM], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"weights file {path} does not exist{hint}; pass pretrained, random, or the path of a state "
                        f"dict of {model.name}.")
    return WeightsRequest(FILE, path=path.resolve())


def weights_per_model(values: Sequence[str] | str | None, models: Sequence[str]) -> dict[str, str | None]:
    """What ``--weights`` says for each model: ``VALUE`` for every model, ``MODEL=VALUE`` for one.

    A model ``--weights`` says nothing of maps to None: use the export in the models folder as it is
    (whatever weights it was exported with), and export it with pretrained weights only when it is missing.
    ``models`` are model names as :func:`pipeline.models.registry.parse_model_name` writes them; ``MODEL`` may
    be written in any form it reads.

    Raises
    ------
    UserError
        ``MODEL=`` naming a model that is not being run, or two values for one model.
    """
    chosen: dict[str, str | None] = dict.fromkeys(models)
    everyone, named = None, {}
    for value in [values] if isinstance(values, str) else values or []:
        model, equals, text = value.partition("=")
        model = _model_name(model) if equals else None
        if model is not None:
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


def _model_name(text: str) -> str | None:
    try:
        return parse_model_name(text).name
    except UserError:
        return None


def read_state_dict(path: Path, model: ModelName) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file: safetensors, or a torch pickle (``weights_only``: no code runs), unwrapped
    from a training checkpoint's ``state_dict``/``model`` entry and DataParallel's ``module.`` prefix.

    Raises
    ------
    UserError
        For a damaged file, or one that holds no state dict of tensors.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load and safetensors raise many types for a damaged file
        raise UserError(
            f"could not read the weights file {path} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "it must be a complete state dict saved with torch.save (.pth/.pt/.bin) or safetensors (.safetensors)."
        ) from None
    if isinstance(state, Mapping):
        for key in _STATE_DICT_WRAPPERS:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; save the model with torch.save(model.state_dict()) "
                        f"or safetensors ({model.name}).")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def check_state_dict(given: Mapping[str, Any], expected: Mapping[str, Any], head: set[str], path: Path,
                     model: ModelName) -> None:
    """Refuse a state dict that does not fit the network, naming the first mismatched keys.

    ``head`` holds the classification layer's keys: they may be absent or of another class count.
    """
    missing = [k for k in expected if k not in given and k not in head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected and k not in head]
    wrong_shape = [
        f"{k} {tuple(given[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in given
        if k in expected and k not in head and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        library = "timm" if model.family == TIMM else "torchvision"
        builder = f"timm.create_model('{model.architecture}')" if model.family == TIMM else (
            f"torchvision.models.{model.architecture}()")
        raise UserError(f"{path} is not a {library} {model.architecture} state dict ({'; '.join(problems)}); save "
                        f"the state dict of {builder}.")


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """One sha256 over a state dict's names and tensor bytes: the identity of generated (random) weights."""
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _unreachable(host: str) -> str:
    """Why ``host`` cannot be reached, found at once from its name (``""`` when it resolves): offline, a download
    would otherwise retry for half a minute before saying so."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        return f"offline: {host} does not resolve ({error.strerror or error})"
    return ""


def torchvision_cache_file(url: str) -> Path:
    """The file torch.hub caches ``url`` as: ``$TORCH_HOME/hub/checkpoints/<name>`` (``~/.cache/torch`` by default)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torchvision_state_dict(weights: Any, model: ModelName) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a torchvision weights enum member, through the torch hub cache, with its provenance.

    Raises
    ------
    UserError
        Offline with nothing cached (naming the URL and the file to place), an unwritable cache, a damaged file,
        or a cached file that is not the official one.
    """
    url, cache_file = weights.url, torchvision_cache_file(weights.url)
    try:
        state_dict = weights.get_state_dict(progress=True, check_hash=True)
    except urllib.error.URLError as error:
        raise UserError(
            f"could not download the {weights.name} weights of {model.name} ({error.reason}); with no network, put "
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
            f"the {weights.name} weights at {cache_file} could not be loaded ({str(error).splitlines()[0]}); "
            "delete the file if it exists and run again."
        ) from None
    return state_dict, {"url": url, "file": cache_file.name, "sha256": _official_sha256(cache_file)}


def _official_sha256(cache_file: Path) -> str:
    """The sha256 of a cached torchvision weights file, refused unless it matches the hash in the file's name."""
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


def hub_weights_file(repository: str, filenames: Sequence[str], model: ModelName) -> Path:
    """The first of ``filenames`` in the Hugging Face repository ``repository``, from huggingface_hub's cache
    (``HF_HOME`` honoured), downloaded there when missing.

    Raises
    ------
    UserError
        Offline with nothing cached: one sentence naming the repository and the file to place, and --weights PATH.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for filename in filenames:  # what the cache holds first: no network needed
        try:
            return Path(hf_hub_download(repository, filename, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError):
            continue
    failure = _unreachable(urlparse(constants.ENDPOINT).hostname or "")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retries would print a line each before the one sentence below
    try:
        for filename in filenames if not failure else ():
            try:
                return Path(hf_hub_download(repository, filename))
            except EntryNotFoundError:
                continue  # the repository holds another of the candidate files
            except LocalEntryNotFoundError:
                failure = "offline, and not in the Hugging Face cache"
                break
            except Exception as error:  # huggingface_hub raises HTTP, OS and validation errors of many types
                failure = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                break
    finally:
        hub_logger.setLevel(level)
    raise UserError(
        f"could not fetch the pretrained weights of {model.name} from the Hugging Face repository {repository} "
        f"({failure or 'it holds none of ' + ', '.join(filenames)}); with no network, download {filenames[0]} from "
        f"https://huggingface.co/{repository} elsewhere and pass it as --weights PATH (WEIGHTS=PATH with make), or "
        "copy a Hugging Face cache that holds it into HF_HOME."
    )
