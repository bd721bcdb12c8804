"""The on-disk format: one directory per step, written under a temporary name, fsync'd, manifest last,
renamed atomically; a JSON manifest with checksums; array data that plain tensorstore can read."""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

import ckpt
from ckpt import format as fmt
from ckpt import schema, storage
from ckpt import tree as tree_lib
from ckpt.training import Checkpointer
from ckpt.verify import verify_step
from tests import procs
from tests.fsutil import as_version_1, flip, rewrite_manifest, rewrite_tree, tree_doc

LARGE = (1 << 20) // 4 + 1  # float32 elements: over the packing threshold


def files_below(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------- layout
def test_a_step_is_one_directory_with_manifest_tree_packed_leaves_and_one_array_per_large_leaf(tmp_path):
    state = {"big1": np.ones(LARGE, np.float32), "big2": np.ones((LARGE, 2), np.float32),
             "small": [np.arange(i + 1) for i in range(50)], "n": 3, "name": "x"}
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(7, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fmt.LOCK, "7"]
    step_dir = tmp_path / "7"
    assert sorted(p.name for p in step_dir.iterdir()) == [fmt.MARKER, "arrays", "manifest.json", "packed", "tree.json"]
    assert sorted(p.name for p in (step_dir / "arrays").iterdir()) == ["0", "1"]
    # 50 small arrays and 2 inline values cost the packed array's metadata and one chunk, not a file each
    assert len(files_below(step_dir / "packed")) == 2


def test_a_thousand_small_leaves_take_a_handful_of_files(tmp_path):
    state = {f"layer{i}": {"w": np.ones((8, 8), np.float32), "b": np.zeros(8, np.float32)} for i in range(1000)}
    ckpt.save(tmp_path / "c", state)
    assert len(files_below(tmp_path / "c")) <= 5  # manifest, tree, the packed array's zarr.json and chunk, marker


def test_manifest_is_json_with_version_step_timestamps_metrics_and_the_tree_checksum(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(3, {"w": np.ones(4)}, metrics={"loss": 0.25}, custom_metadata={"epoch": 2})
    step_dir = tmp_path / "3"
    manifest = json.loads((step_dir / "manifest.json").read_bytes())
    assert manifest["format"] == "ckpt" and manifest["version"] == fmt.FORMAT_VERSION
    assert manifest["step"] == 3 and manifest["checkpointables"] == ["state"]
    assert manifest["metrics"] == {"loss": 0.25} and manifest["custom_metadata"] == {"epoch": 2}
    assert 0 < manifest["init_timestamp_nsecs"] <= manifest["commit_timestamp_nsecs"]
    assert manifest["tree_crc32"] == zlib.crc32((step_dir / "tree.json").read_bytes())


def test_non_finite_metrics_and_the_strings_nan_and_inf_both_come_back_as_saved(tmp_path):
    metrics = {"status": "nan", "clip": ["inf", "-inf"], "loss": float("nan"), "best": [float("inf"), -float("inf")]}
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"w": np.ones(2)}, metrics=metrics)
    manifest = json.loads((tmp_path / "0" / fmt.MANIFEST).read_bytes())
    assert manifest["metrics"] == {"status": "nan", "clip": ["inf", "-inf"], "loss": "nan", "best": ["inf", "-inf"]}
    assert manifest["non_finite"] == {"metrics": [["loss"], ["best", 0], ["best", 1]]}
    with Checkpointer(tmp_path) as ckptr:  # a restarted run
        for got in (ckptr.latest.metrics, ckptr.metadata(0).metrics):
            assert got["status"] == "nan" and got["clip"] == ["inf", "-inf"]
            assert math.isnan(got["loss"]) and got["best"] == [math.inf, -math.inf]


def test_a_step_saved_before_non_finite_was_recorded_reads_its_nan_strings_as_floats(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"w": np.ones(2)}, metrics={"loss": float("nan"), "best": float("-inf")})
    rewrite_manifest(tmp_path / "0", lambda manifest: manifest.pop("non_finite"))  # as ckpt wrote it before
    with Checkpointer(tmp_path) as ckptr:
        assert math.isnan(ckptr.latest.metrics["loss"]) and ckptr.latest.metrics["best"] == -math.inf


def test_tree_json_describes_every_leaf_with_dtype_shape_location_and_checksum(tmp_path):
    ckpt.save(tmp_path / "c", {"big": np.ones(LARGE, np.float32), "small": np.arange(3, dtype=np.int16),
                               "bf": np.ones((2, 2), ml_dtypes.bfloat16), "n": 5, "s": "hi"})
    doc = json.loads((tmp_path / "c" / "tree.json").read_bytes())
    leaves = {leaf["path"]: leaf for leaf in entries(doc["checkpointables"]["state"]["leaves"])}
    assert leaves["['big']"]["dtype"] == "float32" and leaves["['big']"]["shape"] == [LARGE]
    big = leaves["['big']"]
    assert big["array"]["metadata"]["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
    chunk_bytes = np.ones(LARGE, np.float32).tobytes()  # one chunk: the leaf is under ARRAY_CHUNK_BYTES
    assert big["chunk_crc32"] == [zlib.crc32(chunk_bytes)]
    assert leaves["['small']"]["dtype"] == "int16" and leaves["['small']"]["packed"][1] == 6
    assert leaves["['small']"]["crc32"] == zlib.crc32(np.arange(3, dtype="<i2").tobytes())
    assert leaves["['bf']"]["dtype"] == "bfloat16"
    assert leaves["['n']"] == {"path": "['n']", "type": "int", "value": 5}
    assert leaves["['s']"]["value"] == "hi"
    assert doc["checkpointables"]["state"]["tree"]["t"] == "dict"


def test_the_fast_extra_computes_the_checksums_and_parses_tree_json_and_steps_saved_without_it_are_the_same(tmp_path):
    """zlib-ng and orjson (the ``fast`` extra, installed with the dev extras) compute every CRC32 and
    parse tree.json when they are there; a process without them falls back to the stdlib's zlib and
    json, and a step either one saves passes the other's verify and load, byte for byte the same."""
    pytest.importorskip("zlib_ng")
    orjson = pytest.importorskip("orjson")
    assert fmt.crc32.__module__ == "zlib_ng.zlib_ng" and schema._fast_loads is orjson.loads
    state = {"big": np.arange(LARGE, dtype=np.float32), "small": [np.arange(i + 1) for i in range(20)], "n": 3}
    ckpt.save(tmp_path / "fast", state)
    without = procs.run_script(
        "import sys, zlib\nsys.modules['zlib_ng'] = sys.modules['orjson'] = None  # as if the extra were not installed\n"
        "import ckpt\nfrom ckpt import format as fmt, schema\nfrom ckpt.verify import verify_step\n"
        "assert fmt.crc32 is zlib.crc32 and schema._fast_loads is None\nassert verify_step(sys.argv[1] + '/fast').ok\n"
        "ckpt.save(sys.argv[1] + '/plain', ckpt.load(sys.argv[1] + '/fast'))\n", str(tmp_path))
    assert without.returncode == 0, without.stderr
    assert verify_step(tmp_path / "plain").ok
    assert (tmp_path / "plain" / fmt.TREE).read_bytes() == (tmp_path / "fast" / fmt.TREE).read_bytes()
    loaded = ckpt.load(tmp_path / "plain")
    assert np.array_equal(loaded["big"], state["big"]) and loaded["small"][19].tolist() == list(range(20))


@pytest.mark.parametrize("state", [
    {"n": 2 ** 70, "m": -(2 ** 70), 2 ** 70: np.arange(3), "x": 1.5},  # orjson reads these integers as floats
    {"\udc80": np.arange(2), "s": "\ud800"},  # lone surrogates, which orjson refuses
    {"deep": functools.reduce(lambda inner, _: {"x": inner}, range(schema._FAST_LEVELS), np.arange(2))},
], ids=["integers past 64 bits", "lone surrogates", "a tree nested deeper than orjson is trusted with"])
def test_a_tree_json_that_orjson_reads_otherwise_is_read_by_json(tmp_path, monkeypatch, state):
    """orjson parses tree.json first; where it refuses the text, reads it otherwise (its check then
    fails) or finds a tree nested deeper than it is trusted with, json reads it again, so that a step
    loads the same with the fast extra as without."""
    orjson = pytest.importorskip("orjson")
    ckpt.save(tmp_path / "s", state)
    parsed = []
    monkeypatch.setattr(schema, "_fast_loads", lambda data: parsed.append("orjson") or orjson.loads(data))
    real_parse = schema._parse
    monkeypatch.setattr(schema, "_parse", lambda d, path, data: parsed.append(Path(path).name) or real_parse(d, path, data))
    loaded = ckpt.load(tmp_path / "s")
    assert parsed == [fmt.MANIFEST, "orjson", fmt.TREE]
    assert list(loaded) == list(state)
    assert tree_lib.keystrs([p for p, _ in tree_lib.flatten(loaded)[1]]) == tree_lib.keystrs(
        [p for p, _ in tree_lib.flatten(state)[1]])
    for (_, got), (path, want) in zip(tree_lib.flatten(loaded)[1], tree_lib.flatten(state)[1]):
        assert type(got) is type(want) and np.array_equal(got, want), path
    parsed.clear()
    ckpt.save(tmp_path / "plain", {"a": np.arange(3), "n": 2 ** 62})
    assert ckpt.load(tmp_path / "plain")["n"] == 2 ** 62 and parsed == [fmt.MANIFEST, "orjson"]


def test_a_step_of_a_newer_format_version_says_a_newer_ckpt_wrote_it(tmp_path):
    ckpt.save(tmp_path / "c", {"a": 1})
    manifest = json.loads((tmp_path / "c" / fmt.MANIFEST).read_bytes())
    del manifest["manifest_crc32"]
    for version, says in ((max(fmt.READ_VERSIONS) + 1, r"version 3; this ckpt reads versions 1, 2: a newer ckpt wrote "
                                                        r"it, upgrade ckpt to read it"), (0, r"version 0; this .*2$")):
        (tmp_path / "c" / fmt.MANIFEST).write_bytes(fmt.sealed_manifest({**manifest, "version": version}))
        with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=says):
            ckpt.load(tmp_path / "c")


def test_a_step_of_format_version_1_is_listed_loaded_verified_and_checked_as_before(tmp_path):
    """Steps saved before format version 2 (each leaf entry one object) are read as they were."""
    state = {"big": np.arange(LARGE, dtype=np.float32), "small": np.arange(3, dtype=np.int16), "n": 5, "s": "hi",
             "z": np.float32(2.0), "nested": {"a": np.ones((2, 3)), "e": np.zeros((0, 4))}, "none": None}
    with Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save(1, state)
        ckptr.save(2, state)
    old = tmp_path / "run" / "1"
    as_version_1(old)
    assert json.loads((old / fmt.MANIFEST).read_bytes())["version"] == 1
    assert type(json.loads((old / fmt.TREE).read_bytes())["checkpointables"]["state"]["leaves"]) is list
    with Checkpointer(tmp_path / "run") as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [1, 2]
        for abstract in (None, state):
            got, want = tree_lib.flatten(ckptr.load(1, abstract))[1], tree_lib.flatten(ckptr.load(2, abstract))[1]
            assert [path for path, _ in got] == [path for path, _ in want]
            for (path, a), (_, b) in zip(got, want):
                assert type(a) is type(b) and (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), path
        assert str(ckptr.metadata(1).metadata) == str(ckptr.metadata(2).metadata)
    assert verify_step(old).ok
    offset = next(leaf["packed"][0] for leaf in tree_doc(old)["checkpointables"]["state"]["leaves"]
                  if leaf["path"] == "['small']")
    flip(old / fmt.PACKED / "c" / "0", offset)
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=re.escape("state['small']")):
        ckpt.load(old)
    assert [d.where for d in verify_step(old).damaged] == ["state['small']"]


# ------------------------------------------------------------------- readable without ckpt
def entries(table: dict) -> list[dict]:
    """The leaf table of tree.json as one dict per leaf, as docs/format.md reads it."""
    leaves = []
    for row in zip(*table.values()):
        fields = dict(zip(table, row))
        more = fields.pop("more") or {}
        leaves.append({**{key: value for key, value in fields.items() if value is not None}, **more})
    return leaves


def read_with_tensorstore(step_dir: Path, name: str = "state") -> dict[str, object]:
    """Every leaf of a step read with tensorstore, json and numpy only, following tree.json."""
    doc = json.loads((step_dir / "tree.json").read_bytes())

    def absolute(spec: dict) -> dict:
        return {**spec, "kvstore": {**spec["kvstore"], "path": str(step_dir / spec["kvstore"]["path"])}}

    def dtype(name: str) -> np.dtype:
        return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)

    packed = ts.open(absolute(doc["packed"]["spec"])).result().read().result() if "packed" in doc else None
    out = {}
    for leaf in entries(doc["checkpointables"][name]["leaves"]):
        if "value" in leaf:
            out[leaf["path"]] = leaf["value"]
        elif "array" in leaf:
            data = ts.open(absolute(leaf["array"])).result().read().result()
            if leaf.get("stored_as") == "bytes":  # a dtype zarr3 lacks: raw little-endian bytes
                data = data.view(dtype(leaf["dtype"])).reshape(leaf["shape"])
            out[leaf["path"]] = data
        else:
            offset, nbytes = leaf["packed"]
            raw = packed[offset: offset + nbytes]
            assert zlib.crc32(raw.tobytes()) == leaf["crc32"], leaf["path"]
            out[leaf["path"]] = raw.view(dtype(leaf["dtype"])).reshape(leaf["shape"])
    return out


def test_plain_tensorstore_reads_every_leaf_from_the_manifest_alone(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "f32": rng.standard_normal((LARGE // 4, 4), np.float32),
        "bf16": rng.standard_normal(LARGE).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal(LARGE * 4).astype(ml_dtypes.float8_e4m3fn),
        "int4": rng.integers(-8, 8, LARGE * 4).astype(ml_dtypes.int4),
        "c128": rng.standard_normal(LARGE // 4) * 1j,
        "strings": np.array(["ab", "cde"] * (LARGE // 4)),  # a dtype zarr3 lacks: stored as raw bytes
        "small_f64": rng.standard_normal((3, 5)),
        "small_bf16": np.arange(7).astype(ml_dtypes.bfloat16),
        "small_bool": np.array([True, False, True]),
        "zero_d": np.array(4, np.int8),
        "empty": np.zeros((0, 2), np.float32),
        "count": 11,
    }
    ckpt.save(tmp_path / "c", state)
    got = read_with_tensorstore(tmp_path / "c")
    assert set(got) == {f"['{key}']" for key in state}
    for key, value in state.items():
        leaf = got[f"['{key}']"]
        if isinstance(value, np.ndarray):
            assert leaf.dtype == value.dtype and leaf.shape == value.shape, key
            assert leaf.tobytes() == value.tobytes(), key
        else:
            assert leaf == value


def test_a_reader_without_ckpt_installed_reads_the_arrays(tmp_path):
    ckpt.save(tmp_path / "c", {"w": np.arange(LARGE, dtype=np.float32), "b": np.arange(5.0)})
    script = f"""
import sys
sys.modules["ckpt"] = None  # importing ckpt now fails
import json, numpy as np, tensorstore as ts
{inspect.getsource(entries)}
step = {str(tmp_path / 'c')!r}
doc = json.load(open(step + "/tree.json"))
leaves = {{leaf["path"]: leaf for leaf in entries(doc["checkpointables"]["state"]["leaves"])}}
spec = leaves["['w']"]["array"]
spec["kvstore"]["path"] = step + "/" + spec["kvstore"]["path"]
w = ts.open(spec).result().read().result()
assert np.array_equal(w, np.arange({LARGE}, dtype=np.float32))
packed = doc["packed"]["spec"]
packed["kvstore"]["path"] = step + "/" + packed["kvstore"]["path"]
offset, nbytes = leaves["['b']"]["packed"]
b = ts.open(packed).result()[offset: offset + nbytes].read().result().view(leaves["['b']"]["dtype"])
assert np.array_equal(b, np.arange(5.0))
print("READ-OK")
"""
    result = procs.run_script(script, timeout=60)
    assert result.returncode == 0 and "READ-OK" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------ write protocol
def test_a_step_being_written_has_a_temporary_name_and_is_not_listed(tmp_path, monkeypatch):
    seen = {}
    write_file = storage.write_file

    def spy(path: Path, data: bytes, **kwargs):
        if path.name == fmt.MANIFEST:
            seen["dirs"] = sorted(p.name for p in tmp_path.iterdir())
            reader = Checkpointer(tmp_path)
            seen["listed"] = [c.step for c in reader.checkpoints]
            reader.close()
        return write_file(path, data, **kwargs)

    monkeypatch.setattr(storage, "write_file", spy)
    with Checkpointer(tmp_path) as ckptr:
        ckptr.save(0, {"w": np.ones(LARGE, np.float32)})
    assert seen["dirs"] == [fmt.LOCK, "0" + fmt.TMP_SUFFIX]
    assert seen["listed"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [fmt.LOCK, "0"]


def test_the_tensorstore_context_fsyncs_data_files():
    assert storage.ts_context().spec.to_json()["file_io_sync"] is True


def _strace_events(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """(syscall, paths) of the successful calls in ``strace -f -y`` output, in completion order."""
    pending, events = {}, []
    for line in text.splitlines():
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
            continue
        resumed = re.match(r"<\.\.\. \w+ resumed>(.*)$", rest)
        if resumed:
            rest = pending.pop(pid, "") + resumed.group(1)
        call = re.match(r"(\w+)\((.*)\)\s+=\s+(-?\d+)", rest)
        if not call or int(call.group(3)) < 0:
            continue
        name, args = call.group(1), call.group(2)
        if name in ("fsync", "fdatasync"):
            paths = tuple(re.findall(r"^\d+<([^>]*)>", args))
        else:
            paths = tuple(re.findall(r'"([^"]*)"', args))
        events.append((name, paths))
    return events


SAVE_ONE_STEP = """
import sys, numpy as np, ckpt
with ckpt.Checkpointer(sys.argv[1]) as ckptr:
    ckptr.save(0, {"big": np.ones((1 << 20) // 4 + 1, np.float32), "small": np.arange(10), "n": 1})
"""


def test_every_file_and_directory_is_fsynced_before_the_manifest_and_the_rename_then_the_root(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    root = Path(os.path.realpath(tmp_path)) / "root"
    trace = tmp_path / "trace.txt"
    cmd = ["strace", "-f", "-y", "-qq", "-s", "1024", "-o", str(trace),
           "-e", "trace=fsync,fdatasync,openat,rename,renameat,renameat2",
           sys.executable, "-c", SAVE_ONE_STEP, str(root)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=procs.env())
    if result.returncode != 0 and "ptrace" in result.stderr.lower():
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    events = _strace_events(trace.read_text())
    tmp, final = str(root / ("0" + fmt.TMP_SUFFIX)), str(root / "0")

    committed = next(i for i, (name, paths) in enumerate(events)  # rename, or renameat2 with RENAME_NOREPLACE
                     if name.startswith("rename") and paths == (tmp, final))
    synced: dict[str, int] = {}  # path -> index of the event after which its data is durable
    for i, (name, paths) in enumerate(events[:committed]):
        if name in ("fsync", "fdatasync"):
            synced.setdefault(paths[0], i)
        elif name.startswith("rename") and paths[0] in synced:
            synced[paths[1]] = i  # tensorstore fsyncs a temporary file, then renames it into place
    manifest_created = next(i for i, (name, paths) in enumerate(events)
                            if name == "openat" and paths == (tmp + "/" + fmt.MANIFEST,))

    step_files = [p for p in (root / "0").rglob("*") if p.is_file()]
    assert len(step_files) >= 6
    for path in step_files:
        rel = str(path.relative_to(root / "0"))
        assert tmp + "/" + rel in synced, f"{rel} was not fsynced before the commit"
        if rel != fmt.MANIFEST:
            assert synced[tmp + "/" + rel] < manifest_created, f"{rel} was written after the manifest"
    for directory in [root / "0", *(p for p in (root / "0").rglob("*") if p.is_dir())]:
        rel = str(directory.relative_to(root / "0"))
        path = tmp if rel == "." else tmp + "/" + rel
        assert any(e == ("fsync", (path,)) for e in events[manifest_created:committed]), \
            f"directory {rel} was not fsynced between the manifest and the rename"
    assert ("fsync", (str(root),)) in events[committed + 1:], "the root was not fsynced after the rename"


# ------------------------------------------------------- a table of packed leaves, read column by column
PACKED_ONLY = {"f": np.arange(7, dtype=np.float32), "i": np.arange(6, dtype=np.int64).reshape(2, 3),
               "zero_d": np.array(2.5, np.float64), "empty": np.zeros((0, 4), np.int16),
               "odd": np.array([b"abc", b"de"], "S3"), "odd_0d": np.array(b"xyz", "S3"),
               "h": np.arange(5, dtype=ml_dtypes.bfloat16),
               "nested": {"b": np.array([True, False]), "u": np.arange(3, dtype=np.uint8)}}


def test_a_table_of_packed_leaves_loads_each_leaf_as_a_view_of_its_dtype_and_shape(tmp_path):
    """Every leaf packed: the schema checks the table column by column and the load views the read buffer
    by its offsets; 0-d, empty, 2-d, a string dtype whose size does not divide the alignment."""
    ckpt.save(tmp_path / "c", PACKED_ONLY)
    doc = json.loads((tmp_path / "c" / fmt.TREE).read_bytes())
    assert None not in doc["checkpointables"]["state"]["leaves"]["packed"]  # (every leaf is packed)
    saved = dict(tree_lib.flatten(PACKED_ONLY)[1])
    partial = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
    reordered = dict(reversed(PACKED_ONLY.items()))  # (each abstract leaf receives saved leaf order[j])
    for abstract, context in ((None, ckpt.Context()), (PACKED_ONLY, ckpt.Context()), (reordered, ckpt.Context()),
                              ({**PACKED_ONLY, "f": ckpt.PLACEHOLDER}, ckpt.Context()),
                              ({"nested": PACKED_ONLY["nested"]}, partial)):
        with context:
            loaded = dict(tree_lib.flatten(ckpt.load(tmp_path / "c", abstract))[1])
        assert loaded.keys() == (saved.keys() if abstract is None else dict(tree_lib.flatten(abstract)[1]).keys())
        for path, got in loaded.items():
            want = saved[path]
            if got is ckpt.PLACEHOLDER:
                continue
            assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape, path
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("field, value", [
    ("packed", [(1 << 63) - 64, 28]), ("packed", [1 << 64, 28]), ("packed", [32, 28]), ("packed", [0, 24]),
    ("packed", [0, True]), ("shape", [7.0]), ("shape", [True]), ("shape", [-7]), ("shape", {}), ("shape", [1 << 61]),
    ("shape", [1 << 40, 1 << 40]), ("crc32", 1 << 32), ("crc32", -1), ("dtype", "object"), ("type", "pickle")])
def test_a_forged_field_in_a_table_of_packed_leaves_is_refused_naming_the_leaf(tmp_path, field, value):
    ckpt.save(tmp_path / "c", PACKED_ONLY)

    def forge(doc: dict) -> None:
        entry = next(e for e in doc["checkpointables"]["state"]["leaves"] if e["path"] == "['f']")
        entry[field] = value
    rewrite_tree(tmp_path / "c", forge)
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=re.escape("['f']")):
        ckpt.load(tmp_path / "c", PACKED_ONLY)
