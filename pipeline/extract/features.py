"""The feature sets a run computes per batch: one per backbone session, and the raw-pixel baseline."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.extract.decode import PIXELS_FINGERPRINT, PIXELS_SIZE, PIXELS_SOURCE, DecodedImage
from pipeline.extract.discover import ImageRecord
from pipeline.models import BackboneSession, Preprocessing
from pipeline.store import PIXELS, FileState, Segment

# A batch's outcome, as the backends yield it and extract records it: the work items, each file's sha256
# and decoding error ("" when decoded), and per feature set the rows of the items that needed it and decoded.
BatchOutcome = tuple[list, list[str], list[str], dict[str, np.ndarray]]


@dataclass
class FeatureSpec:
    """One feature set to compute: a backbone session, or the raw-pixel baseline (``session`` None)."""

    name: str
    fingerprint: str
    attrs: dict
    session: BackboneSession | None = None
    crop_index: int = 0
    seconds: float = 0.0
    embedded: int = 0
    skipped: int = 0
    setup_seconds: float = 0.0  # this run's one-time work before embedding: exports, precision variants

    def features(self, decoded: Sequence[DecodedImage]) -> np.ndarray:
        """Features of successfully decoded images, ``[N, D]`` float32."""
        if self.session is None:
            return np.stack([d.pixels for d in decoded])
        started = time.perf_counter()
        result = self.session.embed(np.stack([d.crops[self.crop_index] for d in decoded]))
        self.seconds += time.perf_counter() - started
        return result


def feature_specs(sessions: Sequence[BackboneSession],
                  storage: str | None = None) -> tuple[list[FeatureSpec], list[Preprocessing]]:
    """Feature sets for the sessions plus the pixel baseline, and the distinct crops they need: models whose
    recipes differ only in their normalisation (done in the graph) share one crop. A ``storage`` asked for is
    recorded in every set's attributes (the store keeps the rows so)."""
    preprocessings: list[Preprocessing] = []
    specs = []
    for session in sessions:
        manifest = session.manifest
        spec_input = manifest.input
        keys = [p.crop_key for p in preprocessings]
        if manifest.preprocessing.crop_key not in keys:
            preprocessings.append(manifest.preprocessing)
            keys.append(manifest.preprocessing.crop_key)
        attrs = {
            "kind": "onnx",
            "model": manifest.model,
            "precision": manifest.precision,
            "source_onnx_sha256": manifest.source_sha256,
            "calibration_images": manifest.calibration.get("images", 0),
            "calibration_sha256": _digest(manifest.calibration.get("sha256", [])),
            "fingerprint": manifest.onnx_sha256,
            "onnx_file": manifest.onnx_file,
            "onnx_sha256": manifest.onnx_sha256,
            "weights_source": manifest.weights["source"],
            "weights_id": manifest.weights_id,
            "weights_sha256": manifest.weights.get("sha256", ""),
            "weights": json.dumps(manifest.weights),
            "weights_license": manifest.license,
            "untrained": manifest.untrained,
            "image_size": spec_input["size"],
            "resize_size": spec_input["resize_size"],
            "resize_mode": manifest.preprocessing.resize_mode,
            "interpolation": spec_input["interpolation"],
            "provider": session.provider,
            "embedding_dim": manifest.output["dim"],
            "embedding_layer": manifest.output["layer"],
        }
        specs.append(FeatureSpec(manifest.name, manifest.onnx_sha256, attrs, session,
                                 keys.index(manifest.preprocessing.crop_key)))
    pixel_attrs = {
        "kind": "pixels",
        "fingerprint": PIXELS_FINGERPRINT,
        "image_size": PIXELS_SIZE,
        "resize_size": PIXELS_SOURCE.resize_size,
        "crop_size": PIXELS_SOURCE.crop_size,
        "interpolation": PIXELS_SOURCE.interpolation,
        "embedding_dim": PIXELS_SIZE * PIXELS_SIZE * 3,
        "description": f"raw-pixel baseline: the {PIXELS_SOURCE.crop_size} px center crop of Resize("
                       f"{PIXELS_SOURCE.resize_size}) reduced to {PIXELS_SIZE}x{PIXELS_SIZE} RGB, flattened (HWC), "
                       "in [0, 1]",
    }
    specs.append(FeatureSpec(PIXELS, PIXELS_FINGERPRINT, pixel_attrs))
    if storage is not None:
        for spec in specs:
            spec.attrs["storage"] = storage
    return specs, preprocessings


def describe_features(attrs: dict, name: str = "") -> str:
    """How a feature set was computed, in words, from its store attributes: the pixel baseline's recipe, or the
    weights, licence, model (unless it is ``name``, the set's own), crop, precision, layer and ONNX file of a
    backbone's."""
    if attrs.get("kind") == "pixels":
        what = attrs.get("description") or f"pixels of {attrs.get('image_size')} px"
        return f"{what}, recipe {attrs.get('fingerprint')}"
    model = f"{attrs['model']}, " if attrs.get("model") not in (None, name) else ""
    licence = f", licence {attrs['weights_license']}" if attrs.get("weights_license") else ""
    return (
        f"weights {attrs.get('weights_id')}{licence}, {model}{attrs.get('image_size')} px, {attrs.get('precision')}, "
        f"{attrs.get('embedding_layer')} ({attrs.get('embedding_dim')}-d), "
        f"ONNX sha256 {str(attrs.get('onnx_sha256'))[:12]}"
    )


def _digest(hashes: Sequence[str]) -> str:
    """One sha256 over a list of image hashes (the list itself is in the model's manifest)."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest() if hashes else ""


def embed_batch(
    decoded: Sequence[DecodedImage], needed: Sequence[Collection[str]], specs: Sequence[FeatureSpec]
) -> dict[str, np.ndarray]:
    """Per feature set, the features of the images that need it and decoded, in batch order.

    Parameters
    ----------
    decoded : sequence of DecodedImage
        A batch of decoding results, failures included.
    needed : sequence of collections of str
        For each image, the feature sets it needs.
    specs : sequence of FeatureSpec

    Returns
    -------
    dict
        ``{name: float32 [n, D]}`` for each feature set with at least one such image.
    """
    features = {}
    for spec in specs:
        good = [d for d, names in zip(decoded, needed) if spec.name in names and not d.error]
        if good:
            features[spec.name] = spec.features(good)
    return features


def record_outcomes(
    records: Sequence[ImageRecord], listed: Sequence[FileState], needed: Sequence[Collection[str]],
    hashes: Sequence[str], errors: Sequence[str], features: dict[str, np.ndarray], specs: Sequence[FeatureSpec],
    segments: dict[str, Segment],
) -> None:
    """Add a batch's outcomes to the segments: a row per image that needed a feature set and decoded, else a failure.

    Parameters
    ----------
    records, listed, needed : sequences
        Per image: its record, its file's size and mtime when the run listed it, the feature sets it needs.
    hashes, errors : sequences of str
        Per image: the sha256 of the bytes decoded, and why decoding failed (``""`` when it did not).
    features : dict
        ``features[name]`` holds the rows of the images that needed ``name`` and decoded, in batch order
        (as :func:`embed_batch` returns them).
    specs : sequence of FeatureSpec
        Their ``embedded`` and ``skipped`` counts go up.
    segments : dict
        The segment of each feature set.
    """
    for spec in specs:
        segment = segments[spec.name]
        rows = iter(features.get(spec.name, ()))
        for record, state, names, sha256, error in zip(records, listed, needed, hashes, errors):
            if spec.name not in names:
                continue
            read = FileState(sha256, state.size, state.mtime_ns)
            if error:
                segment.failures.append((record.path, read, error))
                spec.skipped += 1
            else:
                segment.records.append(record)
                segment.states.append(read)
                segment.embeddings.append(np.asarray(next(rows), dtype=np.float32))
                spec.embedded += 1


def count_outcomes(needed: Sequence[Collection[str]], errors: Sequence[str], specs: Sequence[FeatureSpec]) -> None:
    """Count a batch's outcomes that another process recorded (embedded or skipped, per feature set)."""
    for spec in specs:
        for names, error in zip(needed, errors):
            if spec.name in names:
                if error:
                    spec.skipped += 1
                else:
                    spec.embedded += 1
