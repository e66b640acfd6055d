"""A fitted classifier merged behind its backbone into one ONNX file: uint8 crops in, probabilities out."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.compose
import onnxruntime
import skl2onnx
import sklearn
from onnx import helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.pipeline import Pipeline

import pipeline
from pipeline.errors import UserError
from pipeline.files import atomic_path, sha256_file
from pipeline.fit.bundle import ClassifierBundle
from pipeline.models import BackboneSession, DeployedManifest, ModelRepository, open_deployed
from pipeline.models.session import CPU
from pipeline.serve.bundles import check_listed, open_fitted_backbone
from pipeline.store import PIXELS

OUTPUT_NAME = "probabilities"
HEAD_INPUT = "embedding"
HEAD_PREFIX = "classifier/"  # keeps the classifier's node and tensor names apart from the backbone's
ML_OPSET = 3  # ai.onnx.ml: LinearClassifier, SVMClassifier, Scaler, Normalizer
VERIFY_IMAGES = 8
VERIFY_EMBEDDINGS = 256
VERIFY_MAX_DIFFERENCE = 1e-4  # largest probability difference to the bundle (float32 ONNX vs float64 scikit-learn)


@dataclass(frozen=True)
class DeployResult:
    """The outcome of :func:`deploy_classifier`: the manifest, the file, and whether anything was written."""

    manifest: DeployedManifest
    onnx_path: Path
    deployed: bool


def head_graph(fitted: Pipeline, dim: int, opset: int) -> onnx.ModelProto:
    """A fitted classifier pipeline as ONNX: float32 ``embedding [N, dim]`` in, ``probabilities [N, C]`` out.

    Parameters
    ----------
    fitted : sklearn.pipeline.Pipeline
        A bundle's pipeline: a scaler then a classifier with ``predict_proba``.
    dim : int
        Embedding width.
    opset : int
        Opset of the default domain (the backbone's, so that the two graphs merge).
    """
    convertible = _without_frozen(fitted)
    classifier = convertible.steps[-1][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skl2onnx warns about opsets newer than it was tested with
        head = convert_sklearn(
            convertible, initial_types=[(HEAD_INPUT, FloatTensorType([None, dim]))],
            target_opset={"": opset, "ai.onnx.ml": ML_OPSET}, options={id(classifier): {"zipmap": False}},
        )
    _set_opsets(head, _opsets(head))  # skl2onnx may list a domain twice
    return head


def _without_frozen(fitted: Pipeline) -> Pipeline:
    """``fitted``, or a copy whose calibrated SGD (``fit --out-of-core``'s svm) is no longer wrapped in the
    FrozenEstimator that skl2onnx does not know; the wrapper only kept calibration from refitting it."""
    classifier = fitted.steps[-1][1]
    if not isinstance(classifier, CalibratedClassifierCV) or not any(
        isinstance(calibrated.estimator, FrozenEstimator) for calibrated in classifier.calibrated_classifiers_
    ):
        return fitted
    classifier = copy.deepcopy(classifier)
    for calibrated in classifier.calibrated_classifiers_:
        if isinstance(calibrated.estimator, FrozenEstimator):
            calibrated.estimator = calibrated.estimator.estimator
    return Pipeline([*fitted.steps[:-1], (fitted.steps[-1][0], classifier)])


def merge(backbone: onnx.ModelProto, head: onnx.ModelProto, embedding: str, classes: Sequence[str]) -> onnx.ModelProto:
    """``head`` fed by the ``embedding`` output of ``backbone``, as one model whose only output is ``probabilities``.

    The class names are also kept in the model's metadata (``classes``, a JSON list), for runtimes that
    read the ONNX file without its manifest.
    """
    head = onnx.compose.add_prefix(head, HEAD_PREFIX)
    head.ir_version = backbone.ir_version
    opsets = _opsets(backbone)
    _set_opsets(head, {domain: opsets.get(domain, version) for domain, version in _opsets(head).items()})
    merged = onnx.compose.merge_models(
        backbone, head, io_map=[(embedding, HEAD_PREFIX + HEAD_INPUT)], outputs=[HEAD_PREFIX + OUTPUT_NAME]
    )
    _set_opsets(merged, _opsets(merged))
    merged.graph.node.append(helper.make_node("Identity", [HEAD_PREFIX + OUTPUT_NAME], [OUTPUT_NAME]))
    output = merged.graph.output[0]
    output.name = OUTPUT_NAME
    output.type.tensor_type.shape.dim[0].dim_param = backbone.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    merged.graph.name = "classifier"
    merged.doc_string = "uint8 NHWC crops in, class probabilities out: a backbone and a scikit-learn classifier merged"
    kept = [prop for prop in merged.metadata_props if prop.key != "classes"]
    del merged.metadata_props[:]
    merged.metadata_props.extend(kept)
    merged.metadata_props.add(key="classes", value=json.dumps(list(classes)))
    return merged


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    """The model's opset per domain (the highest, where a domain is listed twice)."""
    opsets: dict[str, int] = {}
    for entry in model.opset_import:
        opsets[entry.domain] = max(entry.version, opsets.get(entry.domain, 0))
    return opsets


def _set_opsets(model: onnx.ModelProto, opsets: dict[str, int]) -> None:
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())


def deploy_classifier(
    bundle_path: str | os.PathLike,
    models_dir: str | os.PathLike = "models",
    out: str | os.PathLike | None = None,
    trust: bool = False,
    force: bool = False,
) -> DeployResult:
    """Merge the classifier in ``bundle_path`` behind the backbone it was fitted on into ``out``.

    Parameters
    ----------
    bundle_path : path-like
        A bundle written by ``pipeline.fit``; it must be listed with its sha256 in the ``report.json``
        beside it (loading it runs code) unless ``trust``.
    models_dir : path-like
        Folder of the exported backbones; the one the bundle was fitted on must be there unchanged.
    out : path-like, optional
        The ONNX file to write (default: the bundle's path with ``.onnx``); its manifest goes beside it (``.json``).
    trust : bool
        Load a bundle that no report lists.
    force : bool
        Deploy even when ``out`` is already this bundle behind this backbone.

    Returns
    -------
    DeployResult

    Raises
    ------
    UserError
        An unlisted or unreadable bundle, a pixel-baseline bundle or one skl2onnx cannot convert, a missing
        or different backbone, or an ``out`` that would replace something else than a deployed classifier.
    """
    bundle_path = Path(bundle_path)
    out = Path(out) if out is not None else bundle_path.with_suffix(".onnx")
    _check_out(out, bundle_path)
    if not trust:
        check_listed(bundle_path)
    bundle = ClassifierBundle.load(bundle_path, trust)
    if bundle.features == PIXELS:
        raise UserError(
            f"{bundle_path} classifies raw 32x32 pixels, which the host makes from the image, so there is no "
            "backbone to merge it with; deploy a classifier fitted on a backbone's embeddings."
        )
    if list(getattr(bundle.pipeline, "classes_", [])) != list(range(len(bundle.classes))):
        raise UserError(f"{bundle_path}'s classifier does not predict the indices of its {len(bundle.classes)} "
                        "classes; deploy a bundle pipeline.fit wrote.")
    backbone = open_fitted_backbone(bundle, bundle_path, ModelRepository(models_dir), "cpu")
    bundle_sha256 = sha256_file(bundle_path)
    manifest_path = out.with_suffix(".json")
    if not force:
        current = _current(out, manifest_path, bundle_sha256, backbone.manifest.onnx_sha256)
        if current is not None:
            return DeployResult(current, out, deployed=False)
    backbone_model = onnx.load(backbone.onnx_path)
    try:
        head = head_graph(bundle.pipeline, backbone.manifest.output["dim"], _opsets(backbone_model)[""])
    except Exception as error:  # skl2onnx raises several types for estimators it cannot convert
        raise UserError(f"{bundle_path}: skl2onnx cannot convert its {type(bundle.pipeline[-1]).__name__} "
                        f"({type(error).__name__}); deploy a bundle pipeline.fit wrote.") from None
    merged = merge(backbone_model, head, backbone.manifest.output["name"], bundle.classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(merged, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
        verification = _verify(bundle, backbone, head, tmp)
        # As in export: until the new manifest lands, none claims the new file.
        manifest_path.unlink(missing_ok=True)
    manifest = DeployedManifest(**{
        **asdict(backbone.manifest),
        "onnx_file": out.name,
        "onnx_sha256": sha256_file(out),
        "output": {"name": OUTPUT_NAME, "dim": len(bundle.classes), "layer": "classifier"},
        "versions": {**backbone.manifest.versions, **_versions()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verification": {**verification, "backbone": backbone.manifest.verification},
        "classes": list(bundle.classes),
        "classifier": {
            "name": bundle.classifier, "features": bundle.features, "params": bundle.params,
            "metrics": bundle.metrics, "seed": bundle.seed, "bundle_file": bundle_path.name,
            "bundle_sha256": bundle_sha256, "fitted_with": bundle.versions,
            "backbone_onnx_file": backbone.manifest.onnx_file, "backbone_onnx_sha256": backbone.manifest.onnx_sha256,
        },
    })
    manifest.save(manifest_path)
    return DeployResult(manifest, out, deployed=True)


def _check_out(out: Path, bundle_path: Path) -> None:
    """Refuse an output that would replace something else than a deployed classifier: a backbone, fit's report."""
    if out.suffix != ".onnx":
        raise UserError(f"--out {out} must end in .onnx (its manifest is written beside it as .json).")
    if out.resolve() == bundle_path.resolve():
        raise UserError(f"--out {out} is the bundle itself; choose another file name.")
    manifest_path = out.with_suffix(".json")
    if manifest_path.exists():
        try:
            DeployedManifest.load(manifest_path)
        except UserError:
            raise UserError(f"{manifest_path} exists and is not a deployed classifier's manifest (a backbone's, or "
                            "fit's report?); choose another --out.") from None
    elif out.exists():
        raise UserError(f"{out} exists without a deployed classifier's manifest beside it; choose another --out, or "
                        "delete it if it is a deployment that was stopped midway.")


def _current(out: Path, manifest_path: Path, bundle_sha256: str, backbone_sha256: str) -> DeployedManifest | None:
    """The manifest of ``out`` when it is intact and already merges this bundle with this backbone, made by
    the same versions of this package and skl2onnx."""
    if not (out.exists() and manifest_path.exists()):
        return None
    try:
        manifest = open_deployed(out).manifest
    except UserError:
        return None
    same = (manifest.classifier.get("bundle_sha256") == bundle_sha256
            and manifest.classifier.get("backbone_onnx_sha256") == backbone_sha256
            and all(manifest.versions.get(k) == v for k, v in _versions().items() if k in ("pipeline", "skl2onnx")))
    return manifest if same else None


def _verify(bundle: ClassifierBundle, backbone: BackboneSession, head: onnx.ModelProto, merged: Path) -> dict[str, Any]:
    """Check the deployed file against the bundle; refuse it if any probability differs by more than the limit.

    The merged file is compared with the backbone then the bundle on random crops (its wiring), and the
    converted classifier with the bundle on embeddings drawn like its training ones (the conversion):
    crops of noise alone can push every probability to 1, where a wrong conversion would not show.
    """
    rng = np.random.default_rng(0)
    size = backbone.manifest.input["size"]
    crops = rng.integers(0, 256, (VERIFY_IMAGES, size, size, 3), dtype=np.uint8)
    want = bundle.pipeline.predict_proba(backbone.embed(crops))
    session = onnxruntime.InferenceSession(str(merged), providers=[CPU])
    wiring = float(np.max(np.abs(session.run([OUTPUT_NAME], {backbone.manifest.input["name"]: crops})[0] - want)))
    embeddings = _probe_embeddings(bundle.pipeline, backbone.manifest.output["dim"], rng)
    want = bundle.pipeline.predict_proba(embeddings)
    session = onnxruntime.InferenceSession(head.SerializeToString(), providers=[CPU])
    conversion = float(np.max(np.abs(session.run([OUTPUT_NAME], {HEAD_INPUT: embeddings})[0] - want)))
    if not max(wiring, conversion) <= VERIFY_MAX_DIFFERENCE:
        raise RuntimeError(f"the merged ONNX classifier disagrees with its bundle (probabilities differ by up to "
                           f"{max(wiring, conversion):.2g}); please report this.")
    return {
        "images": VERIFY_IMAGES, "max_abs_difference": wiring, "embeddings": len(embeddings),
        "embeddings_max_abs_difference": conversion, "embeddings_unsaturated": int(np.sum(want.max(axis=1) < 0.99)),
    }


def _probe_embeddings(fitted: Pipeline, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Embeddings to check a converted classifier on: around the training mean with the training spread when
    it standardises, non-negative otherwise (backbone embeddings follow a ReLU; an L2 normaliser ignores norms)."""
    noise = rng.standard_normal((VERIFY_EMBEDDINGS, dim))
    scaler = fitted.steps[0][1]
    if hasattr(scaler, "mean_"):
        return (scaler.mean_ + scaler.scale_ * noise).astype(np.float32)
    return np.abs(noise).astype(np.float32)


def _versions() -> dict[str, str]:
    return {
        "pipeline": pipeline.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "skl2onnx": skl2onnx.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
    }


def describe(result: DeployResult) -> str:
    """One line saying what a deployment did."""
    manifest = result.manifest
    size = manifest.input["size"]
    what = (f"{manifest.classifier['features']} + {manifest.classifier['name']}, {len(manifest.classes)} classes: "
            f"uint8 [N, {size}, {size}, 3] in, {OUTPUT_NAME} [N, {len(manifest.classes)}] out")
    if not result.deployed:
        return f"{result.onnx_path} is up to date ({what}); nothing to do."
    return (f"deployed {manifest.classifier['bundle_file']} as {result.onnx_path} ({what}, "
            f"{result.onnx_path.stat().st_size / 1e6:.1f} MB); its probabilities differ from the bundle's by at most "
            f"{_largest_difference(manifest.verification):.1g}.")


def _largest_difference(verification: dict[str, Any]) -> float:
    return max(verification["max_abs_difference"], verification.get("embeddings_max_abs_difference", 0.0))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.deploy``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.deploy",
        epilog=(
            "Exit status: 0 when the file was deployed or was up to date; 2 when the bundle is not listed "
            "(see --trust), cannot be converted or deployed, its backbone is missing or different, or --out would "
            "replace something else (one line, no traceback)."
        ),
        description=(
            "Merge a fitted classifier behind its backbone into one ONNX file (uint8 RGB crops [N, S, S, 3] in, "
            "class probabilities [N, C] out) that onnxruntime runs without loading any pickle; its manifest (classes, "
            "how to make the crops, provenance) goes beside it as .json. python -m pipeline.classify --classifier "
            "FILE.onnx runs it."
        ),
    )
    parser.add_argument("bundle", type=Path,
                        help="a classifier bundle written by pipeline.fit (.skops; a .joblib of an earlier version "
                        "with --trust)")
    parser.add_argument("--out", type=Path, help="the ONNX file to write (default: the bundle's path with .onnx)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="exported backbones (default: models/)")
    parser.add_argument("--trust", action="store_true",
                        help="load a bundle that no report.json beside it lists with its sha256, or a joblib bundle "
                        "of an earlier version (unpickling it runs its code; transfer bundles FOLDER rewrites those "
                        "as skops)")
    parser.add_argument("--force", action="store_true", help="deploy even if the file is already up to date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Deploy one bundle and print one line."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    result = deploy_classifier(args.bundle, args.models_dir, args.out, args.trust, args.force)
    if result.manifest.untrained:
        print(f"warning: {args.bundle} was fitted on UNTRAINED random-weight features.", file=sys.stderr)
    print(describe(result) + (f" [{time.perf_counter() - started:.1f} s]" if result.deployed else ""))
    return 0
