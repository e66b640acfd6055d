"""Decoding: torchvision-exact resize and crop, EXIF orientation, every image mode, and damaged files."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torchvision import transforms

from pipeline.extract.decode import (
    MAX_PIXELS,
    TooManyPixels,
    decode_file,
    jpeg_draft_size,
    load_rgb,
    read_image_file,
    resize_center_crop,
)
from pipeline.models import Preprocessing
from tests.images import photo, save, with_orientation

RECIPE = Preprocessing(256, 224)


def torchvision_crop(image: Image.Image, recipe: Preprocessing) -> np.ndarray:
    pipeline = transforms.Compose([transforms.Resize(recipe.resize_size), transforms.CenterCrop(recipe.crop_size)])
    return np.asarray(pipeline(image))


@pytest.mark.parametrize("height,width", [(300, 400), (400, 300), (256, 256), (100, 150), (257, 999), (333, 221)])
@pytest.mark.parametrize("recipe", [RECIPE, Preprocessing(73, 64), Preprocessing(232, 224)])
def test_resize_and_crop_equal_torchvision_bit_for_bit(height, width, recipe):
    image = Image.fromarray(photo(height, width, seed=height + width))
    ours = resize_center_crop(image, recipe)
    assert ours.shape == (recipe.crop_size, recipe.crop_size, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, torchvision_crop(image, recipe))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    pixels = photo(40, 64)
    path = with_orientation(tmp_path / f"o{orientation}.jpg", pixels, orientation)
    decoded = load_rgb(path.read_bytes())
    with Image.open(path) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert decoded.size == expected.size == ((40, 64) if orientation >= 5 else (64, 40))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))


@pytest.mark.parametrize(
    "mode,suffix,options",
    [("L", ".png", {}), ("LA", ".png", {}), ("RGBA", ".png", {}), ("P", ".png", {"transparency": 0}),
     ("CMYK", ".jpg", {}), ("RGB", ".webp", {"lossless": True}), ("RGB", ".bmp", {}), ("RGB", ".tiff", {})],
)
def test_modes_and_formats_become_rgb_like_torchvision(tmp_path, mode, suffix, options):
    image = Image.fromarray(photo(50, 70)).convert(mode)
    path = tmp_path / f"image{suffix}"
    image.save(path, **options)
    decoded = decode_file(path, [Preprocessing(36, 32)])
    assert not decoded.error
    with Image.open(path) as reference:
        expected = torchvision_crop(reference.convert("RGB"), Preprocessing(36, 32))
    np.testing.assert_array_equal(decoded.crops[0], expected)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.full((40, 40), 32896, dtype=np.uint16)  # 128 * 257: mid grey in 16 bits
    values[:, :20] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
        assert np.asarray(opened.convert("RGB")).min() == 255  # what convert("RGB") alone does: all white
    rgb = np.asarray(load_rgb(path.read_bytes()))
    assert (rgb[:, :20] == 255).all() and (rgb[:, 20:] == 128).all()


def test_first_frame_of_an_animated_gif(tmp_path):
    frames = [Image.fromarray(np.full((30, 30, 3), value, np.uint8)) for value in (10, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert abs(int(np.asarray(load_rgb(path.read_bytes())).mean()) - 10) <= 2


def test_decode_file_hashes_and_makes_pixels(tmp_path):
    path = save(tmp_path / "a.png", photo(48, 64))
    decoded = decode_file(path, [RECIPE, Preprocessing(73, 64)])
    assert decoded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and not decoded.error
    assert [c.shape for c in decoded.crops] == [(224, 224, 3), (64, 64, 3)]
    assert decoded.pixels.shape == (3072,) and decoded.pixels.dtype == np.float32
    assert decoded.pixels.min() >= 0 and decoded.pixels.max() <= 1
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.Resize((32, 32))])
    thumbnail = np.asarray(reference(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(decoded.pixels, thumbnail.reshape(-1).astype(np.float32) / 255.0)
    alone = decode_file(path, [Preprocessing(73, 64)])  # without the standard crop at hand, the same pixels
    np.testing.assert_array_equal(alone.pixels, decoded.pixels)


def test_damaged_files_are_reasons_not_exceptions(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(photo(200, 200)).save(jpeg, "JPEG")
    cases = {
        "text.jpg": b"hello, I am not a JPEG",
        "html.jpg": b"<!DOCTYPE html><html><body>404</body></html>",
        "empty.png": b"",
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 3],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        decoded = decode_file(tmp_path / name, [RECIPE])
        assert decoded.error and decoded.crops == () and decoded.pixels is None, name
        assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    assert "not an image Pillow can decode" in decode_file(tmp_path / "text.jpg", [RECIPE]).error
    assert "truncated" in decode_file(tmp_path / "truncated.jpg", [RECIPE]).error
    missing = decode_file(tmp_path / "missing.jpg", [RECIPE])
    assert missing.error == "missing: no such file" and missing.sha256 == ""


def test_large_jpegs_decode_at_reduced_scale_within_parity(tmp_path):
    assert jpeg_draft_size((2560, 1920), 512) == (683, 512)
    assert jpeg_draft_size((1000, 900), 512) is None  # less than twice: decoded whole
    picture = np.asarray(Image.fromarray(photo(300, 400, seed=3)).resize((1600, 1200), Image.Resampling.BICUBIC))
    path = save(tmp_path / "big.jpg", picture, quality=90)
    assert load_rgb(path.read_bytes(), 2 * RECIPE.resize_size).size == (800, 600)  # 1/2 scale
    assert load_rgb(path.read_bytes()).size == (1600, 1200)
    reference = torchvision_crop(Image.open(path).convert("RGB"), RECIPE)  # torchvision's loader: full decode
    ours = decode_file(path, [RECIPE]).crops[0]
    difference = np.abs(ours.astype(int) - reference.astype(int))
    assert 0 < difference.mean() < 0.5 and difference.max() <= 12
    png = save(tmp_path / "big.png", picture)  # not a JPEG: no draft, bit for bit
    np.testing.assert_array_equal(decode_file(png, [RECIPE]).crops[0], torchvision_crop(Image.open(png), RECIPE))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, with only a sliver of data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def test_images_above_the_pixel_limit_are_too_large_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))
    result = decode_file(bomb, [RECIPE])
    assert result.error.startswith("too large") and result.sha256 == "" and not result.crops  # tried again next run
    strip = save(tmp_path / "strip.png", photo(10, 10000))
    dot = save(tmp_path / "dot.png", photo(1, 1))
    assert not decode_file(strip, [RECIPE]).error and not decode_file(dot, [RECIPE]).error
    small = save(tmp_path / "small.png", photo(100, 100))
    assert decode_file(small, [RECIPE], max_pixels=9_999).error == (
        "too large: 100x100 pixels, above the limit of 9,999 (--max-pixels)")
    assert not decode_file(small, [RECIPE], max_pixels=10_000).error


def test_files_larger_than_any_image_within_the_limit_are_not_read(tmp_path):
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as stream:
        stream.truncate(8 * MAX_PIXELS + 1)  # a sparse file: nothing is written, nothing should be read
    result = decode_file(sparse, [RECIPE], max_pixels=10_000)  # a lower pixel limit leaves the byte limit as is
    assert result.error == "too large: 715,827,881 bytes, more than an image within --max-pixels needs (715,827,880)"
    assert result.sha256 == ""  # tried again next run, under a higher limit
    small = save(tmp_path / "small.png", photo(20, 20))
    size = small.stat().st_size
    assert read_image_file(small, size) == small.read_bytes()
    with pytest.raises(TooManyPixels, match=f"{size:,} bytes"):
        read_image_file(small, size - 1)


def test_a_file_that_grew_after_stat_is_read_whole_within_the_bound(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    path.write_bytes(bytes(range(256)) * 40)
    real_stat = os.stat

    def stale_stat(target, *args, **kwargs):  # what stat said before the file grew to 10,240 bytes
        status = real_stat(target, *args, **kwargs)
        return os.stat_result((status.st_mode, *status[1:6], 100, *status[7:]))

    monkeypatch.setattr(os, "stat", stale_stat)  # what read_image_file calls
    assert read_image_file(path, 20_000) == path.read_bytes()
    with pytest.raises(TooManyPixels, match="more than 5,000 bytes"):
        read_image_file(path, 5_000)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_or_a_device_named_jpg_is_unreadable_without_blocking(tmp_path):
    (tmp_path / "pipe.jpg").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it to read would wait for a writer forever
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        {name: decode_file(tmp_path / name, [RECIPE]) for name in ("pipe.jpg", "zero.jpg")}), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "decoding a FIFO or a device blocked"
    assert results["pipe.jpg"].error.startswith("unreadable: not a regular file (mode p")
    assert results["zero.jpg"].error.startswith("unreadable: not a regular file (mode c")


def test_the_pixel_limit_counts_what_a_reduced_jpeg_decode_makes(tmp_path):
    large = save(tmp_path / "large.jpg", photo(1536, 2048), quality=90)  # decoded at 1/2 for 224 px: 1024x768
    assert not decode_file(large, [RECIPE], max_pixels=1024 * 768).error
    assert decode_file(large, [RECIPE], max_pixels=1024 * 768 - 1).error.startswith("too large: 2048x1536")


def _seed_images() -> list[bytes]:
    """Small valid files of every format decode reads, for the fuzzer to damage."""
    seeds = []
    picture = Image.fromarray(photo(24, 32, seed=5))
    for fmt, options in (("JPEG", {"quality": 80}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})):
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        seeds.append(buffer.getvalue())
    return seeds


SEED_IMAGES = _seed_images()
MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"BM", b"II*\0", b""]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged EXIF and TIFF; decode ignores them too
@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEED_IMAGES),
    cut=st.integers(min_value=0, max_value=4096),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=4095), st.integers(min_value=0, max_value=255)),
                   max_size=8),
    magic=st.sampled_from(MAGIC),
    noise=st.binary(max_size=512),
)
def test_damaged_bytes_never_raise_out_of_decoding(tmp_path_factory, seed, cut, flips, magic, noise):
    """Truncated, bit-flipped and made-up files of every format: a result or a reason, never an exception."""
    data = bytearray(seed[: max(cut, 1)] if cut < len(seed) else seed)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    path = tmp_path_factory.getbasetemp() / "fuzzed.bin"
    for content in (bytes(data), magic + noise):
        path.write_bytes(content)
        result = decode_file(path, [RECIPE, Preprocessing(73, 64)])
        assert isinstance(result.error, str)
        if not result.error:
            assert [c.shape for c in result.crops] == [(224, 224, 3), (64, 64, 3)] and result.pixels.shape == (3072,)
