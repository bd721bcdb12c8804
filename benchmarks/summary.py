"""The README's performance figures from one or more full runs of run.py.

Usage::

    python benchmarks/summary.py bench-results/results.json [more results.json ...]

Prints the README's table of the first run (per workload, the medians of ckpt, Orbax, torch.save, DCP
and the floor for the durable save, the load and the async blocking) and, for every target, its value
in each run given and in how many of them it held: the ranges a closing note or the README quotes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import report

COLUMNS = [("durable save", "save_s", "s"), ("load", "load_s", "s"), ("async blocking", "blocking_s", "ms")]
SYSTEMS = [("ckpt", "ckpt"), ("orbax", "Orbax"), ("torch", "torch"), ("dcp", "DCP"), ("floor", "floor")]


def _figure(seconds: float | None, unit: str) -> str:
    """Three significant digits for seconds (0.056, 1.24), two for milliseconds (3.9, 17, 252)."""
    if seconds is None:
        return "-"
    if unit == "ms":
        ms = seconds * 1e3
        return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"
    return f"{seconds:.3f}" if seconds < 1 else f"{seconds:.3g}"


def _size(nbytes: int) -> str:
    gib = 1024 * report.MiB
    return f"{nbytes / gib:.3g} GiB" if nbytes >= gib else f"{nbytes / report.MiB:.3g} MiB"


def readme_table(results: dict) -> str:
    """The markdown table of one run: a row per workload, a column per operation, every system in it."""
    names = " / ".join(label for _, label in SYSTEMS)
    header = "| workload | " + " | ".join(f"{what}: {names}" for what, _, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for entry in results["workloads"]:
        cells = [f"{entry['description']} ({_size(entry['nbytes'])}, {entry['leaves']:,} leaves)"]
        for _, key, unit in COLUMNS:
            cells.append(" / ".join(_figure(report.median(entry, system, key), unit) for system, _ in SYSTEMS)
                         + f" {unit}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_across(runs: list[dict]) -> str:
    """Each target (in the first run's order) with its goal, its value in every run, and how many held it."""
    rows: dict[str, list[dict | None]] = {}  # (in the order met: the first run's)
    for k, results in enumerate(runs):
        for target in results["targets"]:
            rows.setdefault(target["target"], [None] * len(runs))[k] = target
    table = []
    for name, values in rows.items():
        found = [t for t in values if t is not None]
        held = sum(t["ok"] is True for t in found)
        text = ", ".join("-" if t is None
                         else report.number(t["measured"], 3) + (" (missed)" if t["ok"] is False else "")
                         for t in values)
        table.append([name, found[0]["goal"], text, f"{held} of {len(found)}"])
    held_per_run = [sum(t["ok"] is True for t in results["targets"]) for results in runs]
    totals = ", ".join(f"{held} of {len(results['targets'])}" for held, results in zip(held_per_run, runs))
    return (f"targets held per run: {totals}\n"
            + report.text_table(["target", "goal", "value in each run", "held"], table))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json files of run.py, the README's first")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    dates = ", ".join(f"{r['environment']['date']} ({r['environment']['mode']})" for r in runs)
    print(f"runs: {dates}\n\n{readme_table(runs[0])}\n\n{targets_across(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
