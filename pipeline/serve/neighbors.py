"""``transfer neighbors QUERY``: the stored images most like each query image, through the set's neighbor index.

Queries (an image, a folder or a CSV) are embedded with the feature set's own model, or their stored embeddings
reused by content hash, then searched with :meth:`EmbeddingStore.neighbors`; the rows go to a table, CSV, JSONL,
or an HTML page of thumbnails.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from pipeline.errors import UserError, command, counted, run_cli
from pipeline.extract.decode import MAX_PIXELS, batches
from pipeline.extract.discover import IMAGE_EXTENSIONS, discover
from pipeline.files import atomic_path
from pipeline.models import BackboneSession, ModelRepository
from pipeline.models.session import DEVICES
from pipeline.options import AtLeast, OneOf, Options, Suffix
from pipeline.report.duplicates import default_set
from pipeline.report.page import STYLE, Thumbnails
from pipeline.serve.embedder import Embedded, embed_files
from pipeline.store import PIXELS, EmbeddingStore, FeatureSet, NeighborIndex, Neighbors

OUTPUT_FORMATS = (".csv", ".jsonl", ".html")
COLUMNS = ["query", "rank", "path", "similarity", "label", "split", "error"]
UNTRAINED_NOTE = "its model has UNTRAINED random weights: the neighbors of untrained features mean little"


@dataclass(frozen=True)
class NeighborsOptions(Options):
    """How :func:`run_neighbors` searches: ``transfer neighbors``'s options, one field each.

    Attributes
    ----------
    cache : path-like
        The store (``PATH@N`` for a version).
    feature_set : str, optional
        The set searched (default: the first backbone with trained weights, else pixels).
    k : int
        Stored images per query, most similar first.
    output : path-like, optional
        ``.csv``, ``.jsonl`` or ``.html`` (default: a table on stdout).
    models_dir : path-like
        The exported models (the set's own embeds the queries).
    device : {"auto", "cuda", "cpu"}
    batch_size, workers : int, optional
        Images per inference batch, decoding threads.
    max_pixels : int
        Queries that would decode to more pixels get a "too large" error row.
    progress : bool, optional
        Draw a progress bar (default: when stderr is a terminal).
    """

    cache: Path = Path("features/embeddings.h5")
    feature_set: str | None = None
    k: int = 10
    output: Path | None = None
    models_dir: Path = Path("models")
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    max_pixels: int = MAX_PIXELS
    progress: bool | None = None

    constraints: ClassVar = {
        "k": [AtLeast(1)],
        "output": [None, Suffix(OUTPUT_FORMATS)],
        "device": [OneOf(DEVICES)],
        "batch_size": [None, AtLeast(1)],
        "workers": [None, AtLeast(1)],
        "max_pixels": [AtLeast(1)],
    }
    flags: ClassVar = {"k": "-k", "feature_set": "--set"}


@dataclass(frozen=True)
class NeighborRow:
    """One stored image found for one query (or the query's error, with rank 0)."""

    query: str
    rank: int
    path: str = ""
    similarity: float = float("nan")
    label: str = ""
    split: str = ""
    error: str = ""


def query_files(query: str | os.PathLike) -> list[str]:
    """The image files of ``query``: one image, or the images of a folder (joined to the folder as given) or of a
    CSV (absolute), in any layout extract accepts."""
    path = Path(query).expanduser()
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [str(path)]
    dataset = discover(path)
    if dataset.layout == "csv":
        return [str(dataset.absolute(record)) for record in dataset.records]
    return [os.path.join(os.fspath(query), record.path) for record in dataset.records]  # as classify shows them


def open_set_model(store: EmbeddingStore, name: str, options: NeighborsOptions) -> BackboneSession | None:
    """The model that computed feature set ``name`` (None for the pixels), checked to be that very file.

    Raises
    ------
    UserError
        When the exported model is missing or is not the file the set was computed with.
    """
    attrs = store.load_attrs(name)
    if name == PIXELS:
        return None
    exported = ModelRepository(options.models_dir).load(attrs.get("model", name), attrs.get("precision", "fp32"))
    if exported.fingerprint != attrs.get("fingerprint"):
        raise UserError(
            f"{exported.onnx_path} is not the model {store.described}'s {name} embeddings were computed with (its "
            f"sha256 differs); pass the --models-dir that holds it, or embed the store again with this one: "
            f"{command('extract')} DATA --models {attrs.get('model', name)} --overwrite --cache {store.path}."
        )
    return exported.open(options.device)


def run_neighbors(query: str | os.PathLike, options: NeighborsOptions | None = None,
                  **settings: Any) -> dict[str, Any]:
    """Find the stored images nearest to each image of ``query`` and write the rows to ``options.output`` (or
    print them).

    Parameters
    ----------
    query : path-like
        An image file, an image folder or a CSV manifest.
    options : NeighborsOptions, optional
    **settings
        Or some of :class:`NeighborsOptions`' fields by name (``k=5, output=...``).

    Returns
    -------
    dict
        ``queries``, ``unreadable``, ``cached`` (queries whose embeddings came from the store), ``set``,
        ``untrained``, ``exact`` and ``version``.
    """
    options = NeighborsOptions.of(options, settings)
    store = EmbeddingStore(options.cache).snapshot()
    name = options.feature_set or default_set(store)
    attrs = store.load_attrs(name)
    files = query_files(query)
    session = open_set_model(store, name, options)
    known = store.lookup(name, str(attrs.get("fingerprint", "")))
    batch_size = options.batch_size or (session.default_batch_size if session else 64)
    embedded = embed_files(files, session, known, batch_size, options.workers, options.progress, options.max_pixels)
    index = store.neighbor_index(name, options.progress)  # loaded once, searched a batch at a time
    stored = store.load(name, embeddings=False)
    counts = {"queries": len(files), "unreadable": 0, "cached": 0, "set": name,
              "untrained": bool(attrs.get("untrained")), "version": store.pinned, "exact": index.exact}
    rows = list(_search(index, stored, embedded, options.k, batch_size, counts))
    write_rows(rows, options.output, store, name, counts)
    return counts


def _search(index: NeighborIndex, stored: FeatureSet, embedded: Iterator[Embedded], k: int, batch_size: int,
            counts: dict[str, Any]) -> Iterator[NeighborRow]:
    for batch in batches(embedded, max(batch_size, 256)):
        good = [item for item in batch if item.features is not None]
        found = Neighbors.of(stored, *index.search(np.stack([item.features for item in good]), k), index.exact) \
            if good else None
        position = 0
        for item in batch:
            if item.features is None:
                counts["unreadable"] += 1
                yield NeighborRow(item.path, 0, error=item.error)
                continue
            counts["cached"] += item.cached
            for rank in range(k):
                if found.rows[position, rank] >= 0:
                    yield NeighborRow(item.path, rank + 1, str(found.paths[position, rank]),
                                      round(float(found.similarity[position, rank]), 6),
                                      str(found.labels[position, rank]), str(found.splits[position, rank]))
            position += 1


def write_rows(rows: list[NeighborRow], output: Path | None, store: EmbeddingStore, name: str,
               counts: dict[str, Any]) -> None:
    """The rows as a table on stdout, or a ``.csv``, ``.jsonl`` or ``.html`` file (written whole or not at all)."""
    if output is None:
        _table(rows, sys.stdout)
        return
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as stream:
        if output.suffix == ".csv":
            writer = csv.writer(stream)
            writer.writerow(COLUMNS)
            writer.writerows([[getattr(row, c) if c != "similarity" or row.error == "" else "" for c in COLUMNS]
                              for row in rows])
        elif output.suffix == ".jsonl":
            for row in rows:
                record = {c: getattr(row, c) for c in COLUMNS}
                if row.error:
                    record["similarity"] = None
                stream.write(json.dumps(record) + "\n")
        else:
            stream.write(_page(rows, store, name, counts))


def _table(rows: list[NeighborRow], stream: TextIO) -> None:
    cells = [COLUMNS[:-1]] + [[row.query, str(row.rank), row.path, f"{row.similarity:.4f}", row.label, row.split]
                              if not row.error else [row.query, "-", f"error: {row.error}", "", "", ""] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    for line in cells:
        stream.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n")


def _page(rows: list[NeighborRow], store: EmbeddingStore, name: str, counts: dict[str, Any]) -> str:
    root = str(store.load(name, embeddings=False).root)
    stored, queries = Thumbnails(Path(root), limit=2000), Thumbnails(Path("/"), limit=500)
    blocks, current, pictures = [], None, []

    def close() -> None:
        if current is not None:
            blocks.append(f'<div class="cell"><h3>{html.escape(current.query)}</h3><div class="thumbs">'
                          f'{"".join(pictures)}</div></div>')

    for row in rows:
        if current is None or row.query != current.query:
            close()
            current = row
            pictures = [queries(str(Path(row.query).resolve()), "query")]
        if row.error:
            pictures.append(f'<p class="none">cannot be decoded: {html.escape(row.error)}</p>')
        else:
            pictures.append(stored(row.path, f"{row.rank}. {row.similarity:.3f} {row.label} {row.split}".strip()))
    close()
    warning = f'<p class="warn">{html.escape(name)}: {html.escape(UNTRAINED_NOTE)}.</p>' if counts["untrained"] else ""
    search = "exact" if counts["exact"] else "approximate (FAISS IVF, SQ8)"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Neighbors</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>Nearest stored images ({html.escape(name)})</h1>{warning}"
            f"<p>Store <code>{html.escape(store.described)}</code>; cosine similarity of embeddings centred on the "
            f"set's mean and L2-normalised, {search} search of its neighbor index.</p>{''.join(blocks)}"
            "\n</body></html>\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer neighbors",
        description="The k stored images most similar to each query image, with their similarity, label and split.",
        epilog="Exit status: 0 when every query was searched; 1 when some could not be decoded (their rows hold the "
               "error); 2 for an error you can fix (no store, no such set, no exported model): one line.",
    )
    parser.add_argument("query", help="an image file, an image folder or a CSV manifest")
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"),
                        help="the HDF5 store, or PATH@N for one of its versions (default: features/embeddings.h5)")
    parser.add_argument("--set", dest="feature_set", metavar="NAME",
                        help="the feature set searched (default: the first backbone with trained weights, else pixels)")
    parser.add_argument("-k", type=int, default=10, help="stored images per query, most similar first (default: 10)")
    parser.add_argument("--output", type=Path,
                        help="write rows to a .csv or .jsonl file, or an .html page of thumbnails (default: a table)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="exported models (default: models/)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when usable, else CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="images per inference batch")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: available cores)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Search, then say on stderr how many queries, which set and search, and where the rows are."""
    args = build_parser().parse_args(argv)
    options = NeighborsOptions(cache=args.cache, feature_set=args.feature_set, k=args.k, output=args.output,
                               models_dir=args.models_dir, device=args.device, batch_size=args.batch_size,
                               workers=args.workers)
    counts = run_neighbors(args.query, options)
    where = f" into {args.output}" if args.output else ""
    search = "exact" if counts["exact"] else "approximate"
    print(f"searched {counts['queries'] - counts['unreadable']} of {counted(counts['queries'], 'query image')} in "
          f"{counts['set']} ({search} search; {counted(counts['cached'], 'embedding')} reused from the store){where}.",
          file=sys.stderr)
    if counts["untrained"]:
        print(f"warning: {counts['set']}: {UNTRAINED_NOTE}.", file=sys.stderr)
    if counts["unreadable"]:
        print(f"{counted(counts['unreadable'], 'file')} could not be decoded; their rows hold the reason.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
