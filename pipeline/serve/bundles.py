"""A bundle put to use: refused unless the report beside it lists it, and matched to the backbone it was fitted on."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.errors import UserError, command
from pipeline.extract.decode import PIXELS_FINGERPRINT
from pipeline.files import sha256_file
from pipeline.fit.bundle import ClassifierBundle
from pipeline.models import BackboneSession, ModelRepository
from pipeline.store import PIXELS

logger = logging.getLogger(__name__)


def check_listed(path: str | os.PathLike) -> None:
    """Refuse a bundle that the ``report.json`` beside it does not list with the sha256 it has now.

    This says the bundle is the one fit wrote there, unchanged since; it is no safety against a crafted file (the
    report travels with the bundles): loading builds only allow-listed types (:meth:`ClassifierBundle.load`).

    Raises
    ------
    UserError
        When the bundle exists but is not listed, or its bytes changed since fit listed them.
    """
    path = Path(path)
    if not path.is_file():
        return  # ClassifierBundle.load says it is missing
    report = path.parent / "report.json"
    try:
        listed = {entry["path"]: entry["sha256"] for entry in json.loads(report.read_text(encoding="utf-8"))["bundles"]}
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    if path.name not in listed:
        where = f"listed in {report}" if report.exists() else f"beside a report.json (none at {report})"
        raise UserError(
            f"{path} is not {where}, so it is not known to be a bundle fit wrote there; use a bundle fit wrote, or "
            "pass --trust if you know where this one comes from."
        )
    if sha256_file(path) != listed[path.name]:
        raise UserError(
            f"{path} is not the file {report} lists (its sha256 changed); fit again, or pass --trust if you know why "
            "it changed."
        )


def open_fitted_backbone(
    bundle: ClassifierBundle, bundle_path: Path, repository: ModelRepository, device: str,
    precision: str = "auto", allow_precision_change: bool = False,
) -> BackboneSession | None:
    """The backbone the bundle was fitted on, matched by its fingerprint (None for the pixel baseline).

    ``precision`` ``auto`` is the bundle's own. Another precision of the same fp32 export is refused
    unless ``allow_precision_change``: its embeddings differ slightly from those the classifier learnt.
    """
    if bundle.features == PIXELS:
        if bundle.provenance.get("fingerprint", PIXELS_FINGERPRINT) != PIXELS_FINGERPRINT:
            logger.info(f"notice: {bundle_path} was fitted on pixel-baseline features of an earlier recipe "
                  f"({bundle.provenance['fingerprint']}, now {PIXELS_FINGERPRINT}); its predictions may shift "
                        "slightly: extract and fit again to refresh it.")
        if precision != "auto":
            logger.info(f"notice: --precision {precision} does not apply to {bundle_path}: it classifies raw pixels.")
        return None
    fitted = bundle.provenance.get("precision", "fp32")
    model = bundle.provenance.get("model") or bundle.features
    wanted = fitted if precision == "auto" else precision
    if wanted != fitted and not allow_precision_change:
        raise UserError(
            f"{bundle_path} was fitted on {fitted} embeddings ({bundle.features}), not {wanted}; classify with "
            f"--precision {fitted}, fit a classifier on {model} {wanted} features, or pass "
            "--allow-precision-change to use it anyway (predictions may shift slightly)."
        )
    backbone = repository.load(model, wanted)
    if wanted == fitted and backbone.fingerprint != bundle.onnx_sha256:
        remedy = ("export that model again" if fitted == "fp32" else
                  f"fit again on {backbone.name} features extracted with it (the variant was made again)")
        raise UserError(
            f"{bundle_path} was fitted on {bundle.features} embeddings of ONNX sha256 {bundle.onnx_sha256[:12]} "
            f"({bundle.provenance.get('weights_id')}), but {backbone.onnx_path} has sha256 "
            f"{backbone.fingerprint[:12]} ({backbone.manifest.weights_id}); {remedy}, or use a classifier "
            "fitted on this one."
        )
    source = bundle.provenance.get("source_onnx_sha256", bundle.onnx_sha256)
    if wanted != fitted and backbone.manifest.source_sha256 != source:
        raise UserError(
            f"{backbone.onnx_path} derives from an fp32 export of sha256 {backbone.manifest.source_sha256[:12]}, but "
            f"{bundle_path} from one of sha256 {source[:12]}; make the variant again from the current export "
            f"({command('quantize')} --model {model} --precision {wanted} --force"
            + (" --calibration DATA" if wanted == "int8" else "") + ") or classify at --precision " + fitted + "."
        )
    return backbone.open(device)
