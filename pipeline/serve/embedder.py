"""Embed a list of image files with one backbone, reusing stored embeddings: for classify and scikit-learn users."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.extract.decode import MAX_PIXELS, PIXELS_FINGERPRINT, PIXELS_SIZE, batches, decode_file, map_ordered
from pipeline.files import available_cores
from pipeline.models import BackboneSession, ModelRepository, feature_set_name
from pipeline.store import PIXELS, EmbeddingStore

ON_ERROR = ("raise", "nan")


@dataclass(frozen=True)
class Embedded:
    """The outcome for one file: its features, or why there are none.

    Attributes
    ----------
    path : str
        The file as given.
    sha256 : str
        Hex sha256 of its bytes (``""`` when unreadable).
    features : numpy.ndarray or None
        float32 ``[D]``; None when the file could not be decoded.
    error : str
        Why it could not be decoded; ``""`` when fine.
    cached : bool
        True when the features came from the store rather than from the model.
    """

    path: str
    sha256: str
    features: np.ndarray | None
    error: str = ""
    cached: bool = False


def stored_features(cache: str | os.PathLike | None, name: str, fingerprint: str) -> Mapping[str, np.ndarray]:
    """Stored features of feature set ``name`` by content hash, when computed with ``fingerprint``; else empty.

    Only the hashes are read up front; an embedding is read from its shard when it is asked for.
    """
    if cache is None:
        return {}
    store = EmbeddingStore(cache)
    return store.lookup(name, fingerprint) if store.exists() else {}


def embed_files(
    paths: Sequence[str | os.PathLike],
    session: BackboneSession | None,
    known: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    progress: bool | None = False,
    max_pixels: int = MAX_PIXELS,
) -> Iterator[Embedded]:
    """Embed image files in order: decode in threads, run the backbone in batches, reuse ``known`` hashes.

    Parameters
    ----------
    paths : sequence of path-like
        Image files.
    session : BackboneSession or None
        The backbone; None for the 32x32 raw-pixel features.
    known : mapping, optional
        Features already computed, by content hash (see :func:`stored_features`).
    batch_size : int
        Images per inference batch.
    workers : int, optional
        Decoding threads (default: available cores).
    progress : bool or None
        Show a progress bar (None: only on a terminal).
    max_pixels : int
        Images that would decode to more pixels get a "too large" error instead.

    Yields
    ------
    Embedded
        One per path, in the order given; a file that cannot be decoded yields its error, it never raises.
    """
    known = known or {}
    preprocessings = [session.manifest.preprocessing] if session is not None else []
    decode = lambda path: decode_file(path, preprocessings, known, max_pixels)  # noqa: E731
    stream = zip(paths, map_ordered(decode, paths, workers or available_cores(), 2 * batch_size))
    with tqdm(total=len(paths), unit="img", desc="embed", disable=None if progress is None else not progress) as bar:
        for batch in batches(stream, batch_size):
            fresh = [d for _, d in batch if not d.error and not d.known]
            if fresh and session is not None:
                computed = iter(session.embed(np.stack([d.crops[0] for d in fresh])))
            else:
                computed = iter([d.pixels for d in fresh])
            for path, decoded in batch:
                if decoded.error:
                    yield Embedded(str(path), decoded.sha256, None, decoded.error)
                elif decoded.known:
                    yield Embedded(str(path), decoded.sha256, known[decoded.sha256], cached=True)
                else:
                    yield Embedded(str(path), decoded.sha256, np.asarray(next(computed), np.float32))
            bar.update(len(batch))


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """A scikit-learn transformer from image file paths to backbone embeddings.

    It runs the same decoding, preprocessing and exported ONNX model as ``pipeline.extract``, so
    ``make_pipeline(ImageEmbedder("resnet50"), LogisticRegression())`` fits and predicts on paths, and works
    inside ``GridSearchCV``. Images whose content is already in the store at ``cache`` (computed by the
    same ONNX file) are not embedded again.

    Parameters
    ----------
    model : str
        A model exported into ``models_dir`` (``vgg16``, ``resnet50``, ``timm/<name>[.<tag>]``,
        ``torchvision/<name>``), a precision variant made by extract ``--precision`` or pipeline.quantize
        (``resnet50-int8``, ``timm/convnext_atto.d2_in1k-int8``), or ``pixels`` for the 32x32 raw-pixel baseline.
    models_dir : path-like
        Folder of the exported models.
    cache : path-like, optional
        An embedding store to reuse rows from (read only).
    batch_size : int
        Images per inference batch.
    device : {"auto", "cuda", "cpu"}
        Where onnxruntime runs.
    workers : int, optional
        Decoding threads (default: available cores).
    on_error : {"raise", "nan"}
        A file that cannot be decoded raises, or becomes a row of NaN.
    progress : bool
        Show a progress bar while transforming.

    Attributes
    ----------
    n_features_in_ : int
        1: each sample is one image path.
    onnx_sha256_ : str
        The ONNX file the embeddings come from (``""`` for pixels).
    weights_ : dict
        Provenance of the backbone's weights.
    embedding_dim_ : int
        Number of output features.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression  # doctest: +SKIP
    >>> from sklearn.pipeline import make_pipeline  # doctest: +SKIP
    >>> classifier = make_pipeline(ImageEmbedder("resnet50"), LogisticRegression())  # doctest: +SKIP
    >>> classifier.fit(["cat/1.jpg", "dog/1.jpg"], ["cat", "dog"]).predict(["new.jpg"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str = "resnet50",
        models_dir: str | os.PathLike = "models",
        cache: str | os.PathLike | None = None,
        batch_size: int = 16,
        device: str = "auto",
        workers: int | None = None,
        on_error: str = "raise",
        progress: bool = False,
    ) -> None:
        self.model = model
        self.models_dir = models_dir
        self.cache = cache
        self.batch_size = batch_size
        self.device = device
        self.workers = workers
        self.on_error = on_error
        self.progress = progress

    def fit(self, X: Iterable | None = None, y: object = None) -> ImageEmbedder:
        """Open the backbone (nothing is learned from ``X``); returns self."""
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r} must be one of {ON_ERROR}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if self.model != PIXELS:
            try:
                feature_set_name(self.model)
            except UserError as error:
                raise ValueError(f"model={self.model!r}: {error}") from None
        self.__dict__.pop("_session", None)
        self.n_features_in_ = 1  # one input feature: the image's path
        session = None if self.model == PIXELS else ModelRepository(self.models_dir).load(self.model).open(self.device)
        self._session = session
        if session is None:
            self.onnx_sha256_, self.weights_, self.embedding_dim_ = "", {}, PIXELS_SIZE * PIXELS_SIZE * 3
        else:
            manifest = session.manifest
            self.onnx_sha256_, self.weights_ = manifest.onnx_sha256, dict(manifest.weights)
            self.embedding_dim_ = int(manifest.output["dim"])
        return self

    def transform(self, X: Iterable[str | os.PathLike]) -> np.ndarray:
        """Embed image files: ``X`` is a sequence of paths (or a one-column array of them); returns float32 ``[N, D]``.

        Raises
        ------
        UserError
            With ``on_error="raise"``, for the first file that cannot be decoded, naming it.
        """
        check_is_fitted(self, "onnx_sha256_")
        paths = _paths(X)
        session = self._open()
        fingerprint = self.onnx_sha256_ or PIXELS_FINGERPRINT
        known = stored_features(self.cache, session.manifest.name if session else PIXELS, fingerprint)
        rows = np.full((len(paths), self.embedding_dim_), np.nan, dtype=np.float32)
        for i, result in enumerate(embed_files(paths, session, known, self.batch_size, self.workers, self.progress)):
            if result.error:
                if self.on_error == "raise":
                    raise UserError(f"cannot embed {result.path}: {result.error}; remove it or use on_error='nan'.")
                continue
            rows[i] = result.features
        return rows

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """``<feature set>_0``, ``<feature set>_1``, ... one name per embedding dimension (``resnet50-int8_0``,
        ``timm-convnext_atto-d2_in1k_0``, ...)."""
        check_is_fitted(self, "embedding_dim_")
        name = self.model if self.model == PIXELS else feature_set_name(self.model)
        return np.array([f"{name}_{i}" for i in range(self.embedding_dim_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_session", None)  # an onnxruntime session cannot be pickled; it is reopened on demand
        return state

    def _open(self) -> BackboneSession | None:
        if self.model == PIXELS:
            return None
        session = self.__dict__.get("_session")
        if session is None:  # after unpickling, e.g. in a GridSearchCV worker
            session = ModelRepository(self.models_dir).load(self.model).open(self.device)
            if session.manifest.onnx_sha256 != self.onnx_sha256_:
                raise UserError(
                    f"{session.onnx_path} changed since this ImageEmbedder was fitted (ONNX sha256 "
                    f"{session.manifest.onnx_sha256[:12]}, fitted on {self.onnx_sha256_[:12]}); fit it again."
                )
            self._session = session
        return session


def _paths(X: Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(X, (str, os.PathLike)):
        raise ValueError(f"ImageEmbedder expects a sequence of image paths, got the single path {X!r}; pass [{X!r}]")
    array = np.asarray(list(X) if not hasattr(X, "__array__") else X, dtype=object)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"ImageEmbedder expects a sequence of image paths, got an array of shape {array.shape}")
    return [os.fspath(path) for path in array]
