"""Every field of a step's JSON files forged in turn: each reader refuses the step with a ckpt error
naming it, or reads it; for a ckpt step, ``verify`` is at least as strict as a load.

test_hostile.py forges what an attacker would aim at, by hand. This sweep forges everything else: each
position of a JSON file of a sound step gets each of ``VALUES`` (wrong types, negative and huge numbers,
NaN, empty and nested containers, names ckpt itself uses), is deleted, is duplicated (in a list), or
gains a member (in an object); for a ckpt step every checksum is then recomputed, as a forger would.
The files: a ckpt step's tree.json (in format versions 2 and 1) and manifest.json (a state with packed,
large, inline, 0-d, bytes and nested leaves), and the JSON files of Orbax steps in two layouts (OCDBT and
zarr3; one directory per array in zarr v2: one ``.zarray`` of them), which no checksum seals. Each
forgery is read by ``ckpt.load`` (for a ckpt step also into the abstract tree), ``ckpt.metadata``,
``verify_step`` and ``ckpt show``, in two children forked from a clean interpreter (every other forgery
each), under a memory cap and a time limit per forgery.

What must hold for each: every outcome is success or a ckpt error whose message names the step. For a
ckpt step also: a step that ``verify`` passes loads and its metadata reads, and a load that finds damage
is reported by ``verify`` as well (which is stricter: it also checks the CRC32s a load does not read).
An Orbax step has no such pact: ``verify`` reads its arrays, while a load also needs, say, its items'
handlers and a PRNG implementation jax knows.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import os
import resource
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import ckpt
from ckpt import cli, errors
from ckpt import format as fmt
from ckpt.verify import verify_step
from tests import procs
from tests.fsutil import as_version_1, rewrite_tree, seal_manifest, write_tree

Point = collections.namedtuple("Point", "x y")
STATE = {"big": np.arange(140_000, dtype=np.float64), "s": np.arange(3.0, dtype=np.float32), "t": np.arange(5),
         "n": 7, "f": 0.5, "str": "hi", "b": True, "none": None, "z": np.float32(2.0), "by": b"abc",
         "l": [np.zeros((2, 3), np.int16), (np.ones(1, np.uint8),)], "nt": Point(np.arange(2), 3), "e": {}}
VALUES = [None, True, False, -1, 0, 1, 2**31, 2**64, 2**100, 1.5, float("nan"), "x", "", "nan", "float32", "leaf",
          [], {}, [0], [[]], [-1, 2], [0, 2**63], ["key", "x"], {"a": 1}]
FEWER_VALUES = [None, -1, 2**31, 2**64, "x", [], {}]  # for Orbax steps, whose every forgery opens each array
# Orbax steps (tests/orbax_writer.py): the run and step, the checkpointable a load asks for
ORBAX_STEPS = {"v1 (OCDBT, zarr3)": ("v1/0", "state"), "v0 named items (zarr v2, no OCDBT)": ("named/7", "model"),
               "a tree saved at a path of its own": ("direct/3", "state")}
MEMORY_CAP = 3 << 30  # RLIMIT_AS of the child
SECONDS_PER_FORGERY = 20
SWEEP_TIMEOUT_SECS = 900
PARTS = 2  # children that share a sweep, each reading every other forgery: the two cores of a CI runner


def positions(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every position in a JSON document: the keys and indices that lead to it."""
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from positions(child, (*path, key))


def at(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def forgeries(doc: Any, values: list) -> Iterator[tuple[str, Callable[[Any], None]]]:
    """(what, how) for every forgery of ``doc``: ``how`` changes a copy of it in place."""
    for path in positions(doc):
        if not path:
            continue
        where, key = path[:-1], path[-1]
        for value in values:
            yield f"{list(path)} = {value!r}", lambda d, where=where, key=key, value=value: at(d, where).__setitem__(key, value)
        yield f"{list(path)} deleted", lambda d, where=where, key=key: at(d, where).pop(key)
        if isinstance(key, int):
            yield f"{list(path)} twice", lambda d, where=where, key=key: at(d, where).insert(key, copy.deepcopy(at(d, where)[key]))
        if isinstance(at(doc, path), dict):
            yield f"{list(path)} + a member", lambda d, path=path: at(d, path).__setitem__("zz", 1)


def outcome(step: Path, read: Callable[[], Any]) -> str:
    """"ok", "ckpt" (a ckpt error that names the step), or what is wrong."""
    try:
        read()
        return "ok"
    except TimeoutError:
        raise
    except Exception as e:  # whatever it is, the sweep judges it
        if type(e).__module__ == "ckpt.errors":
            return "ckpt" if str(step) in str(e) else f"{type(e).__name__} without the step's name: {e}"
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return f"{type(e).__name__} ({frame.filename}:{frame.lineno}): {e}"


def _verify(step: Path) -> None:
    damaged = verify_step(step).damaged
    if damaged:
        raise errors.CheckpointCorruptedError(f"{step}: {damaged[0].where}: {damaged[0].why}", path=step)


def _show(step: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(["show", str(step)])
    if status not in (0, 1, 2) or (status and str(step) not in out.getvalue()):
        raise AssertionError(f"ckpt show exits with {status}: {out.getvalue()[-300:]}")


def _timeout(*_: Any) -> None:
    raise TimeoutError


def _read(path: Path) -> Any:
    data = path.read_bytes()
    return json.loads(data[: data.rindex(b',"manifest_crc32"')] + b"}" if path.name == fmt.MANIFEST else data)


def _write(step: Path, name: str, doc: Any) -> None:
    """Writes a forged JSON file into ``step``, with every checksum of a ckpt step recomputed."""
    if name == fmt.TREE:
        write_tree(step, json.dumps(doc).encode())
    elif name == fmt.MANIFEST:
        seal_manifest(step, json.dumps(doc, separators=(",", ":")).encode())
    else:
        (step / name).write_text(json.dumps(doc))


def _entries(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry below ``directory``: path -> (size, mtime in ns)."""
    out = {}
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            found = os.lstat(path := os.path.join(parent, name))
            out[path] = (found.st_size, found.st_mtime_ns)
    return out


def _forge(sound: Path, step: Path, file: str, doc: Any,
           left: dict[str, tuple[int, int]] | None) -> dict[str, tuple[int, int]]:
    """Makes ``step`` the sound step with ``file`` forged into ``doc``; returns its entries then. The step
    is copied afresh when there is none yet (``left`` None) or a reader changed it since the last forgery
    (``left``: its entries after that one); else only the files a forgery writes get their sound bytes
    back before it writes them."""
    if left is None or _entries(step) != left:
        shutil.rmtree(step, ignore_errors=True)
        shutil.copytree(sound, step)
    for written in {file, fmt.MANIFEST} if file == fmt.TREE else {file}:  # (a new tree.json reseals the manifest)
        shutil.copyfile(sound / written, step / written)
    _write(step, file, doc)
    return _entries(step)


def sweep(sound: str, files: list[str], name: str | None, part: int, conn: Any) -> None:
    """The child: its ``part`` of the forgeries of ``files`` (every PARTS-th, from the ``part``-th; the files
    relative to step ``sound``; a ckpt step when ``name`` is None, else an Orbax step whose checkpointable
    ``name`` a load asks for), each in a step directory of its own; sends (forgeries, problems)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _timeout)
    sound_dir = Path(sound)
    step, current = sound_dir.parent / f"forged{part}", sound_dir.parent / f"current{part}"
    left, index = None, -1
    readers = ({"load": lambda: ckpt.load(step), "load into STATE": lambda: ckpt.load(step, STATE),
                "metadata": lambda: ckpt.metadata(step)} if name is None else
               {"load": lambda: ckpt.load(step, checkpointable_name=name), "metadata": lambda: ckpt.metadata(step, name)})
    readers.update({"verify": lambda: _verify(step), "ckpt show": lambda: _show(step)})
    count, problems = 0, []
    for file in files:
        doc = _read(sound_dir / file)
        for what, forge in forgeries(doc, VALUES if name is None else FEWER_VALUES):
            index += 1
            if index % PARTS != part:
                continue
            forged = copy.deepcopy(doc)
            forge(forged)
            left = _forge(sound_dir, step, file, forged, left)
            count += 1
            what = f"{file} {what}"
            current.write_text(what)  # what the parent names if this child dies
            signal.alarm(SECONDS_PER_FORGERY)
            try:
                found = {reader: outcome(step, read) for reader, read in readers.items()}
            except TimeoutError:
                problems.append(f"{what}: a reader ran over {SECONDS_PER_FORGERY} s")
                continue
            finally:
                signal.alarm(0)
            problems += [f"{what}: {reader}: {result}" for reader, result in found.items() if result not in ("ok", "ckpt")]
            if name is None and found["verify"] == "ok" and not found["load"] == found["metadata"] == "ok":
                problems.append(f"{what}: verify passes, but load is {found['load']}, metadata {found['metadata']}")
            if name is None and found["load"] == "ckpt" and found["verify"] == "ok":
                problems.append(f"{what}: the load finds damage that verify does not")
    conn.send_bytes(json.dumps([count, problems]).encode())


def run_sweep(sound: Path, files: list[str], name: str | None) -> tuple[int, list[str]]:
    """Every forgery of ``files`` (see :func:`sweep`), shared by PARTS children at once; returns (forgeries,
    problems)."""
    ctx = procs.forkserver(__name__)
    children = []
    for part in range(PARTS):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=sweep, args=(str(sound), files, name, part, send), daemon=True)
        child.start()
        send.close()
        children.append((child, receive))
    deadline = time.monotonic() + SWEEP_TIMEOUT_SECS
    count, problems = 0, []
    try:
        for part, (child, receive) in enumerate(children):
            assert receive.poll(max(0.0, deadline - time.monotonic())), \
                f"the sweep of {files} ran over {SWEEP_TIMEOUT_SECS} s"
            try:
                done, found = json.loads(receive.recv_bytes())
            except EOFError:
                child.join(10)
                current = sound.parent / f"current{part}"
                raise AssertionError(f"the sweep's child died (exit code {child.exitcode}) at "
                                     f"{current.read_text() if current.exists() else 'its start'}") from None
            count, problems = count + done, problems + found
    finally:
        for child, _ in children:
            child.kill()
            child.join()
    return count, problems


@pytest.mark.parametrize("file, version, least", [(fmt.TREE, fmt.FORMAT_VERSION, 5000), (fmt.TREE, 1, 5000),
                                                  (fmt.MANIFEST, fmt.FORMAT_VERSION, 250)])
def test_every_field_of_a_ckpt_step_forged_is_refused_with_a_ckpt_error_or_read_and_verify_is_as_strict_as_a_load(
        tmp_path, file, version, least):
    """Format version 1 too (a leaf table as one object per leaf), which steps saved before still hold."""
    ckpt.save(tmp_path / "sound", STATE)
    if version == 1:
        as_version_1(tmp_path / "sound")
    count, problems = run_sweep(tmp_path / "sound", [file], None)
    assert count >= least, f"only {count} forgeries of {file}"
    assert not problems, f"{len(problems)} of {count} forgeries of {file}:\n  " + "\n  ".join(problems[:20])


@pytest.mark.parametrize("layout", list(ORBAX_STEPS))
def test_every_field_of_an_orbax_step_forged_is_refused_with_a_ckpt_error_or_read(orbax_runs, tmp_path, layout):
    step, name = ORBAX_STEPS[layout]
    sound = Path(shutil.copytree(orbax_runs / step, tmp_path / "sound"))
    files, arrays = [], {}  # the JSON files, and the arrays' metadata (all alike: one of them is forged)
    for path in sorted(p for p in sound.rglob("*") if p.is_file()):
        with contextlib.suppress(ValueError):
            doc = json.loads(path.read_bytes())
            if path.name in (".zarray", "zarr.json"):
                arrays[str(path.relative_to(sound))] = len(doc.get("shape", []))
            else:
                files.append(str(path.relative_to(sound)))
    if arrays:
        files.append(max(arrays, key=arrays.get))  # one of the most dimensions
    item_metadata = f"{name}/_METADATA" if (sound / name).is_dir() else "_METADATA"  # (an item may be the step)
    assert "_CHECKPOINT_METADATA" in files and item_metadata in files
    count, problems = run_sweep(sound, files, name)
    assert count >= 2000, f"only {count} forgeries of {files}"
    assert not problems, f"{len(problems)} of {count} forgeries of {layout}:\n  " + "\n  ".join(problems[:20])


@pytest.mark.parametrize("forge, why", [
    (lambda key: key.update(impl="x"), "jax refuses its key data"),
    (lambda key: key.update(impl="rbg"), "jax refuses its key data"),  # 4 words a key, not threefry's 2
    (lambda key: key.update(dtype="float32"), "not uint32"),
])
def test_a_forged_prng_key_is_refused_naming_its_leaf(tmp_path, forge, why):
    jax = pytest.importorskip("jax")
    step = tmp_path / "step"
    ckpt.save(step, {"rng": jax.random.key(0), "w": np.ones(3)})
    rewrite_tree(step, lambda tree: forge(next(m for m in tree["checkpointables"]["state"]["leaves"]
                                               if m["path"] == "['rng']")))
    with pytest.raises(errors.CheckpointCorruptedError, match=why) as caught:
        ckpt.load(step)
    assert str(step) in str(caught.value) and caught.value.key_paths == ("state['rng']",)


def test_a_pytree_node_whose_keys_are_null_reads_as_one_without_keys(tmp_path):
    """The schema takes a null 'k' for none (a pytree node's children keyed by position); reading the
    structure raised TypeError ('NoneType' object is not iterable) from every reader."""
    flax_core = pytest.importorskip("flax.core")
    step = tmp_path / "step"
    ckpt.save(step, {"params": flax_core.FrozenDict({"w": np.ones(3)}), "n": 1})
    rewrite_tree(step, lambda tree: tree["checkpointables"]["state"]["tree"]["c"][0].update(k=None))
    assert ckpt.load(step)["params"][0].tolist() == [1, 1, 1]
    assert ckpt.metadata(step).metadata["params"][0].shape == (3,) and not verify_step(step).damaged
