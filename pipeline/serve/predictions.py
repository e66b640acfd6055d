"""classify's rows: one per image, with its top-k classes or why it has none, written as CSV, JSON lines or a
table; a file output appears whole or stays ``.partial``."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline.errors import Interrupted

OUTPUT_FORMATS = (".csv", ".jsonl")
PARTIAL = ".partial"


@dataclass
class Prediction:
    """One output row: the image, its top-k classes with probabilities, or why it has none."""

    path: str
    classes: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""
    label: str | None = None

    @property
    def prediction(self) -> str:
        return self.classes[0] if self.classes else ""

    @property
    def probability(self) -> float | None:
        return self.probabilities[0] if self.probabilities else None


def csv_writer(stream: TextIO, top_k: int, labelled: bool) -> Any:
    """A function writing one Prediction per CSV row (header first)."""
    writer = csv.writer(stream)
    header = ["path", "prediction", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"top{rank}", f"top{rank}_probability"]
    writer.writerow(header + (["label"] if labelled else []) + ["error"])

    def write(row: Prediction) -> None:
        cells: list[Any] = [row.path, row.prediction, "" if row.probability is None else row.probability]
        for rank in range(1, top_k):
            has = rank < len(row.classes)
            cells += [row.classes[rank] if has else "", row.probabilities[rank] if has else ""]
        writer.writerow(cells + ([row.label or ""] if labelled else []) + [row.error])

    return write


def jsonl_writer(stream: TextIO, top_k: int, labelled: bool) -> Any:
    """A function writing one Prediction per JSON line."""

    def write(row: Prediction) -> None:
        record: dict[str, Any] = {
            "path": row.path, "prediction": row.prediction or None, "probability": row.probability,
            "top_k": [{"class": c, "probability": p} for c, p in zip(row.classes, row.probabilities)],
        }
        if labelled:
            record["label"] = row.label
        record["error"] = row.error
        stream.write(json.dumps(record) + "\n")

    return write


def table_writer(stream: TextIO, top_k: int, labelled: bool) -> Any:
    """A function printing one Prediction per readable line."""

    def write(row: Prediction) -> None:
        if row.error:
            stream.write(f"{row.path}  ERROR: {row.error}\n")
            return
        others = ", ".join(f"{c} {p:.2f}" for c, p in zip(row.classes[1:], row.probabilities[1:]))
        truth = f"  [label {row.label}]" if labelled and row.label is not None else ""
        stream.write(f"{row.path}  {row.prediction} {row.probability:.2f}" + (f"  ({others})" if others else "")
                     + truth + "\n")

    return write


def write_predictions(rows: Iterator[Prediction], labels: Mapping[str, str | None], top_k: int, output: Path | None,
                      counts: dict[str, int]) -> None:
    """Write ``rows`` (``top_k`` classes each) with their folder's labels to ``output`` in its format, or as a
    table on stdout, counting them into ``counts``.

    Raises
    ------
    Interrupted
        On Ctrl-C once rows were written to a file: they are kept in its ``.partial`` file.
    """
    labelled = any(label is not None for label in labels.values())
    writer = {".csv": csv_writer, ".jsonl": jsonl_writer}.get(output.suffix if output else "", table_writer)
    try:
        with _destination(output) as stream:
            write = writer(stream, top_k, labelled)
            for row in rows:
                row.label = labels[row.path]
                write(row)
                counts["unreadable" if row.error else "classified"] += 1
                if not row.error and row.label is not None:
                    counts["labelled"] += 1
                    counts["correct"] += row.label == row.prediction
    except KeyboardInterrupt:
        written = counts["classified"] + counts["unreadable"]
        if output is None or not written:
            raise
        raise Interrupted(f"the {written} rows written so far are in {output.with_name(output.name + PARTIAL)}") \
            from None


@contextlib.contextmanager
def _destination(output: Path | None) -> Iterator[TextIO]:
    """stdout, or ``<output>.partial`` renamed to ``output`` when complete.

    A run that stops early leaves its rows so far in the ``.partial`` file rather than a short ``output``
    that looks complete.
    """
    if output is None:
        yield sys.stdout
        return
    partial = output.with_name(output.name + PARTIAL)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w", encoding="utf-8", newline="") as stream:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, output)
