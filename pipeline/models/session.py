"""An exported model, checked against its manifest once, and the onnxruntime sessions over it: on CUDA when it is
actually usable, otherwise on the CPU."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from pipeline.errors import UserError, command
from pipeline.files import available_cores, sha256_file
from pipeline.models import cuda
from pipeline.models.manifest import ModelManifest, remake_command
from pipeline.models.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CPU_BATCH, CUDA_BATCH = 16, 128  # default images per inference batch
_FATAL_ONLY = 4  # onnxruntime log severity: keep a failed CUDA probe from dumping library errors




@dataclass(frozen=True)
class ExportedModel:
    """One exported model (a backbone, a precision variant of one, or a deployed classifier), verified once.

    Attributes
    ----------
    manifest : ModelManifest
        What the file computes and how its input is made; a :class:`DeployedManifest` for a deployed classifier.
    onnx_path : Path
        The ONNX file, whose sha256 is ``manifest.onnx_sha256``.
    """

    manifest: ModelManifest
    onnx_path: Path

    @property
    def name(self) -> str:
        """The feature-set name of its embeddings (and its file stem): ``resnet50-int8``."""
        return self.manifest.name

    @property
    def fingerprint(self) -> str:
        """The ONNX file's sha256: what stores and classifiers refer to."""
        return self.manifest.onnx_sha256

    @property
    def preprocessing(self) -> Preprocessing:
        """How its input crops are made."""
        return self.manifest.preprocessing

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def untrained(self) -> bool:
        """Whether its weights are random (its embeddings carry nothing learnt)."""
        return self.manifest.untrained

    def feature_set(self, precision: str) -> str:
        """The feature-set name of this model's ``precision`` variant (``resnet50-int8``)."""
        return self.manifest.model_name.feature_set(precision)

    def open(self, device: str = "auto", threads: int | None = None) -> BackboneSession:
        """An onnxruntime session over the file on ``device`` (see :func:`pipeline.models.session.start_session`)."""
        return start_session(self, device, threads)

    def verify(self) -> ExportedModel:
        """Check that the file is still the one the manifest describes (as on another machine, whose copy
        of the models folder may differ); returns self.

        Raises
        ------
        UserError
            When the file is missing or changed, with the command that makes it again.
        """
        if not self.onnx_path.is_file() or sha256_file(self.onnx_path) != self.fingerprint:
            raise UserError(f"{self.onnx_path} does not match its manifest {self.onnx_path.with_suffix('.json')} "
                            f"(missing or changed since it was made); {remake_command(self.manifest, self.onnx_path)}.")
        return self


@dataclass
class BackboneSession:
    """An onnxruntime session over one exported model.

    A deployed classifier (``pipeline.deploy``) is a backbone with the classifier merged behind it: its
    session's :meth:`embed` gives class probabilities instead of an embedding.
    """

    model: ExportedModel
    session: onnxruntime.InferenceSession

    @property
    def manifest(self) -> ModelManifest:
        """What the model computes and how its input is made."""
        return self.model.manifest

    @property
    def onnx_path(self) -> Path:
        return self.model.onnx_path

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph: ``CUDAExecutionProvider`` or ``CPUExecutionProvider``."""
        return self.session.get_providers()[0]

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed a batch of uint8 ``[N, S, S, 3]`` crops; returns float32 ``[N, D]``."""
        if self.provider == CUDA:
            return self.embed_bound(crops)
        inputs = {self.manifest.input["name"]: np.ascontiguousarray(crops, dtype=np.uint8)}
        return self.session.run([self.manifest.output["name"]], inputs)[0]

    def embed_bound(self, crops: np.ndarray) -> np.ndarray:
        """:meth:`embed` through I/O binding, as it runs on CUDA (on the CPU provider it gives the same result).

        The uint8 batch (a quarter of the bytes of a float one: normalisation happens in the graph, on the
        device) is bound as a host input that onnxruntime copies on its own stream, and the output is
        allocated by onnxruntime on the device and copied back once, without a second float input.
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.manifest.input["name"], np.ascontiguousarray(crops, dtype=np.uint8))
        binding.bind_output(self.manifest.output["name"], "cuda" if self.provider == CUDA else "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    @property
    def default_batch_size(self) -> int:
        """Images per batch that keep this device busy: 16 on a CPU (beyond it nothing is gained), 128 on CUDA."""
        return CUDA_BATCH if self.provider == CUDA else CPU_BATCH


def start_session(model: ExportedModel, device: str = "auto", threads: int | None = None) -> BackboneSession:
    """An onnxruntime session over ``model``'s file (already checked against its manifest) on ``device``.

    ``auto`` uses CUDA when a session can actually be created on it, otherwise the CPU with a notice.

    Raises
    ------
    UserError
        When ``cuda`` is asked for and cannot be used.
    """
    name, precision, onnx_path = model.name, model.precision, model.onnx_path
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    # onnxruntime's threads spin for a while after each parallel section by default, taking the cores the
    # decode threads need: measured by hand on 2 cores (docs/speed.md), spinning added nothing to inference on
    # its own and cost the host side a third of its images/s (with make bench's zero-cost backbone).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cuda" and cuda.problem():
        raise UserError(f"--device cuda was asked for, but {cuda.problem()}.")
    if device in ("auto", "cuda"):
        session = _cuda_session(onnx_path, options, strict=device == "cuda")
        if session is not None:
            if precision == "int8":
                _precision_notice(name, "int8 is tuned for CPUs; on CUDA prefer fp16 (--precision fp16)")
            return BackboneSession(model, session)
        _cpu_notice(options.intra_op_num_threads, cuda.problem() or "a CUDA session could not be created; "
                    f"{command('doctor')} says why")
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=[CPU])
    if precision == "fp16":
        _precision_notice(name, "fp16 runs on the CPU here, slower than fp32: it is meant for GPUs")
    return BackboneSession(model, session)


@functools.cache
def _precision_notice(model: str, text: str) -> None:
    logger.info(f"notice: {model}: {text}.")


@functools.cache
def _cpu_notice(threads: int, cause: str) -> None:
    logger.info(f"notice: no usable CUDA device for onnxruntime ({cause}); running on the CPU ({threads} "
                f"thread{'s' if threads != 1 else ''}).")


def _cuda_session(onnx_path: Path, options: onnxruntime.SessionOptions,
                  strict: bool) -> onnxruntime.InferenceSession | None:
    """A session on CUDA, or None. ``strict`` (``--device cuda``): no node may fall back to the CPU, so that a
    GPU run can never quietly measure the CPU; then a failure is an error, not None."""
    cuda.load_libraries()  # the CUDA and cuDNN libraries from the installed wheels, once per process
    if CUDA not in onnxruntime.get_available_providers():
        return None
    if strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    severity = options.log_severity_level
    options.log_severity_level = _FATAL_ONLY
    onnxruntime.set_default_logger_severity(_FATAL_ONLY)
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=[CUDA, CPU])
    except Exception as error:  # a provider that fails to load raises; whatever it is, the CPU remains
        if strict:
            raise UserError(
                f"--device cuda was asked for, but onnxruntime cannot run {onnx_path.name} wholly on CUDA "
                f"({str(error).splitlines()[0]}); use --device auto to let the CPU run what CUDA cannot."
            ) from None
        return None
    finally:
        options.log_severity_level = severity
        onnxruntime.set_default_logger_severity(2)
    return session if session.get_providers()[0] == CUDA else None
