"""Find the images of a dataset (class folders, split folders, a flat folder or a CSV) and their labels."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import UserError
from pipeline.store.spec import ImageRecord

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}


@dataclass(frozen=True)
class Dataset:
    """The images found under ``root``, sorted by path, and how they were laid out."""

    root: Path
    layout: str  # "classes", "splits", "flat" or "csv"
    records: tuple[ImageRecord, ...]

    @property
    def classes(self) -> list[str]:
        """Sorted class names present in the dataset."""
        return sorted({r.label for r in self.records if r.label is not None})

    def absolute(self, record: ImageRecord) -> Path:
        """The file a record points to."""
        return self.root / record.path


def discover(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Dataset:
    """Find the images of a dataset folder or CSV manifest.

    Layouts, detected in this order:

    - a CSV file ``path,label[,split]`` (header optional; paths absolute, or relative to ``root``, else to
      the CSV's folder); its dataset root is ``root``, else the CSV's folder when it holds every listed
      file, else the deepest folder that does;
    - split folders ``DATA/{train,validation|val,test}/<class>/**/<image>``;
    - class folders ``DATA/<class>/**/<image>``;
    - a flat folder of unlabelled images (images directly in ``DATA`` are unlabelled in any layout).

    Hidden files and folders and files without an image extension are ignored. A CSV may list files that
    do not exist: they are kept, and extract records them as missing.

    Raises
    ------
    UserError
        If ``source`` does not exist, or holds no images; ``root`` for a folder, or a CSV path outside it.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise UserError(f"{source} does not exist; pass an image folder or a CSV manifest (path,label[,split]).")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise UserError(f"{source} is a file, not a folder; pass an image folder or a .csv manifest "
                            "(path,label[,split]).")
        try:
            dataset = _from_csv(source, Path(root).expanduser().resolve() if root else None)
        except (UnicodeDecodeError, csv.Error) as error:
            raise UserError(
                f"{source} is not a readable UTF-8 CSV file ({error}); expected lines path,label[,split]."
            ) from None
    elif root is not None:
        raise UserError(f"--root is for a CSV manifest; {source} is a folder, which is its own root.")
    else:
        dataset = _from_folder(source.resolve())
    if not dataset.records:
        raise UserError(
            f"no images found in {source}; expected {', '.join(sorted(IMAGE_EXTENSIONS))} files "
            "in class folders, split folders or directly in the folder."
        )
    return dataset


def _from_folder(root: Path) -> Dataset:
    splits = {entry: SPLIT_NAMES[entry.lower()] for entry in _subfolders(root) if entry.lower() in SPLIT_NAMES}
    records: list[ImageRecord] = []
    if splits:
        for folder, split in splits.items():
            records += [ImageRecord(path, label, split) for path, label in _labelled_images(root, folder)]
        records += [ImageRecord(p, None, "") for p, _ in _labelled_images(root, "") if "/" not in p]
        layout = "splits"
    else:
        records = [ImageRecord(path, label) for path, label in _labelled_images(root, "")]
        layout = "classes" if any(r.label is not None for r in records) else "flat"
    return Dataset(root, layout, tuple(sorted(_utf8_named(records, root), key=lambda r: r.path)))


def _utf8_named(records: list[ImageRecord], root: Path) -> list[ImageRecord]:
    """The records whose paths are valid UTF-8 (what the store keeps); warns once about the others."""
    kept = [r for r in records if _is_utf8(r.path)]
    if len(kept) < len(records):
        first = next(r.path for r in records if not _is_utf8(r.path))
        logger.warning(
            f"skipped {len(records) - len(kept)} file(s) in {root} whose names are not valid UTF-8 (first: "
            f"{ascii(first)}); the store keeps paths as UTF-8 text: rename them to include them."
        )
    return kept


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")  # a name of undecodable bytes holds surrogates, which UTF-8 cannot encode
    except UnicodeEncodeError:
        return False
    return True


def _subfolders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))


def _labelled_images(root: Path, prefix: str) -> list[tuple[str, str | None]]:
    """Images under ``root/prefix``, labelled by their first folder below it (None for files directly in it)."""
    base = root / prefix
    found = []
    for folder, dirs, files in os.walk(base):  # followlinks=False: no symlink loops
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        relative = PurePosixPath(Path(folder).relative_to(base).as_posix())
        for name in sorted(files):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            parts = relative.parts if relative.parts != (".",) else ()
            label = parts[0] if parts else None
            path = PurePosixPath(prefix, *parts, name).as_posix() if prefix else PurePosixPath(*parts, name).as_posix()
            found.append((path, label))
    return found


def _from_csv(path: Path, root: Path | None) -> Dataset:
    base = root or path.resolve().parent  # what relative paths are relative to
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as stream:
        for number, row in enumerate(csv.reader(stream), start=1):
            if not row or not row[0].strip() or (number == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) > 3:
                raise UserError(f"{path} line {number} has {len(row)} fields; expected path,label[,split].")
            image = Path(row[0].strip()).expanduser()
            image = Path(os.path.normpath(image if image.is_absolute() else base / image))
            label = row[1].strip() if len(row) > 1 and row[1].strip() else None
            split_text = row[2].strip().lower() if len(row) > 2 else ""
            if split_text and split_text not in SPLIT_NAMES:
                raise UserError(f"{path} line {number}: split {row[2]!r} is not one of train, validation, test.")
            rows.append((number, image, label, SPLIT_NAMES.get(split_text, "")))
    if root is None and rows:  # the CSV's folder, as ever, or the deepest folder holding every listed file
        common = Path(os.path.commonpath([str(image.parent) for _, image, _, _ in rows]))
        root = base if common.is_relative_to(base) else common
    records, seen = [], set()
    for number, image, label, split in rows:
        try:
            relative = image.relative_to(root).as_posix()
        except ValueError:
            raise UserError(f"{path} line {number}: {image} is outside --root {root}; give a --root that holds "
                            "every listed file, or leave --root out.") from None
        if relative in seen:
            raise UserError(f"{path} line {number}: {relative} is listed twice; keep one line per image.")
        seen.add(relative)
        records.append(ImageRecord(relative, label, split))
    return Dataset(root or base, "csv", tuple(sorted(records, key=lambda r: r.path)))
