"""Small images the tests generate: several formats and modes, EXIF orientations, damaged files, layouts."""

from __future__ import annotations

import io
import os
import struct
import zlib
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


def hostile_corpus(root: Path) -> tuple[Path, set[str], set[str]]:
    """One class folder of everything a real collection throws at a reader.

    Returns the folder and the relative paths that must decode and that must fail (a name that is not
    UTF-8 is in neither: discover leaves it out, with a warning).
    """
    folder = root / "mixed"
    folder.mkdir(parents=True)
    good, bad = set(), set()

    def keep(name: str, array: np.ndarray, **options) -> None:
        save(folder / name, array, **options)
        good.add(f"mixed/{name}")

    keep("one-pixel.png", photo(1, 1))
    keep("strip.png", photo(10, 1000))
    Image.fromarray(photo(40, 50, 1)).convert("CMYK").save(folder / "cmyk.jpg")
    good.add("mixed/cmyk.jpg")
    Image.fromarray(photo(30, 40, 2)[..., 0].astype(np.uint16) * 257).save(folder / "sixteen-bit.png")
    good.add("mixed/sixteen-bit.png")
    palette = Image.fromarray(photo(30, 40, 3)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    good.add("mixed/palette.png")
    Image.fromarray(photo(30, 40, 4)).convert("LA").save(folder / "grey-alpha.png")
    good.add("mixed/grey-alpha.png")
    frames = [Image.fromarray(photo(30, 40, seed)) for seed in (5, 6)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    good.add("mixed/animated.gif")
    for orientation in range(1, 9):
        with_orientation(folder / f"orientation-{orientation}.jpg", photo(40, 60, 10 + orientation), orientation)
        good.add(f"mixed/orientation-{orientation}.jpg")
    keep("naïve café 北京 (1).jpg", photo(40, 60, 20))
    keep("space and 'quotes'.png", photo(40, 60, 21))
    save(folder / os.fsdecode(b"odd-\xff-bytes.jpg"), photo(40, 60, 22))  # not UTF-8: skipped with a warning

    def spoil(name: str, content: bytes) -> None:
        (folder / name).write_bytes(content)
        bad.add(f"mixed/{name}")

    spoil("empty.jpg", b"")
    whole = io.BytesIO()
    Image.fromarray(photo(60, 80, 30)).save(whole, "JPEG")
    spoil("truncated.jpg", whole.getvalue()[: len(whole.getvalue()) // 3])
    whole = io.BytesIO()
    Image.fromarray(photo(60, 80, 31)).save(whole, "PNG")
    spoil("truncated.png", whole.getvalue()[: len(whole.getvalue()) // 2])
    spoil("notes.jpg", b"just some text, not an image\n")
    spoil("error-page.jpg", b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>")
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    spoil("bomb.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
          + chunk(b"IEND", b""))
    (folder / "loop-a.jpg").symlink_to(folder / "loop-b.jpg")
    (folder / "loop-b.jpg").symlink_to(folder / "loop-a.jpg")
    bad |= {"mixed/loop-a.jpg", "mixed/loop-b.jpg"}
    if hasattr(os, "mkfifo"):  # opening a named pipe to read waits for a writer; reading /dev/zero never ends
        os.mkfifo(folder / "pipe.jpg")
        (folder / "zero.jpg").symlink_to("/dev/zero")
        bad |= {"mixed/pipe.jpg", "mixed/zero.jpg"}
    return root, good, bad
