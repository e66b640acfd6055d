"""``python -m pipeline.store``: look into a store, list its failures, check, convert or compact it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import UserError, command, counted, run_cli
from pipeline.store.embedding_store import EmbeddingStore

COMMANDS = ("info", "failures", "verify", "convert", "compact", "drop")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.store``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.store",
        description=(
            "info: the store's format, version and, per feature set, rows, failures, shards and deleted rows. "
            "failures SET: each file of SET that could not be decoded, and why (tab-separated). verify: check the "
            "size and sha256 of every shard. convert: convert a format-1 store to format 2 (any run that writes "
            "does it too). compact: rewrite small and partly deleted shards into full ones (commits do it by "
            "themselves past the thresholds in docs/store.md). drop SET: remove a feature set, so that the next "
            "extract computes it anew (the recovery from a lost shard)."
        ),
        epilog="Exit status: 0 when done; 2 for an error you can fix (no store, a missing or altered shard): one line.",
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("feature_set", nargs="?", help="for failures and drop: the feature set, e.g. resnet50")
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"),
                        help="the store's index file (default: features/embeddings.h5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command on the store and print what it found or did."""
    args = build_parser().parse_args(argv)
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
    elif args.command == "verify":
        print(f"{store.path}: {store.verify()} shards checked, each of the listed size and sha256.")
    else:
        with store.writer() as writer:  # converts a format-1 store on the way
            if args.command == "drop":
                writer.drop(args.feature_set)
            compaction = writer.compact() if args.command == "compact" else None
        if compaction:
            for name in compaction.rewritten:
                print(f"{name}: rewrote {compaction.rewritten[name]} shards as {compaction.written[name]}.")
        elif args.command == "compact":
            print(f"{store.path}: no shard needs rewriting.")
        print(_info(store))
    return 0


def _info(store: EmbeddingStore) -> str:
    attrs = store.root_attrs()
    index = store.index(arrays=False)
    lines = [f"{store.path}: format {attrs.get('format_version')}, version {index.version}, "
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
