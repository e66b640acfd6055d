"""Decode an image file into each model's uint8 crop, exactly as its library's eval transform prepares a PIL image."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import stat
import warnings
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.extract.discover import Dataset
from pipeline.models.preprocessing import RESAMPLING, Preprocessing, resize_center_crop

logger = logging.getLogger(__name__)

PIXELS_SIZE = 32
# The raw-pixel baseline is the standard 224 px crop (Resize 256, CenterCrop 224) reduced to 32x32 with the
# same antialiased filter: made from the crop every 224 px backbone needs anyway, it costs 0.22 ms of a 640x480
# photo, not the 0.89 ms of a second resize of the whole image (v1 resized the image to 37 px and cropped 32:
# the same view). Without such a backbone in the run, the crop is made for it (about 2 ms).
PIXELS_SOURCE = Preprocessing(resize_size=256, crop_size=224)
PIXELS_FINGERPRINT = f"pixels:{PIXELS_SIZE}:v2"  # the store's fingerprint of the pixel features
EARLIER_PIXELS_FINGERPRINTS = ("pixels:32:v1",)  # recipes a store may hold that extract replaces by itself
# Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale while the result's short side stays >= DRAFT_MARGIN x the
# largest resize, and >= DRAFT_FLOOR whatever is asked (so the pixel baseline and the standard 224 px models
# decode a file alike in every stage). Measured on 2560x1920 photos: crops within 0.2-0.4 grey levels on average
# of the full decode (max 3-9), embedding cosine >= 0.99999 to it; at 1x the margin the error reached 41 levels.
DRAFT_MARGIN = 2
DRAFT_FLOOR = 512
# Images decoding to more pixels than this are skipped before any pixel is decoded (a decompression bomb,
# a scan far larger than any resize needs). Pillow's own warning threshold, about 9459 x 9459; --max-pixels.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# A file larger than this many bytes per allowed pixel (16-bit RGBA, uncompressed) is skipped unread; the
# default pixel limit sets the floor, since a JPEG decoded at reduced scale may have 64x more pixels than it makes.
MAX_BYTES_PER_PIXEL = 8
# Pillow warns about damaged EXIF, truncated TIFF reads and large images; the outcome of each file is recorded
# (its crops or its reason) and the pixel limit is ours, so those warnings are noise here, from every thread.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DecodedImage:
    """The result of decoding one file: its content hash, and either its crops or why it failed.

    Attributes
    ----------
    sha256 : str
        Hex sha256 of the bytes that were decoded ("" if the file could not be read).
    crops : tuple of numpy.ndarray
        One uint8 ``[S, S, 3]`` crop per requested preprocessing; empty on failure.
    pixels : numpy.ndarray or None
        The raw-pixel baseline: float32 ``[32 * 32 * 3]`` in [0, 1].
    error : str
        Why the file was skipped; ``""`` when it decoded.
    known : bool
        True when the hash was among the ``known`` ones, so the file was not decoded.
    """

    sha256: str
    crops: tuple[np.ndarray, ...] = ()
    pixels: np.ndarray | None = None
    error: str = ""
    known: bool = False


def decode_file(
    path: str | os.PathLike, preprocessings: Sequence[Preprocessing], known: Collection[str] = (),
    max_pixels: int = MAX_PIXELS,
) -> DecodedImage:
    """Read, hash and decode one image file; never raises for a bad file.

    Parameters
    ----------
    path : path-like
        The image file.
    preprocessings : sequence of Preprocessing
        The recipes to crop with (one per distinct backbone input).
    known : collection of str, optional
        Content hashes whose features are already at hand: such a file is hashed but not decoded.
    max_pixels : int
        An image that would decode to more pixels is a failure ("too large"), found from its header alone;
        it is returned without a hash, like an unreadable file, so that a later run tries it again. So is
        a file of more than ``MAX_BYTES_PER_PIXEL`` bytes per pixel of ``max_pixels`` (or of the default
        limit, if higher), which is not read at all.

    Returns
    -------
    DecodedImage
        With ``error`` set, and no crops, when the file cannot be read or decoded; with ``known`` set,
        and no crops, when its hash is in ``known``.
    """
    try:
        data = read_image_file(path, max(max_pixels, MAX_PIXELS) * MAX_BYTES_PER_PIXEL)
    except TooManyPixels as error:
        return DecodedImage("", error=f"too large: {error}")
    except FileNotFoundError:
        if os.path.lexists(path):
            return DecodedImage("", error="unreadable: a link to a file that does not exist")
        return DecodedImage("", error="missing: no such file")
    except OSError as error:
        return DecodedImage("", error=f"unreadable: {error.strerror or error}")
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in known:
        return DecodedImage(sha256, known=True)
    try:
        image = load_rgb(data, draft_floor(preprocessings), max_pixels)
        crops = tuple(resize_center_crop(image, p) for p in preprocessings)
        pixels = pixel_features(image, preprocessings, crops)
    except (TooManyPixels, Image.DecompressionBombError) as error:
        # No hash recorded, so the file is tried again on the next run: a raised --max-pixels then applies.
        return DecodedImage("", error=f"too large: {error}")
    except Exception as error:  # Pillow raises many types for damaged or hostile files; each one is a skip
        return DecodedImage(sha256, error=_reason(error))
    return DecodedImage(sha256, crops, pixels)


def read_image_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Raises
    ------
    OSError
        When it cannot be read or is not a regular file: opening a FIFO named ``.jpg`` would block the
        run, reading a link to ``/dev/zero`` never end, so neither is opened.
    TooManyPixels
        When it is larger than ``max_bytes``, before anything is read.
    """
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise OSError(f"not a regular file (mode {stat.filemode(status.st_mode)})")
    if status.st_size > max_bytes:
        raise TooManyPixels(f"{status.st_size:,} bytes, more than an image within --max-pixels needs ({max_bytes:,})")
    with open(path, "rb") as stream:
        # Read what stat saw (a buffer of max_bytes would be allocated whole for every file), then, should
        # the file have grown since, the rest up to the bound.
        data = stream.read(status.st_size + 1)
        if len(data) > status.st_size:
            data += stream.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise TooManyPixels(f"more than {max_bytes:,} bytes, more than an image within --max-pixels needs")
    return data


_END = object()


def map_ordered(function: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """``map(function, items)`` in ``workers`` threads, results in order, at most ``window`` in flight.

    Decoding releases the GIL in Pillow and hashlib, so threads overlap it with inference; the window
    keeps memory flat however many items there are.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        remaining = iter(items)
        for item in remaining:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                break
        while pending:
            future = pending.popleft()
            following = next(remaining, _END)
            if following is not _END:
                pending.append(pool.submit(function, following))
            yield future.result()


def batches(stream: Iterable, size: int) -> Iterator[list]:
    """Group a stream into lists of ``size`` (the last may be shorter)."""
    batch = []
    for element in stream:
        batch.append(element)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def draft_floor(preprocessings: Sequence[Preprocessing]) -> int:
    """The short side a JPEG may be reduced to (by DCT scaling) for these preprocessings."""
    return max(DRAFT_FLOOR, DRAFT_MARGIN * max((p.resize_size for p in preprocessings), default=0))


class TooManyPixels(ValueError):
    """An image (or image file) larger than the limit; raised before it is decoded (or read)."""


def jpeg_draft_size(size: tuple[int, int], min_short_side: int) -> tuple[int, int] | None:
    """The size to ask a JPEG's DCT-domain downscaling for, so its short side stays >= ``min_short_side``.

    None when the image is less than twice that (libjpeg scales by 1/2, 1/4 or 1/8 only).
    """
    width, height = size
    if min_short_side <= 0 or 2 * min_short_side > min(width, height):
        return None
    factor = min_short_side / min(width, height)
    return math.ceil(width * factor), math.ceil(height * factor)


def load_rgb(data: bytes, min_short_side: int = 0, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image, upright.

    The first frame of an animation is used; EXIF orientation is applied; grayscale, CMYK, palette and
    alpha images become RGB through ``convert("RGB")`` as torchvision's default loader does. 16-bit
    (and 32-bit integer) grayscale is scaled to 8 bits rather than clipped to white by ``convert``.
    A JPEG at least twice ``min_short_side`` is decoded at a reduced scale (draft mode) that keeps its
    short side >= ``min_short_side``: decode.DRAFT_MARGIN says how much above the resize that is.
    An image that would decode to more than ``max_pixels`` pixels raises :class:`TooManyPixels` first.
    """
    image = open_image(data, min_short_side, max_pixels)
    image.load()
    # In place: otherwise every image is copied, rotated or not (0.07 ms of a 640x480 photo, make bench).
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def open_image(data: bytes, min_short_side: int = 0, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The first frame of the image in ``data``, not yet decoded, with a JPEG's reduced scale chosen (see
    :func:`load_rgb`); raises :class:`TooManyPixels` for an image above ``max_pixels``."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses twice its limit in open(); ours is the one that counts
    # Not closed by a with block: closing destroys the pixels, and an in-memory file needs no closing.
    image = Image.open(io.BytesIO(data))
    image.seek(0)
    draft = jpeg_draft_size(image.size, min_short_side) if image.format == "JPEG" else None
    width, height = _draft_result(image.size, draft) if draft else image.size
    if width * height > max_pixels:
        raise TooManyPixels(f"{image.size[0]}x{image.size[1]} pixels, above the limit of {max_pixels:,} (--max-pixels)")
    if draft:
        image.draft(None, draft)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image in 8-bit RGB: 16-bit and float grayscale scaled to 8 bits, every other mode converted."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.float32), 0, 65535)
        image = Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0  # float images are usually in [0, 1]
        image = Image.fromarray(np.rint(np.clip(np.nan_to_num(values) * scale, 0, 255)).astype(np.uint8), mode="L")
    return image.convert("RGB") if image.mode != "RGB" else image


def _draft_result(size: tuple[int, int], draft: tuple[int, int]) -> tuple[int, int]:
    """The size libjpeg decodes to when asked for at least ``draft``: the largest 1/2^k scale that covers it."""
    scale = 1
    while scale < 8 and size[0] // (scale * 2) >= draft[0] and size[1] // (scale * 2) >= draft[1]:
        scale *= 2
    return -(-size[0] // scale), -(-size[1] // scale)


def pixel_features(image: Image.Image, preprocessings: Sequence[Preprocessing],
                   crops: Sequence[np.ndarray]) -> np.ndarray:
    """The raw-pixel baseline of ``image``.

    Parameters
    ----------
    image : PIL.Image.Image
        The upright RGB image.
    preprocessings : sequence of Preprocessing
        The recipes the backbones of the run crop with.
    crops : sequence of numpy.ndarray
        Their crops of ``image``, in the same order: the one of ``PIXELS_SOURCE``'s recipe, if any, is reused.

    Returns
    -------
    numpy.ndarray
        The ``PIXELS_SOURCE`` crop reduced to ``PIXELS_SIZE`` square, float32 in [0, 1], flattened (HWC).
    """
    source = next((crop for p, crop in zip(preprocessings, crops) if _same_crop(p, PIXELS_SOURCE)), None)
    if source is None:
        source = resize_center_crop(image, PIXELS_SOURCE)
    small = Image.fromarray(source).resize((PIXELS_SIZE, PIXELS_SIZE), RESAMPLING[PIXELS_SOURCE.interpolation])
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


def _same_crop(a: Preprocessing, b: Preprocessing) -> bool:
    """Whether two recipes make the same uint8 crop (their normalisation happens later, in the graph)."""
    return a.crop_key == b.crop_key


def calibration_crops(dataset: Dataset, preprocessing: Preprocessing,
                      seed: int = 0) -> Iterator[tuple[np.ndarray, str]]:
    """The images a precision variant may be calibrated and verified on, as ``(crop, sha256)`` in a seeded random
    order: the dataset's outside its test split (its test images when it has no others); files that cannot be
    decoded are left out."""
    usable = [record for record in dataset.records if record.split != "test"]
    if not usable:
        logger.warning(f"{dataset.root} has only test images; the int8 calibration is drawn from them.")
    paths = [dataset.absolute(record) for record in usable or dataset.records]
    for index in np.random.default_rng(seed).permutation(len(paths)):
        decoded = decode_file(paths[index], [preprocessing])
        if not decoded.error:
            yield decoded.crops[0], decoded.sha256


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can decode (unknown format or damaged header)"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__
