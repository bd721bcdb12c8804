"""Tables and target checks from the results dict that run.py builds (and writes as JSON).

Ratios: against the floors, ckpt's share of the floor's throughput (floor time / ckpt time; the goal is
>= 0.8 for durable saves and loads) and its blocking time over the copy floor's (<= 1.5, for the steady
state: an async save by an object that has saved before; a first save is reported beside it); against Orbax
torch.save and DCP, their time over ckpt's (> 1: ckpt is faster).
"""
from __future__ import annotations

from typing import Iterator

MiB = 1 << 20

ROWS = [("durable save (s)", "save_s", 1, 3), ("async blocking (s)", "blocking_s", 1, 3),
        ("  first save (s)", "blocking_first_s", 1, 3),
        ("async save total (s)", "async_total_s", 1, 3), ("load (s)", "load_s", 1, 3),
        ("peak RSS save (MiB)", "save_peak_bytes", MiB, 1), ("peak RSS async (MiB)", "async_peak_bytes", MiB, 1),
        ("peak RSS load (MiB)", "load_peak_bytes", MiB, 1), ("files per step", "files", 1, 0)]


def median(entry: dict, system: str, key: str) -> float | None:
    figure = entry["systems"].get(system, {}).get(key)
    return None if figure is None else figure["median"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    return "\n".join(lines)


def workload_table(entry: dict) -> str:
    systems = list(entry["systems"])
    rows = []
    for label, key, scale, digits in ROWS:
        values = [median(entry, s, key) for s in systems]
        rows.append([label] + [number(None if v is None else v / scale, digits) for v in values])
    title = (f"== {entry['name']}: {entry['description']} ({entry['nbytes'] / MiB:.1f} MiB in arrays, "
             f"{entry['leaves']} leaves) ==")
    lines = [title, text_table(["median of runs"] + systems, rows)]
    if "ckpt" in systems:
        lines.append(_ratios_line(entry))
    return "\n".join(lines)


def _ratios_line(entry: dict) -> str:
    parts = []
    if "floor" in entry["systems"]:
        parts.append("ckpt / floor: save throughput {} | load throughput {} | blocking time {} (first save {})".format(
            *(number(r, 2) + "x" for r in (_ratio(median(entry, "floor", "save_s"), median(entry, "ckpt", "save_s")),
                                           _ratio(median(entry, "floor", "load_s"), median(entry, "ckpt", "load_s")),
                                           _ratio(median(entry, "ckpt", "blocking_s"), median(entry, "floor", "blocking_s")),
                                           _ratio(median(entry, "ckpt", "blocking_first_s"),
                                                  median(entry, "floor", "blocking_first_s"))))))
    for other in ("orbax", "torch", "dcp"):
        if other in entry["systems"]:
            parts.append("{} time / ckpt time: save {} | blocking {} | load {}".format(other, *(
                number(_ratio(median(entry, other, k), median(entry, "ckpt", k)), 2) + "x"
                for k in ("save_s", "blocking_s", "load_s"))))
    return "\n".join("  " + p for p in parts)


def scaling_table(scaling: dict) -> str:
    header = ["state", "leaves", "floor save", "ckpt save", "s/GiB", "floor load", "ckpt load",
              "save x floor", "load x floor"]
    out = []
    for label, points in (("by size", scaling["bytes"]), ("by leaf count", scaling["leaves"])):
        rows = []
        for p in points:
            save, load = median(p, "ckpt", "save_s"), median(p, "ckpt", "load_s")
            rows.append([f"{p['nbytes'] / MiB:.0f} MiB", str(p["leaves"]), number(median(p, "floor", "save_s")),
                         number(save), number(save / (p["nbytes"] / (1 << 30))), number(median(p, "floor", "load_s")),
                         number(load), number(_ratio(median(p, "floor", "save_s"), save), 2),
                         number(_ratio(median(p, "floor", "load_s"), load), 2)])
        out.append(f"-- scaling {label} (seconds) --\n" + text_table(header, rows))
    first, last = scaling["leaves"][0], scaling["leaves"][-1]
    for system in ("ckpt", "floor"):  # the floor's own: one write or readinto a leaf
        cost = per_leaf_cost(first, last, system)
        out.append(f"  {system} cost per extra leaf from {first['leaves']} to {last['leaves']} leaves: " + ", ".join(
            f"{_COSTS[key]} {seconds * 1e6:.1f} us" for key, seconds in cost.items()))
    return "\n".join(out)


_COSTS = {"save_s": "first save", "save_again_s": "next save", "load_s": "load"}


def per_leaf_cost(a: dict, b: dict, system: str = "ckpt") -> dict[str, float]:
    """A system's seconds per extra leaf between two scaling points of the same total bytes, by operation
    (``_COSTS``: the first save of a newly opened Checkpointer, its next save of the same tree, a load)."""
    n = b["leaves"] - a["leaves"]
    return {key: (median(b, system, key) - median(a, system, key)) / n
            for key in _COSTS if median(a, system, key) is not None and median(b, system, key) is not None}


def interference_table(result: dict) -> str:
    rows = [[s, number(median(result, s, "iteration_alone_s") * 1e3),
             number(median(result, s, "iteration_during_s") * 1e3),
             f"{median(result, s, 'slowdown') * 100:+.1f}%", number(median(result, s, "persist_s")),
             number(median(result, s, "background_cpu_s"))]
            for s in result["systems"]]
    return (f"-- compute loop on the main thread while a {result['nbytes'] / MiB:.0f} MiB save persists --\n"
            + text_table(["system", "iter alone (ms)", "iter during (ms)", "slowdown", "persist (s)", "save CPU (s)"],
                         rows))


def overheads_table(result: dict) -> str:
    rows = [[s, number(c["init_s"]), "fails" if c.get("init_lightweight_error") else number(c["init_lightweight_s"]),
             number(c["declined_save_s"] * 1e6, 1), number(c["should_save_s"] * 1e6, 1)]
            for s, c in result["systems"].items()]
    return (f"-- fixed costs on a root of {result['steps']} steps: opening it; a declined save of "
            f"{result['leaves']} leaves --\n"
            + text_table(["system", "open+latest (s)", "lightweight (s)", "declined save (us)", "should_save (us)"],
                         rows))


def _check(name: str, value: float | None, goal: str, ok: bool | None) -> dict:
    return {"target": name, "measured": value, "goal": goal, "ok": ok}


def targets(results: dict) -> list[dict]:
    """Each target of the issue and the SPEC, with the measured value and whether it holds."""
    return list(_targets(results))


def _targets(results: dict) -> Iterator[dict]:
    for entry in results["workloads"]:
        if "ckpt" not in entry["systems"]:
            continue
        name, state = entry["name"], entry["nbytes"]
        if "floor" in entry["systems"]:
            if entry["name"].startswith("large"):
                r = _ratio(median(entry, "floor", "save_s"), median(entry, "ckpt", "save_s"))
                yield _check(f"{name}: durable save throughput / write floor", r, ">= 0.8", r is not None and r >= 0.8)
            r = _ratio(median(entry, "floor", "load_s"), median(entry, "ckpt", "load_s"))
            yield _check(f"{name}: load throughput / read floor", r, ">= 0.8", r is not None and r >= 0.8)
            r = _ratio(median(entry, "ckpt", "blocking_s"), median(entry, "floor", "blocking_s"))
            yield _check(f"{name}: async blocking / copy floor", r, "<= 1.5", r is not None and r <= 1.5)
        if "orbax" in entry["systems"]:
            goal = 3.0 if name in ("many_leaves", "small_leaves") else 1.0
            for key, what in (("save_s", "save"), ("load_s", "load")):
                r = _ratio(median(entry, "orbax", key), median(entry, "ckpt", key))
                yield _check(f"{name}: Orbax {what} time / ckpt's", r, f"> {goal:g}" if goal == 1 else f">= {goal:g}",
                             r is not None and (r > goal if goal == 1 else r >= goal))
        if "dcp" in entry["systems"]:
            for key, what in (("save_s", "save"), ("blocking_s", "async blocking"), ("async_total_s", "durable after wait"),
                              ("load_s", "load")):
                r = _ratio(median(entry, "dcp", key), median(entry, "ckpt", key))
                yield _check(f"{name}: DCP {what} time / ckpt's", r, "> 1", r is not None and r > 1)
        sync = median(entry, "ckpt", "save_peak_bytes")
        yield _check(f"{name}: sync save peak RSS / state", _ratio(sync, state), "<= 0.1",
                     sync is not None and sync <= 0.1 * state)
        peak = median(entry, "ckpt", "async_peak_bytes")
        yield _check(f"{name}: async save peak RSS - state (MiB)", None if peak is None else (peak - state) / MiB,
                     "<= 64", peak is not None and peak <= state + 64 * MiB)
    scaling = results.get("scaling")
    if scaling:
        a, b = scaling["bytes"][-2:]
        r = _ratio(median(b, "ckpt", "save_s") / b["nbytes"], median(a, "ckpt", "save_s") / a["nbytes"])
        yield _check("scaling: save s/byte at the largest state / the one before", r, "<= 1.3", r is not None and r <= 1.3)
        first, last = scaling["leaves"][0], scaling["leaves"][-1]
        for key, cost in per_leaf_cost(first, last).items():
            yield _check(f"scaling: {_COSTS[key]} cost per extra leaf, {first['leaves']} to {last['leaves']} (us)",
                         cost * 1e6, "<= 5", cost <= 5e-6)
        r = _ratio(median(last, "floor", "load_s"), median(last, "ckpt", "load_s"))
        yield _check(f"scaling: {last['leaves']} leaves, load throughput / read floor", r, ">= 0.8",
                     r is not None and r >= 0.8)
    interference = results.get("interference")
    if interference and "ckpt" in interference["systems"]:
        r = median(interference, "ckpt", "slowdown")
        yield _check("compute-loop slowdown during a background save", r, "<= 0.10", r <= 0.10)
        if "dcp" in interference["systems"]:
            r = _ratio(median(interference, "dcp", "persist_s"), median(interference, "ckpt", "persist_s"))
            yield _check("DCP time until durable / ckpt's, in the background (no wait)", r, "> 1", r is not None and r > 1)
    overheads = results.get("overheads", {}).get("systems", {}).get("ckpt")
    if overheads:
        for key in ("init_s", "init_lightweight_s"):
            value = overheads[key]
            yield _check(f"open a root of {overheads['steps']} steps ({key})", value, "<= 0.25 s",
                         value is not None and value <= 0.25)
        yield _check(f"declined save on a root of {overheads['steps']} steps (s)", overheads["declined_save_s"],
                     "<= 50e-6", overheads["declined_save_s"] <= 50e-6)


def render(results: dict) -> str:
    env = results["environment"]
    parts = [f"ckpt benchmarks ({env['mode']} mode, median of {env['reps']} runs after a warm-up, "
             f"{env['cpus']} CPUs, {env['date']})"]
    parts += [workload_table(e) for e in results["workloads"]]
    if results.get("scaling"):
        parts.append(scaling_table(results["scaling"]))
    if results.get("interference"):
        parts.append(interference_table(results["interference"]))
    if results.get("overheads"):
        parts.append(overheads_table(results["overheads"]))
    rows = [[t["target"], number(t["measured"], 3), t["goal"], {True: "ok", False: "MISSED", None: "-"}[t["ok"]]]
            for t in results["targets"]]
    parts.append("-- targets --\n" + text_table(["target", "measured", "goal", ""], rows))
    return "\n\n".join(parts)
