"""StoreLocation: where a store lives (its index file, the shards folder beside it, format 1's journal) and the
index it holds now; what its reader and its writer share."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.store.index import Index, open_store_file, read_index
from pipeline.store.legacy import legacy_index
from pipeline.store.spec import LEGACY_VERSION


class StoreLocation:
    """A store's files: the index at ``path``, its shards in ``<path>.shards/``, format 1's ``<path>.journal/``.

    Parameters
    ----------
    path : path-like
        The index file, e.g. ``features/embeddings.h5``.

    Raises
    ------
    UserError
        When ``path`` is a folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(
                f"--cache {path} is a folder; name the store file, e.g. --cache {self.path / 'embeddings.h5'}."
            )
        self.shards = self.path.with_name(self.path.name + ".shards")
        self.journal = self.path.with_name(self.path.name + ".journal")  # format 1's: converted by the first write

    def exists(self) -> bool:
        """True when the index file exists."""
        return self.path.exists()

    def index(self, arrays: bool = True) -> Index:
        """The current index (a format-1 file as one of one shard per set); an empty one when there is none."""
        if not self.exists():
            return Index.empty()
        with open_store_file(self.path) as store:
            if store.attrs["format_version"] == LEGACY_VERSION:
                return legacy_index(store, self.path)
            return read_index(store, arrays)
