"""fit's report as an object: its results and bundles as report.json keeps them, and the best of them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError


def best_index(entries: Sequence[Mapping[str, Any]]) -> int:
    """The entry with the highest ``validation_score`` (a missing or NaN score counts as the lowest; the first of
    equals wins)."""
    scores = [entry.get("validation_score") for entry in entries]
    return max(range(len(entries)), key=lambda i: -1.0 if scores[i] is None or math.isnan(scores[i]) else scores[i])


@dataclass
class Report:
    """What fit wrote to ``report.json``: ``results`` (a row per feature set and classifier) and ``bundles``.

    Parameters
    ----------
    data : dict
        The report's contents.
    """

    data: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read ``report.json``.

        Raises
        ------
        UserError
            When it is missing or is not a report fit wrote.
        """
        path = Path(path)
        if not path.exists():
            raise UserError(f"no {path} to choose a classifier from; run fit first (make fit), "
                            "or pass --classifier PATH.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["bundles"]  # noqa: B018  (what every report fit wrote has)
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path} is not a report written by pipeline.fit; fit again or pass --classifier PATH."
            ) from None
        return cls(data)

    def best(self, section: str = "bundles", **wanted: str | None) -> dict[str, Any] | None:
        """The best entry of ``section`` (``bundles`` or ``results``) among those whose fields equal ``wanted``
        (a None value matches anything); None when none matches."""
        entries = [entry for entry in self.data.get(section, [])
                   if all(value is None or entry.get(key) == value for key, value in wanted.items())]
        return entries[best_index(entries)] if entries else None
