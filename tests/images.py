"""Small images the tests generate: several formats and modes, EXIF orientations, damaged files, layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB picture with some texture, so resizing and embeddings are not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    freq = rng.uniform(0.02, 0.2, 3)
    channels = [127 + 100 * np.sin(freq[c] * x + phase[c]) * np.cos(freq[(c + 1) % 3] * y) for c in range(3)]
    noise = rng.normal(0, 12, (height, width, 3))
    return np.clip(np.stack(channels, -1) + noise, 0, 255).astype(np.uint8)


def save(path: Path, array: np.ndarray, **options) -> Path:
    """Save ``array`` as an image at ``path`` (format from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def with_orientation(path: Path, array: np.ndarray, orientation: int) -> Path:
    """A JPEG whose EXIF orientation tag is ``orientation`` (the pixels are stored as given)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(path, array, exif=exif.tobytes(), quality=95)


def class_folders(root: Path, classes: dict[str, int], size: tuple[int, int] = (60, 80), seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg`` (every third one nested in ``sub/`` and saved as PNG)."""
    number = seed
    for name, count in classes.items():
        for i in range(count):
            number += 1
            relative = f"sub/{i}.png" if i % 3 == 2 else f"{i}.jpg"
            save(root / name / relative, photo(size[0] + i, size[1], number))
    return root


def pets(root: Path) -> Path:
    """Two classes in nested folders, PNG and JPEG, an EXIF-rotated photo, a corrupt file, clutter."""
    class_folders(root, {"cat": 4, "dog": 3})
    with_orientation(root / "dog" / "rotated.jpg", photo(70, 110, seed=42), orientation=6)
    save(root / "cat" / "gray.png", photo(90, 60, seed=7)[..., 0])
    (root / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
    (root / "notes.txt").write_text("ignored")
    return root
