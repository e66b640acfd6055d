"""``python -m pipeline.store``: look into a store, list its failures, check, convert or compact it."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import UserError, command, counted, run_cli
from pipeline.store.embedding_store import EmbeddingStore
from pipeline.store.export import EXPORT_FORMATS, export_set
from pipeline.store.spec import RETENTION_SECONDS, duration_text, parse_duration

COMMANDS = ("info", "failures", "verify", "versions", "cleanup", "export", "convert", "compact", "drop")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.store``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.store",
        description=(
            "info: the store's format, version and, per feature set, rows, failures, shards and deleted rows. "
            "failures SET: each file of SET that could not be decoded, and why (tab-separated). verify: check the "
            "size and sha256 of every shard. versions: the versions kept (when, which run, rows per set, rows "
            "added and deleted); any of them can be read as --cache PATH@N. cleanup: remove the versions "
            "superseded more than --older-than ago (never the previous one), and the shards only they list "
            "(every writer does it with the default retention). export [CACHE] --set SET --format FORMAT --out "
            "FILE: one flat file of SET's live rows (path, label, split, sha256, embedding), written a block at "
            "a time. convert: convert a format-1 store to format 2 (any run that writes does it too). compact: "
            "rewrite small and partly deleted shards into full ones (commits do it by themselves past the "
            "thresholds in docs/store.md). drop SET: remove a feature set, so that the next extract computes it "
            "anew (the recovery from a lost shard)."
        ),
        epilog="Exit status: 0 when done; 2 for an error you can fix (no store, a missing or altered shard): one line.",
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("feature_set", nargs="?",
                        help="for failures and drop: the feature set, e.g. resnet50; for export: the store "
                        "(or --cache)")
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"),
                        help="the store's index file, or PATH@N for its version N (default: features/embeddings.h5)")
    parser.add_argument("--older-than", type=_duration, default=RETENTION_SECONDS, metavar="DURATION",
                        help=f"for cleanup: how long superseded versions are kept, e.g. 30m, 24h, 7d, 0 "
                        f"(default: {duration_text(RETENTION_SECONDS)})")
    parser.add_argument("--set", dest="export_set", metavar="SET", help="for export: the feature set to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="parquet",
                        help="for export: parquet (pandas, polars, DuckDB, Lance; needs pip install -e '.[parquet]'), "
                        "hdf5 or npz (default: parquet)")
    parser.add_argument("--out", type=Path, help="for export: the file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command on the store and print what it found or did."""
    args = build_parser().parse_args(argv)
    if args.command == "export":
        return export(args)
    store = EmbeddingStore(args.cache)
    if not store.exists():
        pending = _pending(store)
        if pending and args.command == "info":
            print(pending)
            return 0
        raise UserError(pending or f"no embedding store at {args.cache}; run extract first (make extract DATA=...).")
    if args.command in ("failures", "drop") and not args.feature_set:
        raise UserError(f"say which feature set: {command('store')} {args.command} SET (one of: {_sets(store)}).")
    if args.command == "failures":
        failures = store.failures(args.feature_set)
        for path, reason in zip(failures.paths, failures.reasons):
            print(f"{path}\t{reason}")
        return 0
    if args.command == "info":
        print(_info(store))
    elif args.command == "versions":
        print(_versions(store))
    elif args.command == "verify":
        print(f"{store.path}: {store.verify()} shards checked, each of the listed size and sha256.")
    else:
        with store.writer() as writer:  # converts a format-1 store on the way
            if args.command == "drop":
                writer.drop(args.feature_set)
            if args.command == "cleanup":
                removed = writer.cleanup(args.older_than)
                print(f"{store.path}: removed {counted(len(removed), 'version')} superseded more than "
                      f"{duration_text(args.older_than)} ago{' (' + _few(removed) + ')' if removed else ''}; "
                      f"{store.kept_text()}")
                return 0
            compaction = writer.compact() if args.command == "compact" else None
        if compaction:
            for name in compaction.rewritten:
                print(f"{name}: rewrote {compaction.rewritten[name]} shards as {compaction.written[name]}.")
        elif args.command == "compact":
            print(f"{store.path}: no shard needs rewriting.")
        print(_info(store))
    return 0


def export(args: argparse.Namespace) -> int:
    """``store export``: a feature set's live rows as one flat file."""
    store = EmbeddingStore(args.feature_set or args.cache)
    if not args.export_set or not args.out:
        sets = _sets(store) if store.exists() else "none"
        raise UserError(f"say which set and where: {command('store')} export {store.described} --set SET --format "
                        f"{args.format} --out FILE (SET one of: {sets}).")
    if not store.exists():
        raise UserError(f"no embedding store at {store.described}; run extract first (make extract DATA=...).")
    started = time.perf_counter()
    rows = export_set(store, args.export_set, args.out, args.format)
    print(f"{args.out}: {counted(rows, 'row')} of {args.export_set} from {store.described} "
          f"({args.out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s).")
    return 0


def _info(store: EmbeddingStore) -> str:
    attrs = store.root_attrs()
    index = store.index(arrays=False)
    lines = [f"{store.described}: format {attrs.get('format_version')}, version {index.version}, "
             f"dataset {index.dataset_root}"]
    for name, set_index in sorted(index.sets.items()):
        rows, failures = set_index.counts()
        size = sum(entry.bytes for entry in set_index.shards)
        lines.append(
            f"  {name}: {counted(rows, 'row')}, {failures} failed, {counted(len(set_index.shards), 'shard')} "
            f"({size / 2**20:.1f} MiB), "
            f"{len(set_index.deleted) + len(set_index.deleted_failures)} deleted rows not yet compacted"
        )
    return "\n".join(lines)


def _versions(store: EmbeddingStore) -> str:
    """A line per kept version, oldest first: when, which run, rows per set, what the commit changed."""
    lines = []
    current = store.current_index(arrays=False)
    for version in [*store.kept_versions(), current.version]:
        index = current if version == current.version else store.version_index(version, arrays=False)
        rows = ", ".join(f"{name} {s.counts()[0]}" for name, s in sorted(index.sets.items())) or "no sets"
        lines.append(f"{version:>6}  {index.committed or 'before history was kept':25}  run {index.run or '-':16}  "
                     f"{rows}; {_changes(index.changes)}" + ("  (current)" if version == current.version else ""))
    return "\n".join([f"{store.path}: {counted(len(lines), 'version')} kept", *lines])


def _changes(changes: dict[str, dict[str, int]]) -> str:
    """What a commit changed, in words: ``resnet50 +120 -3, pixels +120`` or ``resnet50 compacted``."""
    if not changes:
        return "changes not recorded"
    words = []
    for name, change in sorted(changes.items()):
        if change.get("compacted"):
            words.append(f"{name} compacted ({counted(change['compacted'], 'shard')})")
        elif change.get("added") or change.get("deleted"):
            words.append(f"{name} +{change.get('added', 0)} -{change.get('deleted', 0)}")
    return ", ".join(words) or "no rows changed"


def _duration(text: str) -> float:
    """argparse's type for --older-than."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _few(numbers: Sequence[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")


def _pending(store: EmbeddingStore) -> str:
    """What an interrupted first run left, in a sentence (``""`` when nothing)."""
    counts = store.pending_sets() if store.shards.is_dir() else {}
    if not counts:
        return ""
    shards = sum(counts.values())
    per_set = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
    roots = " or ".join(sorted(store.pending_roots()))
    return (f"{store.path} has no committed version yet: an interrupted run left {counted(shards, 'shard')} of results "
            f"in {store.shards} ({per_set}); run extract on {roots} again to commit them (nothing is computed twice).")



def _sets(store: EmbeddingStore) -> str:
    return ", ".join(store.feature_sets()) or "none"


if __name__ == "__main__":
    run_cli(main)
