"""The ckpt command: list, inspect and verify checkpoints without writing to them, and convert a root.

    ckpt ls DIR              steps, commit time, size, metrics, the latest, leftover temporaries
    ckpt ls DIR --local L    the same for a two-tier Checkpointer: the steps of both tiers, and where each lives
    ckpt show DIR [STEP]     the saved trees: key paths, types, dtypes, shapes, bytes (default: latest step)
    ckpt verify DIR [STEP]   re-reads the data and checks every checksum (default: every step);
                             exit status 1 when anything is damaged
    show and verify --local L: the step a two-tier Checkpointer loads; every copy on either tier
    ckpt convert DIR DST     copies every step of DIR (ckpt's or Orbax's) into a new ckpt root DST,
                             keeping names, metrics and times, and checks each against its source

DIR is a checkpoint root (a Checkpointer's directory) or one step directory (what ckpt.save
writes); convert takes a root. A root is listed as a Checkpointer lists it, with the step name format
its names show (23, 0023, step_0023); a checkpoint named otherwise is shown as not a step. Orbax's
steps are read too, and marked as Orbax's. --json prints the same information as
strict JSON for scripts (a number that is not finite, such as a NaN loss, is the string "nan",
"inf" or "-inf"). Text from a checkpoint (key paths, metric names, values) is printed with control
characters escaped. Exit status 2: usage errors, a missing directory or step.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from ckpt import __version__, convert, formats, leaves, orbax, progress, storage, tiers
from ckpt import root as root_lib
from ckpt import format as fmt
from ckpt import tree as tree_lib
from ckpt.errors import (CheckpointCorruptedError, CheckpointNotFoundError, DirectoryLockedError, InvalidLayoutError,
                         RootDirectoryError, StepNotFoundError, StepReplacedError, UnsupportedLayoutError)
from ckpt.path import step as step_lib
from ckpt.verify import VerifyResult, verify_step


class UsageError(Exception):
    """A directory or step that does not exist (exit status 2)."""


@dataclasses.dataclass
class _Step:
    """A checkpoint directory: a step of a root (``step``), or one that is not (``ckpt.save``'s, step None);
    ``error`` when its manifest cannot be read."""

    path: storage.Location
    step: int | None
    manifest: dict | None
    error: str | None = None


# ----------------------------------------------------------------------------------- finding steps
def _is_step_dir(path: storage.Location) -> bool:
    """Whether DIR is one checkpoint, not a root; UsageError when it is a temporary of ckpt's (uncommitted)."""
    try:
        root_lib.check_committed(path)
    except CheckpointNotFoundError as e:
        raise UsageError(str(e)) from None
    return formats.is_step(path)


def _read_step(path: storage.Location, step: int | None = None) -> _Step:
    """A checkpoint directory (ckpt's or Orbax's) with its manifest, or Orbax's metadata in the manifest's
    names, or why it cannot be read; ``step`` as its root lists it (default: its manifest's, else the
    digits ending its name, for DIR given as one step)."""
    try:
        manifest = formats.info(path)
    except (CheckpointCorruptedError, InvalidLayoutError) as e:
        return _Step(path, formats.step_of(path, {}) if step is None else step, None, str(e))
    return _Step(path, formats.step_of(path, manifest) if step is None else step, manifest)


def _by_orbax(manifest: dict | None) -> bool:
    return manifest is not None and manifest.get("format") == "orbax"


def _scan(root: storage.Location) -> tuple[list[_Step], list[_Step], list[root_lib.Entry]]:
    """What ``root`` holds, listed as a Checkpointer given its step name format lists it (the format is
    found by :func:`ckpt.path.step.name_format_of`): its steps, ascending, with the steps of ckpt's that
    are damaged (``error`` set; never listed by a Checkpointer); the checkpoints in it that are not its
    steps (``ckpt.save``'s, named otherwise: step None); and the other entries a Checkpointer would not
    list: ckpt's temporaries, and foreign entries (a user's directory at a step's name, a symbolic link,
    an Orbax save in progress or killed), which are never followed."""
    if isinstance(root, Path) and not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    try:
        orbax.check_checkpoint(root)
    except CheckpointNotFoundError as e:
        raise UsageError(str(e)) from None
    name_format = step_lib.name_format_of(root)
    steps, others = [], []
    for entry in root_lib.scan(root, name_format):
        if entry.kind in root_lib.LISTED:
            steps.append(_Step(entry.path, entry.step, entry.manifest))
        elif root_lib.is_damaged_step(entry):
            steps.append(_read_step(entry.path, entry.step))
        else:
            others.append(entry)
    checkpoints = []
    for name in sorted(storage.list_names(root)):
        if name_format.parse_name(name) is None and not name.endswith(fmt.TEMPORARY_SUFFIXES):
            try:
                entry = root_lib.classify(root / name, None)
            except FileNotFoundError:
                continue  # removed since the listing
            if entry.kind in root_lib.LISTED:
                checkpoints.append(_Step(entry.path, None, entry.manifest))
            elif orbax.is_temporary(name):  # listed with the entries ckpt did not write, never touched
                others.append(dataclasses.replace(entry, kind=root_lib.Kind.FOREIGN,
                                                  holds=f"an Orbax save in progress or killed: {entry.holds}"))
    return steps, checkpoints, others


def _local_tier(directory: storage.Location, local: Path) -> tuple[list[_Step], list[_Step], list[root_lib.Entry]]:
    """What ``local``, the local tier of the two-tier Checkpointer whose durable root is ``directory``, holds (see
    :func:`_scan`); nothing when it is missing (a new machine).

    Raises:
      UsageError: ``local`` is ``directory`` itself, is or lies in a checkpoint's step directory (which a
        Checkpointer refuses as its local tier), or holds the local tier of another durable root (another run's
        steps), or ``directory`` is one checkpoint, not a root.
    """
    if _is_step_dir(directory):
        raise UsageError(f"{directory} is one checkpoint, not the durable root of two tiers; drop --local")
    try:  # the root itself, a step, or another run's steps, are not this root's local tier
        root_lib.check_no_file_in_the_way(local, "the local tier's directory")
        tiers.check_apart(local, directory)
        root_lib.check_outside_steps(local, "the local tier's directory")
        tiers.check_owner(local, str(directory))
    except (ValueError, RootDirectoryError) as e:
        raise UsageError(f"--local {e}") from None
    if not local.is_dir():
        return [], [], []
    processes = tiers.process_directories(local)
    if processes:
        _print(f"ckpt: note: not read: the local tiers of a multi-process job's processes in {local} "
               f"({', '.join(p.name for p in processes)}), which such a job does not load from (it loads the durable "
               f"tier's steps); name one to see or check its copies: --local {processes[0]}", file=sys.stderr)
    return _scan(local)


def _latest(steps: list[_Step]) -> _Step | None:
    committed = [s for s in steps if s.manifest is not None and s.step is not None]
    return committed[-1] if committed else None


def _select(directory: storage.Location, step: int | None, local: Path | None = None) -> list[_Step]:
    """The checkpoints a command acts on: DIR itself, DIR's ``step``, or (``step`` None) its latest; with ``local``
    (see :func:`ls`), of either tier, a step in both as the copy a Checkpointer loads first (:func:`_tiers`)."""
    if local is None and _is_step_dir(directory):
        if step is not None:
            raise UsageError(f"{directory} is one checkpoint; drop the STEP argument")
        return [_read_step(directory)]
    steps, checkpoints, others = _scan(directory)
    if local is not None:
        steps = _tiers(steps, _local_tier(directory, local)[0])[0]
    set_aside = _set_aside(others)
    if step is None:
        latest = _latest(steps)
        if latest is None:
            raise UsageError(f"no checkpoints in {directory}{_unnumbered(checkpoints)}{_put_back(set_aside)}")
        _note_set_aside(set_aside, "listed")
        return [latest]
    found = [s for s in steps if s.step == step]
    if not found:
        raise UsageError(f"no checkpoint at step {step} in {directory} (steps: {[s.step for s in steps]})"
                         f"{_unnumbered(checkpoints)}{_put_back(set_aside)}")
    return found


def _set_aside(others: list[root_lib.Entry]) -> list[tuple[root_lib.Entry, Path]]:
    """Of the entries :func:`_scan` did not list, the steps set aside by a save with ``overwrite=True`` that a
    crash interrupted (``5.ckpt-replaced``), each with the name a Checkpointer opened on the root puts it back as."""
    found = [(e, storage.set_aside_step(e.path)) for e in others if e.kind in root_lib.REMOVABLE]
    return [(e, final) for e, final in found if final is not None]


def _put_back(set_aside: list[tuple[root_lib.Entry, Path]]) -> str:
    """What to say of the steps set aside in a root: which, and that a Checkpointer opened on it puts them back."""
    if not set_aside:
        return ""
    names = ", ".join(f"{final.name} (as {e.path.name})" for e, final in set_aside)
    return (f"; set aside by a save with overwrite=True that a crash interrupted, not listed until a Checkpointer "
            f"opened on the root puts them back: {names}")


def _note_set_aside(set_aside: list[tuple[root_lib.Entry, Path]], done: str) -> None:
    """Tells (on stderr) of the steps set aside in the root a command went through, which it has not ``done``."""
    if set_aside:
        _print(f"ckpt: note: not {done}{_put_back(set_aside)}", file=sys.stderr)


def _unnumbered(checkpoints: list[_Step]) -> str:
    """What to say of the checkpoints in a root that are not its steps (``ckpt.save``'s): name them as DIR."""
    names = [str(s.path) for s in checkpoints]
    return f"; checkpoints without a step, to name as DIR: {', '.join(names)}" if names else ""


# --------------------------------------------------------------------------------------- helpers
def _disk_bytes(path: storage.Location) -> int | None:
    """The bytes of the files under a local directory (None on an object store)."""
    if not isinstance(path, Path):
        return None
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass  # a temporary being written or deleted right now
    return total


def _named(step: int | None) -> str:
    """``step N``, or ``checkpoint`` for one saved without a step (by ``ckpt.save``)."""
    return "checkpoint" if step is None else f"step {step}"


def _size(nbytes: int | None) -> str:
    return "-" if nbytes is None else progress.format_bytes(nbytes)


def _time(nsecs: int | None, *, iso: bool) -> str | None:
    if nsecs is None:
        return None
    moment = datetime.datetime.fromtimestamp(nsecs / 1e9, datetime.timezone.utc)
    return moment.isoformat() if iso else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _printable(text: str) -> str:
    """``text`` with every character a terminal would not print as itself (escape sequences, other
    control characters, lone surrogates) written as its Python escape: a checkpoint is input."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _strict(value: Any) -> Any:
    """JSON ``value`` with each number that is not finite as the string ``nan``, ``inf`` or ``-inf``
    (nesting is bounded: ckpt.schema refuses metrics nested deeper than a save accepts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _metrics_text(metrics: Any, prefix: str = "") -> str:
    """``loss=0.1234 acc=0.91`` for a dict of numbers (nested keys joined with dots), JSON otherwise."""
    if isinstance(metrics, dict):
        return " ".join(_metrics_text(v, f"{prefix}{k}.") if isinstance(v, dict) else f"{prefix}{k}={_number_text(v)}"
                        for k, v in metrics.items())
    return "" if metrics is None else json.dumps(_strict(metrics))


def _number_text(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else json.dumps(_strict(value))


def _table(headers: Sequence[str], rows: list[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Aligned columns; the columns numbered in ``right`` are right-aligned."""
    rows = [[_printable(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), *map(line, rows)])


def _print(text: str, file: TextIO | None = None) -> None:
    """Prints ``text`` (which may hold text from a checkpoint) with control characters escaped."""
    print("\n".join(map(_printable, text.split("\n"))), file=file, flush=True)


def _print_json(obj: Any) -> None:
    print(json.dumps(_strict(obj), indent=2, allow_nan=False))


# -------------------------------------------------------------------------------------------- ls
def _tiers(durable: list[_Step], local: list[_Step]) -> tuple[list[_Step], list[list[str]]]:
    """The steps of both tiers, ascending, as a two-tier Checkpointer lists them (a step in both as its local
    copy, which a load reads first, unless its durable copy was committed later; a damaged copy only when its
    step has no sound one, which the Checkpointer lists and loads), and the tiers that hold each."""
    where: dict[int | None, dict[str, _Step]] = {}
    for tier, steps in (("durable", durable), ("local", local)):
        for s in steps:
            where.setdefault(s.step, {})[tier] = s
    for step, copies in where.items():
        where[step] = {tier: s for tier, s in copies.items() if s.manifest is not None} or copies
    order = sorted(where, key=lambda n: (n is None, n or 0))
    return [_read_first(where[n]) for n in order], [sorted(where[n]) for n in order]


def _read_first(copies: dict[str, _Step]) -> _Step:
    local, durable = copies.get("local"), copies.get("durable")
    if local is None or durable is None or local.manifest is None or durable.manifest is None:
        return local or durable
    times = [s.manifest.get("commit_timestamp_nsecs") for s in (local, durable)]
    return durable if None not in times and times[1] > times[0] else local


def ls(directory: storage.Location, *, as_json: bool, local: Path | None = None) -> int:
    """``ckpt ls``: one line per step (a damaged one says why), then per checkpoint in the root that is not
    one of its steps, then the temporaries crashed saves left, then the steps a crash left set aside (during
    a save with ``overwrite=True``; not temporaries: put back, not removed), then the entries ckpt did not write (named
    like a step or a temporary: a user's directory, a symbolic link, never followed). With ``local``
    (the local tier of a two-tier Checkpointer whose durable root is ``directory``) the steps of both
    tiers and where each lives; a missing local directory is an empty tier."""
    steps, checkpoints, others = ([_read_step(directory)], [], []) if _is_step_dir(directory) else _scan(directory)
    held_by = None
    if local is not None:
        local_steps, local_checkpoints, local_others = _local_tier(directory, local)
        steps, held_by = _tiers(steps, local_steps)
        held_by += [["durable"]] * len(checkpoints) + [["local"]] * len(local_checkpoints)
        checkpoints += local_checkpoints
        others += local_others
    latest = _latest(steps)
    steps += checkpoints
    records = [{
        "step": s.step,
        "path": str(s.path),
        "latest": s is latest,
        "time": _time(s.manifest.get("commit_timestamp_nsecs"), iso=True) if s.manifest else None,
        "nbytes": s.manifest.get("nbytes") if s.manifest else None,
        "disk_bytes": _disk_bytes(s.path),
        "metrics": fmt.decode_json(s.manifest, "metrics") if s.manifest else None,
        "orbax": _by_orbax(s.manifest),
        "error": s.error,
        **({} if held_by is None else {"tiers": held_by[i]}),
    } for i, s in enumerate(steps)]
    aside = _set_aside(others)
    aside_paths = {e.path for e, _ in aside}
    temps = [{"path": str(e.path), "disk_bytes": _disk_bytes(e.path)}
             for e in others if e.kind in root_lib.REMOVABLE and e.path not in aside_paths]
    set_aside = [{"path": str(e.path), "name": final.name, "disk_bytes": _disk_bytes(e.path)} for e, final in aside]
    foreign = [{"path": str(e.path), "holds": e.holds} for e in others if e.kind is root_lib.Kind.FOREIGN]
    if as_json:
        _print_json({"directory": str(directory), "latest": None if latest is None else latest.step,
                     "steps": records, "temporaries": temps, "set_aside": set_aside, "foreign": foreign})
        return 0
    summary = f"{len(steps)} checkpoint{'s' if len(steps) != 1 else ''}"
    _print(f"{directory}: {summary}" + ("" if latest is None else f", latest step {latest.step}"))
    if steps:
        rows = [[("* " if r["latest"] else "  ") + (f"{s.path.name}/ (not a step)" if s.step is None else str(s.step))
                 + (" (Orbax)" if r["orbax"] else ""),
                 *([] if held_by is None else ["+".join(r["tiers"])]),
                 (s.manifest and _time(s.manifest.get("commit_timestamp_nsecs"), iso=False)) or "-",
                 _size(r["disk_bytes"]),
                 f"DAMAGED: {s.error}" if s.error else _metrics_text(r["metrics"])]
                for r, s in zip(records, steps)]
        headers = ["  STEP", *([] if held_by is None else ["TIERS"]), "COMMITTED", "SIZE", "METRICS"]
        print(_table(headers, rows, right=[len(headers) - 2]))
    if temps:
        print(f"{len(temps)} temporar{'ies' if len(temps) != 1 else 'y'} (saves in progress or killed; "
              "Checkpointer(..., cleanup_tmp_directories=True) removes them):")
        print(_table(["  NAME", "SIZE"], [["  " + Path(t["path"]).name, _size(t["disk_bytes"])]
                                          for t in temps], right=[1]))
    if set_aside:
        print(f"{len(set_aside)} step{'s' if len(set_aside) != 1 else ''} set aside by a save with overwrite=True that "
              "a crash interrupted (a Checkpointer opened on the root puts each back under its name):")
        print(_table(["  NAME", "PUT BACK AS", "SIZE"],
                     [["  " + Path(t["path"]).name, t["name"], progress.format_bytes(t["disk_bytes"])] for t in set_aside],
                     right=[2]))
    if foreign:
        print(f"{len(foreign)} entr{'ies' if len(foreign) != 1 else 'y'} ckpt did not write (never listed, "
              "changed or removed):")
        print(_table(["  NAME", "WHAT"], [["  " + Path(f["path"]).name, _printable(f["holds"])] for f in foreign]))
    return 0


# ------------------------------------------------------------------------------------------ show
def _leaf_record(name: str, meta: dict) -> dict:
    record: dict[str, Any] = {"checkpointable": name, "path": meta["path"], "type": meta["type"]}
    if "dtype" in meta:
        nbytes = math.prod(meta["shape"]) * leaves.parse_dtype(meta["dtype"]).itemsize
        stored = meta.get("stored") or (f"{fmt.PACKED}/" if "packed" in meta else meta["array"]["kvstore"]["path"])
        record.update(dtype=meta["dtype"], shape=meta.get("key_shape", meta["shape"]), nbytes=nbytes, stored=stored)
        if "impl" in meta:  # typed PRNG keys: ``shape`` is the keys', ``dtype`` and ``nbytes`` their key data's
            record["impl"] = meta["impl"]
    else:
        record.update(dtype=None, shape=None, nbytes=0, stored="inline", value=meta.get("value"))
    return record


def _records(name: str, doc: dict) -> list[dict]:
    """The rows of a checkpointable's table, in flatten order: its leaves, and its empty containers (``{}``,
    ``[]``, ``()``: no leaf, but part of the tree a load gives back), each as an inline value of no bytes."""
    metas, out = iter(doc["leaves"]), []

    def walk(node: tree_lib.Node, path: tree_lib.KeyPath) -> None:
        if node.kind == "leaf":
            out.append(_leaf_record(name, next(metas)))
        elif not node.children:
            out.append({"checkpointable": name, "path": tree_lib.keystr(path), "type": node.name or node.kind,
                        "dtype": None, "shape": None, "nbytes": 0, "stored": "inline",
                        "value": {} if node.kind == "dict" else []})
        for key, child in zip(node.keys, node.children):
            walk(child, path + (key,))

    walk(tree_lib.from_json(doc["tree"]), ())
    return out


def show(directory: storage.Location, step: int | None, *, as_json: bool, local: Path | None = None) -> int:
    """``ckpt show``: the step's metadata, then one table of leaves per checkpointable. With ``local`` (see
    :func:`ls`) the step of either tier, as a two-tier Checkpointer reads it."""
    selected = _select(directory, step, local)[0]
    step_dir, number = selected.path, selected.step
    manifest = formats.info(step_dir)
    metrics, custom_metadata = fmt.decode_json(manifest, "metrics"), fmt.decode_json(manifest, "custom_metadata")
    trees, unreadable = formats.readable_trees(step_dir)
    records = {name: _records(name, doc) for name, doc in trees.items()}
    nbytes = sum(r["nbytes"] for rs in records.values() for r in rs)  # the leaves' (the manifest's pads packed ones)
    if as_json:
        _print_json({"step": number, "path": str(step_dir), "orbax": _by_orbax(manifest),
                     "time": _time(manifest.get("commit_timestamp_nsecs"), iso=True),
                     "metrics": metrics, "custom_metadata": custom_metadata,
                     "nbytes": nbytes, "checkpointables": records, "unreadable": unreadable})
        return 0
    _print(f"{_named(number)}  {step_dir}" + ("  (written by Orbax)" if _by_orbax(manifest) else ""))
    print(f"committed {_time(manifest.get('commit_timestamp_nsecs'), iso=False)}, "
          f"{progress.format_bytes(nbytes)} of data, {_size(_disk_bytes(step_dir))} on disk")
    if metrics is not None:
        _print(f"metrics: {_metrics_text(metrics)}")
    if custom_metadata is not None:
        _print(f"custom metadata: {json.dumps(_strict(custom_metadata))}")
    for name, rs in records.items():
        total = sum(r["nbytes"] for r in rs)
        _print(f"\n{name}: {len(trees[name]['leaves'])} leaves, {progress.format_bytes(total)}")
        rows = [[r["path"] or "(root)", r["type"], f"key<{r['impl']}>" if "impl" in r else r["dtype"] or "",
                 "" if r["shape"] is None else str(tuple(r["shape"])),
                 progress.format_bytes(r["nbytes"]) if r["dtype"] else "",
                 r["stored"] if r["dtype"] else f"inline: {_short(r['value'])}"] for r in rs]
        print(_table(["KEY PATH", "TYPE", "DTYPE", "SHAPE", "BYTES", "STORED"], rows, right=[4]))
    for name, why in unreadable.items():
        _print(f"\n{name}: not read by ckpt: {why}")
    return 0


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------- verify
def _verify_record(result: VerifyResult) -> dict:
    return {"step": result.step, "path": str(result.path), "ok": result.ok, "leaves": result.leaves,
            "nbytes": result.nbytes, "damaged": [dataclasses.asdict(d) for d in result.damaged],
            "unchecked": result.unchecked}


def verify(directory: storage.Location, step: int | None, *, as_json: bool, local: Path | None = None) -> int:
    """``ckpt verify``: checks DIR's steps (all of them, or ``step``); 1 if any is damaged, else 0. With ``local``
    (see :func:`ls`), every copy on either tier: a step in both is checked twice, each copy named by its path.

    Of every step, one deleted while it is checked (by the garbage collection of a run saving there) is
    reported as gone, not as damaged, and one saved again meanwhile (``overwrite=True``) is checked again;
    ``step`` deleted so raises StepNotFoundError (a missing step).
    The checkpoints in the root that are not its steps are named, not checked (verify each as DIR).
    """
    checkpoints: list[_Step] = []
    every = step is None and (local is not None or not _is_step_dir(directory))
    if every:
        local_steps, local_checkpoints, local_others = ([], [], []) if local is None else _local_tier(directory, local)
        targets, checkpoints, others = _scan(directory)
        if local_steps:  # (a stable sort: a step's durable copy first)
            targets = sorted(targets + local_steps, key=lambda s: s.step)
        checkpoints, others = checkpoints + local_checkpoints, others + local_others
        set_aside = _set_aside(others)
        if not targets:
            raise UsageError(f"no checkpoints in {directory}{_unnumbered(checkpoints)}{_put_back(set_aside)}")
        _note_set_aside(set_aside, "checked")
    elif local is None:
        targets = _select(directory, step)
    else:
        local_steps = _local_tier(directory, local)[0]
        targets = [s for s in [*_scan(directory)[0], *local_steps] if s.step == step]
        if not targets:
            raise UsageError(f"no checkpoint at step {step} in {directory} nor in --local {local}")
    results, gone = [], []
    for target in targets:
        try:
            result = _verify_current(target)
        except StepNotFoundError:
            if not every:
                raise
            gone.append(target)
            if not as_json:
                _print(f"{_named(target.step)}  {target.path}: gone, deleted while it was checked "
                       "(by the garbage collection of a run saving there?)")
            continue
        results.append(result)
        if not as_json:
            status = "ok" if result.ok else f"DAMAGED ({len(result.damaged)})"
            _print(f"{_named(result.step)}  {result.path}: {status}, "
                   f"{result.leaves} leaves, {progress.format_bytes(result.nbytes)} checked")
            for damage in result.damaged:
                _print(f"  {damage.where}: {damage.why}")
            for name, why in result.unchecked.items():
                _print(f"  not checked: {name}: {why}")
    damaged = [r for r in results if not r.ok]
    if as_json:
        _print_json({"ok": not damaged, "steps": [_verify_record(r) for r in results],
                     "gone": [{"step": s.step, "path": str(s.path)} for s in gone],
                     "not_steps": [str(s.path) for s in checkpoints]})
    else:
        if len(targets) > 1:
            print(f"{len(results) - len(damaged)} of {len(results)} steps ok"
                  + (f"; damaged: {[r.step for r in damaged]}" if damaged else "")
                  + (f"; gone while checked: {[s.step for s in gone]}" if gone else ""))
        if checkpoints:
            _print(f"not checked, not steps of {directory} (verify each as DIR): "
                   + ", ".join(s.path.name for s in checkpoints))
    return 1 if damaged else 0


def _verify_current(target: _Step) -> VerifyResult:
    """Verifies a step; one saved again (``overwrite=True``) while it was checked is checked again, once."""
    try:
        return verify_step(target.path, step=target.step)
    except StepReplacedError:
        return verify_step(target.path, step=target.step)


# --------------------------------------------------------------------------------------- convert
def convert_root(source: storage.Location, destination: storage.Location, *, as_json: bool) -> int:
    """``ckpt convert``: one line per step as it is written and checked against its source. The checkpoints
    in the root that are not its steps (named otherwise) are named, not converted."""
    records = []
    try:
        converted = convert.convert_root(source, destination)
    except (CheckpointCorruptedError, InvalidLayoutError):
        raise  # a damaged step: exit status 1
    except ValueError as e:  # not local directories
        raise UsageError(str(e)) from None
    for done in converted:
        records.append({"step": done.step, "path": str(done.path), "leaves": done.leaves, "nbytes": done.nbytes})
        if not as_json:
            print(f"step {done.step} -> {done.path}: {done.leaves} leaves, {progress.format_bytes(done.nbytes)}, "
                  "checked against its source", flush=True)
    _, checkpoints, _ = _scan(source)
    if as_json:
        _print_json({"source": str(source), "destination": str(destination), "steps": records,
                     "not_steps": [str(s.path) for s in checkpoints]})
    else:
        print(f"{len(records)} step{'s' if len(records) != 1 else ''} converted into {destination}")
        if checkpoints:
            _print(f"not converted, not steps of {source} (named otherwise): "
                   + ", ".join(s.path.name for s in checkpoints))
    return 0


# ------------------------------------------------------------------------------------------ main
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line's arguments. A command's options may come anywhere after it (``ckpt show DIR --json
    STEP``): argparse gives an optional positional (STEP) nothing once an option follows DIR, so a command line
    it leaves arguments of is parsed again by the command's own parser, options and positionals intermixed."""
    parser, commands = _parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    argv = sys.argv[1:] if argv is None else list(argv)
    return commands[args.command].parse_intermixed_args(argv[argv.index(args.command) + 1:],
                                                        argparse.Namespace(command=args.command))


@functools.cache
def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``ckpt`` parser, and the parser of each of its commands (made once a process, for a program that
    calls :func:`main` many times: 0.8 of its 1.2 ms a call)."""
    parser = argparse.ArgumentParser(prog="ckpt", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    by_name = {}
    for name, text, has_step in [
        ("ls", "list the steps of a checkpoint root", False),
        ("show", "show the saved trees of a step (default: the latest)", True),
        ("verify", "re-read a step's data and check its checksums (default: every step)", True),
        ("convert", "copy every step of DIR (ckpt's or Orbax's) into the new ckpt root DST, checking each", False),
    ]:
        command = by_name[name] = commands.add_parser(name, help=text, description=text)
        command.add_argument("directory", metavar="DIR",
                             help="a checkpoint root (local)" if name == "convert" else
                             "a checkpoint root or one step directory (local, s3:// or gs://)")
        if has_step:
            command.add_argument("step", type=int, nargs="?", metavar="STEP", help="the step number")
        if name == "convert":
            command.add_argument("destination", metavar="DST", help="a new or empty local directory")
        command.add_argument("--json", action="store_true", help="print JSON instead of tables")
        if name != "convert":
            command.add_argument("--local", metavar="L", help="the local tier of a two-tier Checkpointer whose "
                                 "durable root is DIR: " + {"ls": "list both tiers' steps and where each lives",
                                                            "show": "the step of either tier (a step in both: its "
                                                                    "local copy, which a load reads first)",
                                                            "verify": "check every copy on either tier"}[name])
    return parser, by_name


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``ckpt`` command; returns its exit status (0 ok, 1 damaged data, 2 usage error, 141 when
    the output's reader went away, as a shell reports a command SIGPIPE ended).

    Example::

        main(["ls", "runs/exp1"])           # prints the steps of runs/exp1
        main(["verify", "runs/exp1", "100"])
    """
    args = _parse(argv)
    progress.enable()
    try:
        directory = storage.location(args.directory)
        destination = storage.location(args.destination) if args.command == "convert" else None
        local = tiers.local_directory(args.local) if getattr(args, "local", None) is not None else None
    except ValueError as e:  # an empty path, an unknown URL scheme, a backslash; an object store as the local tier
        _print(f"ckpt: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "ls":
            return ls(directory, as_json=args.json, local=local)
        if args.command == "show":
            return show(directory, args.step, as_json=args.json, local=local)
        if args.command == "convert":
            return convert_root(directory, destination, as_json=args.json)
        return verify(directory, args.step, as_json=args.json, local=local)
    except UsageError as e:
        _print(f"ckpt: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointCorruptedError, InvalidLayoutError) as e:
        _print(f"ckpt: error: {e} (run `ckpt verify` for details)", file=sys.stderr)
        return 1
    except (UnsupportedLayoutError, FileExistsError, FileNotFoundError, DirectoryLockedError) as e:
        _print(f"ckpt: error: {e}", file=sys.stderr)  # (the last: convert's destination has another writer)
        return 2
    except BrokenPipeError:  # the reader went away (`ckpt show DIR | head`): stop quietly, as on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (else the flush at exit raises again)
        return 128 + signal.SIGPIPE
    except OSError as e:  # a directory that cannot be read, an object store refusing or not answering
        _print(f"ckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
