"""Duplicates as the report shows them: ``duplicates.csv``, a page section of thumbnails, and ``transfer duplicates``,
which writes both for a whole store without fitting anything."""

from __future__ import annotations

import argparse
import csv
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, counted, run_cli
from pipeline.files import atomic_path
from pipeline.models.registry import feature_set_order
from pipeline.report.page import STYLE, Thumbnails, captions_of, duplicates_section
from pipeline.store import PIXELS, EmbeddingStore
from pipeline.store.duplicates import Duplicates, find_duplicates

CSV_COLUMNS = ["group", "path", "label", "split", "similarity", "exact"]
PAGE_GROUPS = 50  # groups shown with thumbnails; every one is in the CSV
UNTRAINED_NOTE = ("its model has UNTRAINED random weights: near duplicates by its features mean little (the sha256 "
                  "matches still hold); extract with pretrained weights, or search the pixels set")


def write_duplicates_csv(path: Path, group: np.ndarray, paths: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                         similarity: np.ndarray, exact: np.ndarray) -> None:
    """One row per image that has a copy, grouped, largest group first (see :class:`DuplicateGroups`)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(CSV_COLUMNS)
        for row in zip(group, paths, labels, splits, similarity, exact):
            writer.writerow([int(row[0]), row[1], row[2], row[3], f"{float(row[4]):.4f}", int(bool(row[5]))])


def search_rule(found: Duplicates) -> str:
    """How the groups were found, in words (plain text)."""
    recall = ""
    if found.recall_pairs:
        recall = f"; its measured recall {found.recall:.3f} ({counted(found.recall_pairs, 'pair')} of a seeded sample)"
    elif found.recall != found.recall:
        recall = "; its recall could not be measured: the seeded sample met no pair"
    text = (f"Same file by sha256, or near duplicates of {found.name}: cosine similarity of embeddings centred on the "
            f"set's mean and L2-normalised at or above {found.threshold:.2f}, by an {found.method} search over "
            f"all {found.rows} stored images{recall}. Members of a group are linked by a chain of such pairs.")
    return text


def write_duplicates(found: Duplicates, out: Path, groups: int = PAGE_GROUPS) -> tuple[Path, Path]:
    """``duplicates.csv`` and ``duplicates.html`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    members = found.groups
    write_duplicates_csv(out / "duplicates.csv", members.group, found.paths, found.labels, found.splits,
                         members.similarity, members.exact)
    thumbs = Thumbnails(Path(found.root), limit=12 * groups)
    section = duplicates_section(members.group, found.paths, captions_of(found.labels, found.splits,
                                 members.similarity, members.exact), thumbs, groups,
                                 f"<p>{html.escape(search_rule(found))} All of them are in duplicates.csv beside this "
                                 "page.</p>")
    warning = (f'<p class="warn">{html.escape(found.name)}: {html.escape(UNTRAINED_NOTE)}.</p>' if found.untrained
               else "")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Duplicates</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>Duplicates in {html.escape(found.name)}</h1>{warning}"
            f"<p>{found.rows} images of <code>{html.escape(found.root)}</code>.</p>{section}\n</body></html>\n")
    with atomic_path(out / "duplicates.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "duplicates.html", out / "duplicates.csv"


def default_set(store: EmbeddingStore) -> str:
    """The feature set ``transfer duplicates`` searches when none is named: the first backbone with trained weights,
    else the first backbone, else the pixels."""
    names = sorted((n for n in store.feature_sets() if n != PIXELS), key=feature_set_order)
    trained = [n for n in names if not store.load_attrs(n).get("untrained")]
    return (trained or names or [PIXELS])[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer duplicates",
        description="Find groups of the same or nearly the same image across a whole store (exact by sha256, near by "
                    "the neighbor index of one feature set); write duplicates.html and duplicates.csv. Fits nothing.",
        epilog="Exit status: 0 when written; 2 for an error you can fix (no store, no such set): one line.",
    )
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"),
                        help="the HDF5 store, or PATH@N for one of its versions (default: features/embeddings.h5)")
    parser.add_argument("--set", dest="feature_set", metavar="NAME",
                        help="the feature set whose embeddings are searched (default: the first backbone with "
                        "trained weights, else pixels)")
    parser.add_argument("--threshold", type=float,
                        help="cosine similarity at or above which two images are near duplicates (default: 0.99 for "
                        "pixels, 0.95 for a backbone's embeddings)")
    parser.add_argument("--out", type=Path,
                        help="where duplicates.html and duplicates.csv go (default: <store>-duplicates/ beside it)")
    parser.add_argument("--groups", type=int, default=PAGE_GROUPS,
                        help=f"groups shown with thumbnails on the page (default: {PAGE_GROUPS}; the CSV has all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Search, write the page and CSV, and say what was found and where."""
    args = build_parser().parse_args(argv)
    if args.threshold is not None and not -1 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold} must be a cosine similarity, between -1 and 1.")
    if args.groups < 0:
        raise UserError(f"--groups {args.groups} must be at least 0.")
    store = EmbeddingStore(args.cache).snapshot()
    name = args.feature_set or default_set(store)
    found = find_duplicates(store, name, args.threshold, progress=True)
    out = args.out or store.path.with_name(f"{store.path.stem}-duplicates")
    page, table = write_duplicates(found, out, args.groups)
    groups = found.groups
    print(f"{counted(groups.count, 'group')} of duplicates ({counted(groups.images(), 'image')}, "
          f"{int(groups.exact.sum())} the same file as another) among {found.rows} images of {name}: "
          f"{search_rule(found)}")
    if found.untrained:
        print(f"warning: {name}: {UNTRAINED_NOTE}.")
    print(f"page: {page} (open it in a browser); every image: {table}")
    return 0


if __name__ == "__main__":
    run_cli(main)
