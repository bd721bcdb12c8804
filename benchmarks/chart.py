"""The chart of a run: per workload, each system's time for each operation, beside the floors.

``draw(results, path)`` writes a PNG with one panel per workload: for the durable save, the async
save's blocking time, the async save until durable (``wait()`` right after it) and the load, one bar
per system (the floor, ckpt, Orbax, torch.save, DCP), on a log scale, with ckpt's bars outlined.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from report import median  # noqa: E402

OPERATIONS = [("save_s", "durable save"), ("blocking_s", "async blocking"), ("async_total_s", "async until durable"),
              ("load_s", "load")]
COLORS = {"floor": "#9e9e9e", "ckpt": "#d62728", "orbax": "#1f77b4", "torch": "#ff7f0e", "dcp": "#2ca02c"}
LABELS = {"floor": "floor (numpy + file system)", "ckpt": "ckpt", "orbax": "Orbax v1", "torch": "torch.save",
          "dcp": "torch DCP"}


def draw(results: dict, path: Path) -> None:
    """Writes the chart of ``results`` (what run.py builds) to ``path``."""
    workloads = results["workloads"]
    if not workloads:
        return
    columns = min(3, len(workloads))
    rows = -(-len(workloads) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.4 * max(2, columns), 3.6 * rows + 0.8), squeeze=False)
    for ax, entry in zip(axes.flat, workloads):
        systems = [s for s in COLORS if s in entry["systems"]]
        width = 0.8 / len(systems)
        for k, system in enumerate(systems):
            # the floor has no background write: its "async" is the copy alone
            values = [None if (system, key) == ("floor", "async_total_s") else median(entry, system, key)
                      for key, _ in OPERATIONS]
            xs = [i + (k - (len(systems) - 1) / 2) * width for i, v in enumerate(values) if v]
            ax.bar(xs, [v for v in values if v], width, color=COLORS[system], label=LABELS[system],
                   edgecolor="black" if system == "ckpt" else "none", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(OPERATIONS)), [label for _, label in OPERATIONS], fontsize=8)
        ax.set_ylabel("seconds (median, log scale)", fontsize=8)
        ax.set_title(f"{entry['name']}: {entry['nbytes'] / (1 << 20):.0f} MiB, {entry['leaves']} leaves", fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    env = results["environment"]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5 if columns > 2 else 3), fontsize=8,
               frameon=False)
    fig.suptitle(f"ckpt against its peers and the floors: seconds, lower is better\n({env['mode']} mode, "
                 f"{env['cpus']} CPUs, {env['date'][:10]})", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 / rows, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
