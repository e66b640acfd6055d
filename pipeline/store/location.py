"""StoreLocation: where a store lives (its index file, the shards folder beside it, the earlier versions' indexes,
format 1's journal) and the indexes it holds; what its reader and its writer share."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import UserError
from pipeline.store.index import Index, open_store_file, read_index
from pipeline.store.legacy import legacy_index
from pipeline.store.spec import LEGACY_VERSION, RETENTION_SECONDS, duration_text

_AT_VERSION = re.compile(r"^(.+)@(\d+)$")


class StoreLocation:
    """A store's files: the index at ``path`` (the current version), its shards in ``<path>.shards/``, the indexes
    of earlier versions kept in ``<path>.versions/<version>.h5``, the neighbor indexes derived from it in
    ``<path>.neighbors/``, format 1's ``<path>.journal/``.

    Parameters
    ----------
    path : path-like
        The index file, e.g. ``features/embeddings.h5``; ``features/embeddings.h5@12`` names version 12.

    Raises
    ------
    UserError
        When ``path`` is a folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path, self.pinned = _split_version(Path(path))
        if self.path.is_dir():
            raise UserError(
                f"--cache {path} is a folder; name the store file, e.g. --cache {self.path / 'embeddings.h5'}."
            )
        self.shards = self.path.with_name(self.path.name + ".shards")
        self.versions = self.path.with_name(self.path.name + ".versions")
        self.neighbors_folder = self.path.with_name(self.path.name + ".neighbors")  # derived data, never the store's
        self.journal = self.path.with_name(self.path.name + ".journal")  # format 1's: converted by the first write

    def exists(self) -> bool:
        """True when the index file exists."""
        return self.path.exists()

    def current_index(self, arrays: bool = True) -> Index:
        """The current index (a format-1 file as one of one shard per set); an empty one when there is none."""
        if not self.exists():
            return Index.empty()
        return self._read(self.path, arrays)

    def version_index(self, version: int, arrays: bool = True) -> Index:
        """The index of ``version``: the current one, or an earlier one still kept.

        Raises
        ------
        UserError
            When the store never had that version, or no longer keeps it.
        """
        kept = self.version_file(version)
        if not kept.exists():  # the current version, or one gone
            current = self.current_index(arrays)
            if current.version == version:
                return current
            # superseded since: a version's file is made before the index that supersedes it
        try:
            return self._read(kept, arrays)
        except UserError:
            if kept.exists():
                raise
        current = self.current_index(arrays=False)
        if version > current.version:
            raise UserError(f"{self.path} has no version {version} (its current version is {current.version}).")
        raise UserError(
            f"{self.path} no longer keeps version {version}: versions are kept {duration_text(RETENTION_SECONDS)} "
            f"after they are superseded (and always the previous one); {self.kept_text()}"
        ) from None

    def version_file(self, version: int) -> Path:
        """Where the index of an earlier ``version`` is kept."""
        return self.versions / f"{version:08d}.h5"

    def kept_versions(self) -> list[int]:
        """The earlier versions whose indexes are kept, oldest first."""
        if not self.versions.is_dir():
            return []
        return sorted(int(p.stem) for p in self.versions.glob("*.h5") if p.stem.isdigit())

    def kept_text(self) -> str:
        """Which versions can be read, in words."""
        kept = self.kept_versions()
        current = self.current_index(arrays=False).version
        earlier = f"versions {kept[0]} to {kept[-1]} and " if kept else ""
        return f"it keeps {earlier}the current version {current} (transfer store versions lists them)."

    @staticmethod
    def _read(path: Path, arrays: bool) -> Index:
        with open_store_file(path) as store:
            if store.attrs["format_version"] == LEGACY_VERSION:
                return legacy_index(store, path)
            return read_index(store, arrays)


def _split_version(path: Path) -> tuple[Path, int | None]:
    """``PATH@N`` as ``(PATH, N)`` (unless a file is named so); any other path with no version."""
    match = _AT_VERSION.match(str(path))
    if match is None or path.exists():
        return path, None
    return Path(match[1]), int(match[2])
