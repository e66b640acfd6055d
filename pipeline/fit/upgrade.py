"""``transfer bundles FOLDER``: rewrite the joblib bundles an earlier version fitted as skops files, once.

A joblib bundle runs the code it holds when it is loaded, so it is read here only because the user names the
folder of bundles they made; the skops file written beside it loads without running anything, and the
``report.json`` of the folder then lists it instead (the joblib file is left where it is).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import write_json_atomic
from pipeline.fit.bundle import BUNDLE_SUFFIX, LEGACY_SUFFIX, ClassifierBundle


def upgrade_bundles(folder: Path) -> list[Path]:
    """Rewrite every joblib bundle that ``folder``'s report.json lists as a skops file; returns the new files.

    Raises
    ------
    UserError
        When the folder has no report.json of fit's.
    """
    report_path = folder / "report.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        entries = report["bundles"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"no report.json of fit's in {folder}; name the folder fit wrote the bundles to.") from None
    written = []
    for entry in entries:
        source = folder / entry["path"]
        if source.suffix != LEGACY_SUFFIX or not source.is_file():
            continue
        bundle = ClassifierBundle.load(source, trust=True)
        target = source.with_suffix(BUNDLE_SUFFIX)
        entry["sha256"] = bundle.save(target)
        entry["path"] = target.name
        written.append(target)
    write_json_atomic(report_path, report)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``transfer bundles``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.fit.upgrade",
        description="Rewrite the joblib bundles an earlier version of fit wrote into FOLDER as skops files, which load "
        "without running any code; FOLDER's report.json then lists those. Run it on bundles you made: loading a joblib "
        "file runs the code inside it.",
    )
    parser.add_argument("folder", type=Path, help="fit's output folder (models/classifiers/<store name>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the bundles and list them."""
    args = build_parser().parse_args(argv)
    written = upgrade_bundles(args.folder)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} bundle{'s' if len(written) != 1 else ''} rewritten as skops files in {args.folder}.")
    return 0


if __name__ == "__main__":
    from pipeline.errors import run_cli

    run_cli(main)
