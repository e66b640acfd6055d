"""``python -m pipeline.models`` (``transfer models``): the curated backbones, what is published about their
frozen features, and how fast they ran on this machine (``make bench``'s ``benchmarks/bench.json``, when present)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import run_cli
from pipeline.models.registry import CURATED, CuratedModel

BENCH_FILE = Path("benchmarks") / "bench.json"


def measured_rates(bench: dict[str, Any], name: str) -> str:
    """This machine's end-to-end images/s of ``name`` from a ``make bench`` result, in words ("" when unmeasured)."""
    entry = bench.get("models", {}).get(name)
    if not entry:
        return ""
    parts = []
    for precision, run in entry.get("end_to_end", {}).items():
        if run.get("rate"):
            parts.append(f"{precision} {run['rate']:.1f} images/s")
    refused = re.search(r"mean cosine of ([0-9.]+)", str(entry.get("int8_refused", "")))
    if refused:
        parts.append(f"int8 refused (mean cosine to fp32 {refused[1]})")
    machine = bench.get("machine", {})
    where = f" on {machine.get('cores', '?')} {machine.get('cpu', 'CPU')} cores, {bench.get('weights', '?')} weights"
    return ", ".join(parts) + f" end to end from JPEG files{where}" if parts else ""


def describe(entry: CuratedModel, bench: dict[str, Any]) -> str:
    """A curated model in a few lines."""
    store_kb = entry.embedding_dim * 4 / 1024
    lines = [
        f"{entry.name}\n    {entry.summary}",
        f"    {entry.embedding_dim}-d embedding ({store_kb:.1f} KB per image in the store), {entry.input_size} px, "
        f"{entry.parameters:.1f} M parameters, weights licence: {entry.license}",
    ]
    lines.append(f"    published: {published(entry)}")
    rates = measured_rates(bench, entry.name)
    if rates:
        lines.append(f"    measured here: {rates}")
    return "\n".join(lines)


def published(entry: CuratedModel) -> str:
    """The published figures, those of one protocol and source together:
    ``CIFAR-10 96.2, Pets 93.1 (linear probe, ...)``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for probe in entry.probes:
        groups.setdefault((probe.protocol, probe.source), []).append(f"{probe.dataset} {probe.accuracy:.1f}")
    return "; ".join(f"{', '.join(figures)} ({protocol}: {source})" for (protocol, source), figures in groups.items())


def load_bench(path: Path | None) -> dict[str, Any]:
    """``make bench``'s results, from ``path`` or the usual places; empty when there are none."""
    candidates = [path] if path else [BENCH_FILE, Path(__file__).resolve().parents[2] / BENCH_FILE]
    for candidate in candidates:
        try:
            return json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return {}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.models``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.models",
        description="List the curated backbones: embedding size, input size, parameters, weights licence, published "
        "accuracies of classifiers on their frozen features, and images/s measured by make bench on this machine. "
        "Any other timm or torchvision model is named timm/NAME[.TAG] or torchvision/NAME; docs/backbones.md says "
        "how to choose.",
    )
    parser.add_argument("--bench", type=Path, default=None,
                        help=f"make bench's results (default: {BENCH_FILE} here or in the project)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the curated models."""
    args = build_parser().parse_args(argv)
    bench = load_bench(args.bench)
    if args.json:
        from dataclasses import asdict

        rows = [{**asdict(entry), "measured": measured_rates(bench, entry.name)} for entry in CURATED]
        print(json.dumps(rows, indent=2))
        return 0
    print("\n\n".join(describe(entry, bench) for entry in CURATED))
    print("\nExport one: transfer export --model NAME (make models MODELS=NAME); extract with --models NAME.")
    return 0


if __name__ == "__main__":
    run_cli(main)
