"""What fit fits on: the feature sets asked for, aligned by path, and the split of their labelled rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, command
from pipeline.models import feature_set_name
from pipeline.models.registry import feature_set_order, parse_feature_set
from pipeline.store import PIXELS, EmbeddingStore, FeatureSet

logger = logging.getLogger(__name__)

MIN_TRAIN_PER_CLASS = 2


@dataclass
class Split:
    """Labelled rows common to every feature set, and which part each belongs to.

    Attributes
    ----------
    paths : numpy.ndarray
        str ``[N]``, the rows' image paths (the key that aligns feature sets).
    labels : numpy.ndarray
        int ``[N]``, indices into ``classes``.
    classes : list of str
        The classes that have labelled rows.
    part : numpy.ndarray
        str ``[N]``: ``train``, ``validation`` or ``test``.
    source : str
        Where the split came from, in words.
    """

    paths: np.ndarray
    labels: np.ndarray
    classes: list[str]
    part: np.ndarray
    source: str

    @property
    def train(self) -> np.ndarray:
        """Rows used for fitting, validation rows included (they score the hyper-parameters)."""
        return self.part != "test"

    @property
    def test(self) -> np.ndarray:
        return self.part == "test"


def load_features(store: EmbeddingStore, models: Sequence[str] | None,
                  embeddings: bool = True) -> dict[str, FeatureSet]:
    """The feature sets to fit: ``models`` (default: every backbone in the store), then the pixel baseline.

    Without ``embeddings``, only the rows' paths, labels and splits are loaded (for fitting out of core).
    """
    present = store.feature_sets()
    if not store.exists():
        store.load(PIXELS)  # raises the store's own "run extract first" error
    names = [feature_set_name(model) for model in models] if models else sorted(set(present) - {PIXELS},
                                                                                 key=feature_set_order)
    for name in names:
        if name not in present:
            raise UserError(missing_set(store, name, present))
    if not names:
        raise UserError(
            f"{store.path} holds no backbone features (it has: {', '.join(present) or 'none'}); run extract."
        )
    if PIXELS in present:
        names.append(PIXELS)
    else:
        logger.warning(f"{store.path} has no pixels feature set, so the report has no raw-pixel baseline.")
    features = {}
    for name in names:
        feature_set = store.load(name, embeddings)
        if not embeddings:
            features[name] = feature_set  # non-finite rows are caught chunk by chunk
            continue
        finite = np.isfinite(feature_set.embeddings).all(axis=1)
        if not finite.all():
            raise UserError(
                f"{store.path}: {(~finite).sum()} {name} embeddings hold NaN or infinite values (first: "
                f"{feature_set.paths[~finite][0]}); the model file is broken: export it again and extract with "
                "--overwrite."
            )
        features[name] = feature_set
    return features


def missing_set(store: EmbeddingStore, name: str, present: Sequence[str]) -> str:
    """Why ``name`` cannot be fitted, in a sentence: the store holds none, or holds the model at another precision
    (as after an int8 extract), naming that set and the command that makes the one asked for."""
    model, precision = parse_feature_set(name)
    others = [other for other in present if other != PIXELS and parse_feature_set(other)[0] == model]
    if not others:
        return f"{store.path} has no {name!r} features (it has: {', '.join(present) or 'none'}); extract them first."
    return (f"{store.path} holds {model.name} at another precision ({', '.join(others)}), not {name!r}; fit on it with "
            f"--models {others[0]}, or make the {precision} set: {command('extract')} DATA --models {model.name} "
            f"--precision {precision} --cache {store.path}.")


def make_split(features: dict[str, FeatureSet], test_size: float, seed: int, store_path: Path) -> Split:
    """Align the labelled rows of every feature set by path and assign train, validation and test.

    The split recorded by extract is used when the store has one: with a test split as it is; with train
    and validation only (``DATA/{train,validation}/``), the validation images are the test part and the
    settings are chosen by cross-validation on train. Otherwise ``test_size`` of each class is held out at
    random (seeded), keeping at least two training images per class.
    """
    first = next(iter(features.values()))
    common = None
    for feature_set in features.values():  # numpy set operations: no Python object per image
        labelled = np.unique(feature_set.paths[feature_set.labels >= 0])
        common = labelled if common is None else np.intersect1d(common, labelled, assume_unique=True)
    if not len(common):
        raise UserError(
            f"{store_path} has no labelled images to fit on; extract a folder of class sub-folders "
            "(DATA/<class>/<image>) or a CSV with a label column."
        )
    lost = {name: int((fs.labels >= 0).sum()) - len(common) for name, fs in features.items()}
    if any(lost.values()):
        logger.warning(f"fitting on the {len(common)} labelled images every feature set has "
                       f"(others skipped: {lost}); run extract again to complete the store.")
    order = np.flatnonzero(np.isin(first.paths, common))
    paths, store_labels, recorded = first.paths[order], first.labels[order], first.splits[order]
    present = np.unique(store_labels)
    if len(present) < 2:
        raise UserError(
            f"{store_path} has labelled images of only one class ({str(first.classes[present[0]])!r}); a classifier "
            "needs at least two: add a folder per class."
        )
    classes = [str(first.classes[i]) for i in present]
    labels = np.searchsorted(present, store_labels)
    if (recorded == "test").any():
        part = np.where(np.isin(recorded, ["validation", "test"]), recorded, "train").astype(object)
        source = "the train/validation/test split recorded by extract"
    elif (recorded == "validation").any() and (recorded == "train").any():
        # DATA/{train,validation}/<class>/, the classic layout: fitted on train, scored on validation
        part = np.where(recorded == "validation", "test", "train").astype(object)
        source = (f"fitted on the train folder ({int((recorded == 'train').sum())} images; settings by cross-"
                  f"validation on it), scored on the validation folder ({int((recorded == 'validation').sum())} "
                  "images), as the layout recorded by extract says")
    else:
        part = _hold_out(labels, test_size, seed)
        part[recorded == "validation"] = np.where(part[recorded == "validation"] == "test", "test", "validation")
        source = f"a stratified hold-out of {test_size:.0%} per class (seed {seed})"
    split = Split(paths, labels, classes, part.astype(str), source)
    fitting = np.bincount(labels[split.part == "train"], minlength=len(classes))
    if (split.part == "validation").any() and fitting.min() == 0:
        name = classes[int(fitting.argmin())]
        raise UserError(
            f"class {name!r} in {store_path} has all its training images in the validation split, so no setting can "
            "learn it; move some of them to train/."
        )
    counts = np.bincount(labels[split.train], minlength=len(classes))
    if counts.min() < MIN_TRAIN_PER_CLASS:
        name = classes[int(counts.argmin())]
        raise UserError(
            f"class {name!r} has {counts.min()} training image(s) in {store_path}; fitting needs at least "
            f"{MIN_TRAIN_PER_CLASS} per class: add images of it, or leave it out of the dataset."
        )
    return split


def _hold_out(labels: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Per class, ``test_size`` of the rows (rounded) as test, keeping at least two for training."""
    rng = np.random.default_rng(seed)
    part = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(round(len(members) * test_size), len(members) - MIN_TRAIN_PER_CLASS)
        part[members[:max(count, 0)]] = "test"
    return part


def row_indices(feature_set: FeatureSet, paths: np.ndarray) -> np.ndarray:
    """The store rows of ``paths`` (all present), in that order."""
    order = np.argsort(feature_set.paths, kind="stable")
    return order[np.searchsorted(feature_set.paths[order], paths)]
