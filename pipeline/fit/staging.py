"""fit's output folder: a run writes into a staging folder and publishes it whole, report last; an unchanged
run's report is reused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.files import sha256_file

STAGING = ".fit-in-progress"
LOCK = ".fit.lock"


def publish(staging: Path, out: Path) -> None:
    """Move a finished run's files from ``staging`` into ``out``, the report last, and remove ``staging``."""
    reports = [staging / "report.md", staging / "report.json"]
    for path in [p for p in sorted(staging.iterdir()) if p not in reports] + reports:
        os.replace(path, out / path.name)
    staging.rmdir()


def previous_report(out: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The report in ``out`` made from the same ``inputs`` whose bundles are all present and unchanged, marked
    ``reused``; None otherwise."""
    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if report.get("inputs") != inputs:
        return None
    for bundle in report["bundles"]:
        path = out / bundle["path"]
        if not path.exists() or sha256_file(path) != bundle["sha256"]:
            return None
    report["reused"] = True  # not written: says this call fitted nothing
    return report
