"""The ``ckpt`` command (ls, show, verify), the verification in ckpt.verify, and progress reporting."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import ckpt
from ckpt import cli, convert, progress, storage
from ckpt import root as root_lib
from ckpt import format as fmt
from ckpt.objectstore import ObjectPath
from ckpt.verify import verify_step
from tests import procs
from tests.test_custom_checkpointables import Counter, Vocab, registry_context
from tests.fsutil import rewrite_tree, tree_doc


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Runs ``ckpt ARGV`` in this process; returns the exit status, stdout and stderr."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def leaf_entry(step_dir: Path | ObjectPath, key_path: str, name: str = "state") -> dict:
    return next(m for m in tree_doc(step_dir)["checkpointables"][name]["leaves"] if m["path"] == key_path)


@pytest.fixture
def root(tmp_path) -> Path:
    """A root with steps 0, 10 and 20: a large leaf (its own array), small packed leaves, inline leaves."""
    rng = np.random.default_rng(0)
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        for step in (0, 10, 20):
            state = {"params": {"w": rng.standard_normal((512, 600), dtype=np.float32), "b": np.arange(8.0)},
                     "step": step, "name": "mlp"}
            ckptr.save(step, state, force=True, metrics={"loss": 1.0 / (step + 1)})
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------------ ls
def test_ls_lists_every_step_with_metrics_and_marks_the_latest(root, capsys):
    status, out, _ = run_cli(capsys, "ls", root)
    assert status == 0
    lines = out.splitlines()
    assert "3 checkpoints, latest step 20" in lines[0]
    rows = {line.lstrip("* ").split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"0", "10", "20"}
    assert rows["20"].startswith("* 20") and "loss=0.047619" in rows["20"]
    assert "loss=1" in rows["0"] and not rows["0"].startswith("*")


def test_ls_and_show_print_a_nan_metric_as_a_number_and_a_string_metric_quoted(tmp_path, capsys):
    """A NaN loss was printed as the string the manifest stores it as, as a metric that is a string is."""
    with ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save(1, {"w": np.ones(2)}, metrics={"loss": float("nan"), "best": float("-inf"), "note": "nan"},
                   custom_metadata={"lr": float("inf")})
    row = run_cli(capsys, "ls", tmp_path)[1].splitlines()[2]
    assert row.endswith('loss=nan best=-inf note="nan"'), row
    out = run_cli(capsys, "show", tmp_path)[1]
    assert 'metrics: loss=nan best=-inf note="nan"' in out and 'custom metadata: {"lr": "inf"}' in out


def test_ls_json_reports_steps_sizes_times_metrics_and_temporaries(root, capsys):
    (root / ("30" + fmt.TMP_SUFFIX)).mkdir()
    (root / ("30" + fmt.TMP_SUFFIX) / fmt.MARKER).write_bytes(b"")
    (root / ("30" + fmt.TMP_SUFFIX) / "partial").write_bytes(b"x" * 1000)
    status, out, _ = run_cli(capsys, "ls", root, "--json")
    listing = json.loads(out)
    assert status == 0
    assert listing["latest"] == 20
    assert [s["step"] for s in listing["steps"]] == [0, 10, 20]
    assert [s["latest"] for s in listing["steps"]] == [False, False, True]
    assert all(s["disk_bytes"] >= s["nbytes"] >= 512 * 600 * 4 for s in listing["steps"])
    assert listing["steps"][1]["metrics"] == {"loss": 1.0 / 11}
    assert listing["steps"][0]["time"].endswith("+00:00")
    assert listing["temporaries"] == [{"path": str(root / ("30" + fmt.TMP_SUFFIX)), "disk_bytes": 1000}]
    assert listing["foreign"] == []


def test_ls_shows_entries_ckpt_did_not_write_apart_and_follows_no_link(root, tmp_path, capsys):
    (root / ("40" + fmt.TMP_SUFFIX)).mkdir()
    (root / ("40" + fmt.TMP_SUFFIX) / "notes.txt").write_text("a user's")
    other = tmp_path / "other"
    shutil.copytree(root / "20", other / "20")
    (root / "50").symlink_to(other / "20")
    status, out, _ = run_cli(capsys, "ls", root, "--json")
    listing = json.loads(out)
    assert status == 0 and [s["step"] for s in listing["steps"]] == [0, 10, 20] and listing["temporaries"] == []
    assert {Path(f["path"]).name: f["holds"] for f in listing["foreign"]} == {
        "40" + fmt.TMP_SUFFIX: "a directory holding 'notes.txt'",
        "50": f"a symbolic link to {str(other / '20')!r}"}
    _, out, _ = run_cli(capsys, "ls", root)
    assert "2 entries ckpt did not write" in out and "temporar" not in out


def test_ls_shows_leftover_temporaries_in_the_table(root, capsys):
    (root / ("30" + fmt.TMP_SUFFIX)).mkdir()
    _, out, _ = run_cli(capsys, "ls", root)
    assert "1 temporary" in out and "30" + fmt.TMP_SUFFIX in out


def test_ls_names_a_step_a_crash_left_set_aside_as_one_to_put_back_not_a_temporary_to_remove(root, capsys):
    """A commit with overwrite=True killed between its two renames (no atomic exchange) leaves step 20 as
    20.ckpt-replaced, which the next Checkpointer puts back: ls called it a temporary that
    cleanup_tmp_directories=True removes."""
    os.rename(root / "20", root / ("20" + fmt.REPLACED_SUFFIX))  # as the crash leaves it (marked, as every step)
    _, out, _ = run_cli(capsys, "ls", root)
    assert "temporar" not in out and "1 step set aside by a save with overwrite=True that a crash interrupted" in out
    assert re.search(r"20\.ckpt-replaced +20 ", out)
    listing = json.loads(run_cli(capsys, "ls", root, "--json")[1])
    assert listing["temporaries"] == [] and [(Path(t["path"]).name, t["name"]) for t in listing["set_aside"]] == [
        ("20" + fmt.REPLACED_SUFFIX, "20")]
    with ckpt.Checkpointer(root) as ckptr:
        assert ckptr.latest.step == 20


def test_ls_finds_steps_of_any_name_format(tmp_path, capsys):
    name_format = ckpt.path.step.standard_name_format(step_prefix="step", step_format_fixed_length=4)
    with ckpt.Checkpointer(tmp_path, step_name_format=name_format) as ckptr:
        ckptr.save(7, {"x": np.ones(3)}, force=True)
    _, out, _ = run_cli(capsys, "ls", tmp_path, "--json")
    assert [(s["step"], Path(s["path"]).name) for s in json.loads(out)["steps"]] == [(7, "step_0007")]


def test_ls_names_a_checkpoint_without_a_step_by_its_directory(root, capsys):
    ckpt.save(root / "exported", {"w": np.ones(3)})  # ckpt.save's checkpoint, kept beside the steps
    _, out, _ = run_cli(capsys, "ls", root)
    assert "4 checkpoints, latest step 20" in out
    assert out.splitlines()[-1].split()[0] == "exported/"
    status, _, err = run_cli(capsys, "show", root, "5")
    assert status == 2 and "(steps: [0, 10, 20]); checkpoints without a step, to name as DIR: " in err
    assert err.rstrip().endswith(str(root / "exported"))
    status, out, _ = run_cli(capsys, "show", root / "exported")
    assert status == 0 and out.startswith(f"checkpoint  {root / 'exported'}")


def test_ls_and_verify_report_a_step_whose_manifest_is_damaged(root, capsys):
    flip_byte(root / "20" / fmt.MANIFEST, 30)
    _, out, _ = run_cli(capsys, "ls", root, "--json")
    listing = json.loads(out)
    assert listing["latest"] == 10
    assert listing["steps"][2]["step"] == 20 and fmt.MANIFEST in listing["steps"][2]["error"]
    status, out, _ = run_cli(capsys, "verify", root, "20", "--json")
    assert status == 1 and [d["where"] for d in json.loads(out)["steps"][0]["damaged"]] == [fmt.MANIFEST]


def test_ls_and_verify_report_a_step_of_ckpts_whose_manifest_is_missing_and_not_a_users_directory(root, capsys):
    (root / "20" / fmt.MANIFEST).unlink()  # a partial restore: the step keeps ckpt's marker
    (root / "30").mkdir()
    (root / "30" / "notes.txt").write_text("a user's")
    status, out, _ = run_cli(capsys, "ls", root, "--json")
    listing = json.loads(out)
    assert status == 0 and listing["latest"] == 10
    assert [s["step"] for s in listing["steps"]] == [0, 10, 20]
    assert "manifest.json is missing" in listing["steps"][2]["error"]
    assert [Path(f["path"]).name for f in listing["foreign"]] == ["30"]
    status, out, _ = run_cli(capsys, "verify", root, "--json")
    report = json.loads(out)
    assert status == 1 and [(s["step"], s["ok"]) for s in report["steps"]] == [(0, True), (10, True), (20, False)]
    assert [d["where"] for d in report["steps"][2]["damaged"]] == [fmt.MANIFEST]
    status, out, _ = run_cli(capsys, "verify", root)
    assert status == 1 and "2 of 3 steps ok; damaged: [20]" in out


def test_verify_of_a_root_names_a_step_whose_manifest_is_damaged_by_its_step(root, capsys):
    flip_byte(root / "10" / fmt.MANIFEST, 30)
    status, out, _ = run_cli(capsys, "verify", root, "--json")
    steps = json.loads(out)["steps"]
    assert status == 1 and [(s["step"], s["ok"]) for s in steps] == [(0, True), (10, False), (20, True)]
    status, out, _ = run_cli(capsys, "verify", root)
    assert status == 1 and "damaged: [10]" in out and f"step 10  {root / '10'}: DAMAGED" in out


def test_ls_show_and_verify_list_a_root_as_the_checkpointer_does(root, capsys):
    shutil.copytree(root / "10", root / "30")  # `cp -r 10 30`: its manifest says step 10
    ckpt.save(root / "export_70", {"w": np.ones(3)})  # named unlike the steps: a checkpoint, not a step
    with ckpt.Checkpointer(root) as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 10, 20, 30] and ckptr.latest.step == 30
    status, out, _ = run_cli(capsys, "ls", root, "--json")
    listing = json.loads(out)
    assert status == 0 and listing["latest"] == 30
    assert [(s["step"], Path(s["path"]).name, s["latest"]) for s in listing["steps"]] == [
        (0, "0", False), (10, "10", False), (20, "20", False), (30, "30", True), (None, "export_70", False)]
    _, out, _ = run_cli(capsys, "ls", root)
    assert "latest step 30" in out and "export_70/ (not a step)" in out
    status, out, _ = run_cli(capsys, "show", root, "30", "--json")
    assert status == 0 and (json.loads(out)["step"], json.loads(out)["path"]) == (30, str(root / "30"))
    status, out, _ = run_cli(capsys, "verify", root, "--json")
    report = json.loads(out)
    assert status == 0 and [(s["step"], s["path"]) for s in report["steps"]] == [
        (n, str(root / str(n))) for n in (0, 10, 20, 30)]
    assert report["not_steps"] == [str(root / "export_70")]
    status, out, _ = run_cli(capsys, "verify", root)
    assert status == 0 and "4 of 4 steps ok" in out and "not steps of" in out and "export_70" in out


def test_ls_of_a_missing_directory_exits_2_naming_it(tmp_path, capsys):
    status, _, err = run_cli(capsys, "ls", tmp_path / "nope")
    assert status == 2 and str(tmp_path / "nope") in err


# ---------------------------------------------------------------------------------------------- show
def test_show_lists_key_paths_dtypes_shapes_bytes_of_the_latest_step(root, capsys):
    status, out, _ = run_cli(capsys, "show", root)
    assert status == 0
    assert out.startswith(f"step 20  {root / '20'}")
    w = next(line for line in out.splitlines() if line.startswith("['params']['w']"))
    assert w.split()[1:6] == ["numpy", "float32", "(512,", "600)", "1.2"]
    b = next(line for line in out.splitlines() if line.startswith("['params']['b']"))
    assert "float64" in b and "(8,)" in b and "64 B" in b and "packed/" in b
    assert "inline: 20" in out and 'inline: "mlp"' in out


def test_show_counts_the_leaves_bytes_as_data_not_the_padding_between_packed_ones(tmp_path, capsys):
    """'125.0 KiB of data' for 2,000 one-byte leaves: the figure counted the padding that aligns packed leaves."""
    ckpt.save(tmp_path / "c", {f"x{i}": np.ones(1, np.int8) for i in range(2000)})
    status, out, _ = run_cli(capsys, "show", tmp_path / "c")
    assert status == 0 and ", 2.0 KiB of data, " in out.splitlines()[1], out[:200]
    assert "state: 2000 leaves, 2.0 KiB" in out


def test_show_lists_empty_containers_and_its_json_counts_the_leaves_bytes_not_the_packing_padding(tmp_path, capsys):
    """Empty subtrees ({}, [], ()), which a load gives back, were left out of the table, and show --json's
    'nbytes' was the manifest's, with the padding that aligns packed leaves (128 for 17 bytes of data)."""
    ckpt.save(tmp_path / "c", {"a": {}, "b": [], "d": np.ones(3, np.float32), "e": np.ones(5, np.int8),
                               "f": {"g": ()}, "h": 7})
    status, out, _ = run_cli(capsys, "show", tmp_path / "c")
    rows = [line.split()[:3] for line in out.splitlines() if line.startswith("[")]
    assert status == 0 and [r[:2] for r in rows] == [["['a']", "dict"], ["['b']", "list"], ["['d']", "numpy"],
                                                     ["['e']", "numpy"], ["['f']['g']", "tuple"], ["['h']", "int"]]
    assert "state: 3 leaves, 17 B" in out
    status, out, _ = run_cli(capsys, "show", tmp_path / "c", "--json")
    shown = json.loads(out)
    assert shown["nbytes"] == 17 and [(r["path"], r["nbytes"]) for r in shown["checkpointables"]["state"]] == [
        ("['a']", 0), ("['b']", 0), ("['d']", 12), ("['e']", 5), ("['f']['g']", 0), ("['h']", 0)]


def test_show_json_groups_leaves_by_checkpointable(tmp_path, capsys):
    with ckpt.Checkpointer(tmp_path) as ckptr:
        ckptr.save_checkpointables(3, {"model": {"w": np.zeros((2, 3), np.int8)}, "opt": {"lr": 0.1}}, force=True)
    status, out, _ = run_cli(capsys, "show", tmp_path, "3", "--json")
    shown = json.loads(out)
    assert status == 0 and shown["step"] == 3
    assert shown["checkpointables"]["model"] == [{"checkpointable": "model", "path": "['w']", "type": "numpy",
                                                  "dtype": "int8", "shape": [2, 3], "nbytes": 6, "stored": "packed/"}]
    assert shown["checkpointables"]["opt"][0]["value"] == 0.1


def test_show_of_a_step_directory_written_by_ckpt_save(tmp_path, capsys):
    ckpt.save(tmp_path / "model", {"w": np.ones(4, np.float16)})
    status, out, _ = run_cli(capsys, "show", tmp_path / "model", "--json")
    assert status == 0 and json.loads(out)["checkpointables"]["state"][0]["dtype"] == "float16"


def test_show_names_typed_prng_keys_as_keys_of_their_implementation(tmp_path, capsys):
    """Typed keys were shown as uint32 of the keys' shape with their key data's bytes ('uint32  ()  8 B'),
    the implementation nowhere, so threefry and rbg keys looked alike and a 0-d uint32 held 8 bytes."""
    jax = pytest.importorskip("jax")
    ckpt.save(tmp_path / "c", {"k": jax.random.split(jax.random.key(0), 3), "rbg": jax.random.key(1, impl="rbg")})
    status, out, _ = run_cli(capsys, "show", tmp_path / "c")
    assert status == 0
    assert re.search(r"\['k'\] +jax_key +key<threefry2x32> +\(3,\) +24 B", out), out
    assert re.search(r"\['rbg'\] +jax_key +key<rbg> +\(\) +16 B", out), out
    status, out, _ = run_cli(capsys, "show", tmp_path / "c", "--json")
    k, rbg = json.loads(out)["checkpointables"]["state"]
    assert (k["impl"], k["dtype"], k["shape"], rbg["impl"]) == ("threefry2x32", "uint32", [3], "rbg")


@pytest.mark.parametrize("command", ["ls", "show", "verify"])
def test_a_checkpoint_named_with_a_digit_int_cannot_read_is_shown_and_verified(tmp_path, capsys, command):
    """'²' is a digit to str.isdigit, not to int(): such a name is no step number."""
    path = tmp_path / "best_\u00b2"
    ckpt.save(path, {"w": np.ones(3)})
    assert cli.main([command, str(path)]) == 0
    assert str(path) in capsys.readouterr().out


def test_show_of_a_missing_step_exits_2_listing_the_steps(root, capsys):
    status, _, err = run_cli(capsys, "show", root, "5")
    assert status == 2 and "no checkpoint at step 5" in err and "[0, 10, 20]" in err


@pytest.mark.parametrize("command", ["show", "verify"])
def test_show_and_verify_take_the_step_after_an_option_that_follows_the_directory(root, capsys, command):
    """`ckpt show DIR --json STEP` exited 2 with 'unrecognized arguments: STEP': argparse gives the optional
    STEP nothing once an option follows DIR."""
    status, out, err = run_cli(capsys, command, root, "--json", "10")
    assert status == 0, err
    printed = json.loads(out)
    assert (printed["step"] if command == "show" else [s["step"] for s in printed["steps"]]) == (
        10 if command == "show" else [10])
    with pytest.raises(SystemExit) as exited:  # still one step at most (argparse exits)
        cli.main([command, str(root), "--json", "10", "20"])
    assert exited.value.code == 2 and "unrecognized arguments: 20" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- verify
def test_verify_passes_an_intact_root_and_checks_every_byte(root, capsys):
    status, out, _ = run_cli(capsys, "verify", root, "--json")
    report = json.loads(out)
    assert status == 0 and report["ok"]
    assert [s["step"] for s in report["steps"]] == [0, 10, 20]
    assert all(s["leaves"] == 4 and s["nbytes"] == 512 * 600 * 4 + 8 * 8 for s in report["steps"])


def test_verify_exits_1_naming_a_large_leaf_whose_chunk_is_damaged(root, capsys):
    array_dir = root / "10" / leaf_entry(root / "10", "['params']['w']")["array"]["kvstore"]["path"]
    flip_byte(next(p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"))
    status, out, _ = run_cli(capsys, "verify", root)
    assert status == 1
    assert "step 10" in out and "DAMAGED" in out and "state['params']['w']: " in out
    assert "2 of 3 steps ok; damaged: [10]" in out


def test_verify_exits_1_naming_a_packed_leaf_whose_bytes_changed(root, capsys):
    offset = leaf_entry(root / "20", "['params']['b']")["packed"][0]
    flip_byte(root / "20" / fmt.PACKED / "c" / "0", offset + 3)
    status, out, _ = run_cli(capsys, "verify", root, "20", "--json")
    damaged = json.loads(out)["steps"][0]["damaged"]
    assert status == 1
    assert damaged == [{"where": "state['params']['b']",
                        "why": f"its bytes in {fmt.PACKED}/ do not match the CRC32 in {fmt.TREE}"}]


def test_verify_reports_a_step_deleted_while_it_is_checked_as_gone_not_damaged(root, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_SECS", 0.0)  # a report at the first chunk read
    doomed = root / "0"

    class GarbageCollection(logging.Handler):
        """Another process's garbage collection, deleting step 0 once its first chunk is read."""

        def emit(self, record: logging.LogRecord) -> None:
            if f"verifying {doomed}:" in record.getMessage() and doomed.exists():
                root_lib.delete_step(doomed, 0)

    collector = GarbageCollection()
    logging.getLogger("ckpt.progress").addHandler(collector)
    try:
        status, out, _ = run_cli(capsys, "verify", root, "--json")
        report = json.loads(out)
        assert status == 0 and report["ok"] and [s["step"] for s in report["steps"]] == [10, 20]
        assert report["gone"] == [{"step": 0, "path": str(doomed)}]
    finally:
        logging.getLogger("ckpt.progress").removeHandler(collector)
    with pytest.raises(ckpt.errors.StepNotFoundError, match="deleted while it was being read"):
        verify_step(doomed)


def test_verify_of_a_root_never_checks_a_step_through_a_link_put_at_its_name_since_the_listing(root, tmp_path,
                                                                                               monkeypatch, capsys):
    """Was: step 10, replaced by a link to another run's step 10 while step 0 was checked, was reported ok."""
    monkeypatch.setattr(progress, "DELAY_SECS", 0.0)  # a report at the first chunk read
    ckpt.save(tmp_path / "other", {"w": np.zeros(2)})

    class Replacer(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if f"verifying {root / '0'}:" in record.getMessage() and not (root / "10").is_symlink():
                (root / "10").rename(tmp_path / "moved")
                (root / "10").symlink_to(tmp_path / "other")

    replacer = Replacer()
    logging.getLogger("ckpt.progress").addHandler(replacer)
    try:
        status, out, _ = run_cli(capsys, "verify", root, "--json")
    finally:
        logging.getLogger("ckpt.progress").removeHandler(replacer)
    report = json.loads(out)
    assert status == 0 and [s["step"] for s in report["steps"]] == [0, 20]
    assert report["gone"] == [{"step": 10, "path": str(root / "10")}]


def test_verify_checks_a_step_replaced_while_it_is_checked_again_not_as_damaged(root, monkeypatch, capsys):
    """A rolling checkpoint (a step saved again with overwrite=True) replaced mid-check was reported DAMAGED."""
    monkeypatch.setattr(progress, "DELAY_SECS", 0.0)  # a report at the first chunk read
    replaced = root / "10"
    writes, saved = [], []  # the writes since the last check, every value saved

    class Writer(logging.Handler):
        """Another process saving step 10 again, once, when its first chunk has been read."""

        def emit(self, record: logging.LogRecord) -> None:
            if f"verifying {replaced}:" in record.getMessage() and not writes:
                writes.append(10)
                new = float(len(saved)) + 1
                saved.append(new)
                with ckpt.Checkpointer(root) as writer:
                    writer.save(10, {"params": {"w": np.full((512, 600), new, np.float32), "b": np.arange(8.0) + new},
                                     "step": 10, "name": "mlp"}, force=True, overwrite=True)

    writer = Writer()
    logging.getLogger("ckpt.progress").addHandler(writer)
    try:
        status, out, _ = run_cli(capsys, "verify", root, "--json")
        report = json.loads(out)
        assert writes and status == 0 and report["ok"], report
        assert [s["step"] for s in report["steps"]] == [0, 10, 20] and report["gone"] == []
        writes.clear()
        with pytest.raises(ckpt.errors.StepReplacedError, match="was replaced .* while it was being read"):
            verify_step(replaced)
        assert writes and verify_step(replaced).ok
    finally:
        logging.getLogger("ckpt.progress").removeHandler(writer)


def test_verify_detects_a_deleted_chunk_even_of_an_all_zero_array(tmp_path):
    ckpt.save(tmp_path / "z", {"zeros": np.zeros((512, 600), np.float32)})
    assert verify_step(tmp_path / "z").ok
    chunk = next(p for p in (tmp_path / "z" / fmt.ARRAYS).rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    result = verify_step(tmp_path / "z")
    assert [d.where for d in result.damaged] == ["state['zeros']"] and "missing" in result.damaged[0].why
    with pytest.raises(ckpt.errors.CheckpointCorruptedError, match=r"state\['zeros'\]"):
        ckpt.load(tmp_path / "z")


def test_verify_reports_a_damaged_tree_json_by_file_name(root):
    flip_byte(root / "0" / fmt.TREE)
    result = verify_step(root / "0")
    assert [d.where for d in result.damaged] == [fmt.TREE] and result.step == 0


def test_verify_checks_packed_leaves_that_cross_chunk_borders(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "PACKED_CHUNK_BYTES", 1000)
    small = {f"x{i}": np.full(50, i, np.float32) for i in range(40)}  # 200 bytes each, over 8 chunks
    ckpt.save(tmp_path / "p", small)
    assert verify_step(tmp_path / "p").ok
    chunk_files = sorted((tmp_path / "p" / fmt.PACKED / "c").iterdir(), key=lambda p: int(p.name))
    assert len(chunk_files) > 5
    spans = {k: leaf_entry(tmp_path / "p", f"['{k}']")["packed"] for k in small}
    leaf = next(k for k, (offset, nbytes) in spans.items() if offset <= 4010 < offset + nbytes)
    assert spans[leaf][0] < 4000  # the leaf starts in chunk 3; its damaged byte is in chunk 4
    flip_byte(chunk_files[4], 10)
    result = verify_step(tmp_path / "p")
    assert [d.where for d in result.damaged] == [f"state['{leaf}']"]


def test_verify_reads_a_large_array_chunk_by_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "ARRAY_CHUNK_BYTES", 64 << 10)
    ckpt.save(tmp_path / "big", {"w": np.ones((2048, 512), np.float32)})  # 4 MiB in 64 KiB chunks
    reads = []
    original = progress.Tracker.advance
    monkeypatch.setattr(progress.Tracker, "advance", lambda self, n: (reads.append(n), original(self, n)))
    result = verify_step(tmp_path / "big")
    assert result.ok and result.nbytes == 4 << 20
    assert len(reads) == 64 and max(reads) == 64 << 10


# ------------------------------------------------------------------------------------------ progress
def test_progress_is_off_by_default_in_the_library(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_SECS", 0.0)
    ckpt.save(tmp_path / "a", {"w": np.ones((512, 600))})
    ckpt.load(tmp_path / "a")
    assert capsys.readouterr() == ("", "")


def test_enabled_progress_reports_save_load_and_verify(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "DELAY_SECS", 0.0)
    stream = io.StringIO()
    progress.enable(stream)
    ckpt.save(tmp_path / "a", {"w": np.ones((512, 600)), "b": np.ones(3)})
    ckpt.load(tmp_path / "a")
    verify_step(tmp_path / "a")
    lines = stream.getvalue().splitlines()
    for what in ("saving", "loading", "verifying"):
        assert any(line.startswith(f"ckpt: {what} {tmp_path / 'a'}: ") and "(100%), done in" in line
                   for line in lines), (what, lines)


def test_progress_on_a_terminal_rewrites_one_line_until_the_operation_ends():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress.enable(terminal)
    tracker = progress.Tracker("copying", 4 << 20, delay_secs=0.0, interval_secs=0.0)
    tracker.advance(1 << 20)
    tracker.advance(3 << 20)
    tracker.finish()
    updates = terminal.getvalue().split("\r\033[K")[1:]
    assert len(updates) == 3
    assert updates[0].startswith("ckpt: copying: 1.0 MiB of 4.0 MiB (25%), ")
    assert updates[1].startswith("ckpt: copying: 4.0 MiB of 4.0 MiB (100%), ")
    assert "done in" in updates[2]
    assert [u.endswith("\n") for u in updates] == [False, False, True]


def test_the_cli_reports_progress_of_a_long_verify_on_stderr(root, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_SECS", 0.0)
    status, out, err = run_cli(capsys, "verify", root, "0")
    assert status == 0 and f"ckpt: verifying {root / '0'}" in err and "verifying" not in out


@pytest.mark.parametrize("destination, error", [
    ("", "the directory is ''"),
    ("s3://bucket/run", "reads and writes local directories, and its destination s3://bucket/run is on an object store")])
def test_convert_into_an_empty_path_or_a_bucket_is_a_usage_error_and_writes_nothing(
        root, tmp_path, monkeypatch, capsys, destination, error):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # an empty destination would have been the current directory
    assert cli.main(["convert", str(root), destination]) == 2
    assert error in capsys.readouterr().err
    assert list((tmp_path / "here").iterdir()) == []


@pytest.mark.parametrize("destination", [f"copy{fmt.TMP_SUFFIX}", f"x{fmt.REPLACED_SUFFIX}/copy"])
def test_convert_into_a_directory_named_like_a_temporary_is_a_usage_error_naming_it(root, tmp_path, capsys,
                                                                                    destination):
    """Its refusal (the next writer of its parent removes such a directory, with the steps in it) came from
    the convert's iterator, past the command's check of its arguments: a ValueError's traceback, exit status 1."""
    status, _, err = run_cli(capsys, "convert", root, tmp_path / destination)
    assert status == 2 and f"{tmp_path / destination} cannot be the root a convert writes" in err
    assert "is named like a temporary of ckpt's" in err and sorted(os.listdir(tmp_path)) == ["run"]


def test_convert_copies_the_steps_the_checkpointer_lists_and_never_follows_a_link(root, tmp_path, capsys):
    (root / "7").mkdir()
    (root / "7" / fmt.MANIFEST).write_text('{"a user\'s": "own manifest"}')  # skipped by ls and Checkpointer
    with ckpt.Checkpointer(tmp_path / "elsewhere") as other:
        other.save(2, {"other": np.ones(3)})
    (root / "9").symlink_to(tmp_path / "elsewhere" / "2")  # ls: an entry ckpt never follows
    status, out, _ = run_cli(capsys, "convert", root, tmp_path / "copy")
    assert status == 0 and "3 steps converted" in out
    assert sorted(os.listdir(tmp_path / "copy")) == [fmt.LOCK, "0", "10", "20"]


@pytest.mark.parametrize("inside", ["30", "copies/run"])
def test_convert_into_a_directory_inside_the_root_it_converts_is_a_usage_error_and_writes_nothing(root, capsys,
                                                                                                 inside):
    """Into root/30, the copy took step 30's name in the run it copied: a Checkpointer saving step 30 there raised
    ForeignEntryError."""
    before = sorted(os.listdir(root))
    status, _, err = run_cli(capsys, "convert", root, root / inside)
    assert status == 2 and f"lies in the root being converted ({root})" in err
    assert sorted(os.listdir(root)) == before
    with ckpt.Checkpointer(root) as ckptr:
        ckptr.save(30, {"w": np.ones(2)}, force=True)
        assert [c.step for c in ckptr.checkpoints] == [0, 10, 20, 30]


def test_convert_into_a_file_is_a_usage_error(root, tmp_path, capsys):
    (tmp_path / "file").write_text("a user's")
    status, _, err = run_cli(capsys, "convert", root, tmp_path / "file")
    assert status == 2 and "is a regular file of 8 bytes, not a directory" in err
    assert (tmp_path / "file").read_text() == "a user's"


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_convert_leaves_its_destination_as_it_found_it(root, tmp_path, capsys, existing):
    destination = tmp_path / "new" / "copy"
    if existing:
        destination.mkdir(parents=True)
    flip_byte(root / "20" / fmt.TREE)  # step 0 and 10 are converted before step 20 fails
    status, out, _ = run_cli(capsys, "convert", root, destination)
    assert status == 1 and "step 10 ->" in out
    assert (list(destination.iterdir()) == []) if existing else not (tmp_path / "new").exists()
    shutil.rmtree(root / "20")
    status, out, _ = run_cli(capsys, "convert", root, destination)
    assert status == 0 and "2 steps converted" in out


KILLED_CONVERT = r"""
import os, signal, sys
from ckpt import convert, root
commit, commits = root.commit, []
def killed_at_the_second_commit(*args, **kwargs):
    commits.append(args)
    if len(commits) == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # step 10 is written, not yet renamed from its temporary
    return commit(*args, **kwargs)
root.commit = killed_at_the_second_commit
for done in convert.convert_root(sys.argv[1], sys.argv[2]):
    print("converted", done.step, flush=True)
"""


def test_a_convert_killed_before_it_could_clean_up_is_resumed_by_running_it_again(root, tmp_path, capsys):
    """SIGKILL (or SIGTERM) leaves the lock, step 0 and step 10's temporary: running the convert again
    said 'is not empty; convert into a new directory', about what the same convert left."""
    destination = tmp_path / "copy"
    killed = procs.run_script(KILLED_CONVERT, str(root), str(destination))
    assert killed.returncode == -9 and "converted 0" in killed.stdout, killed.stdout + killed.stderr
    assert sorted(os.listdir(destination)) == [fmt.LOCK, "0", "10" + fmt.TMP_SUFFIX]
    flip_byte(destination / "0" / fmt.TREE)   # a step it kept is checked against its source again
    status, _, err = run_cli(capsys, "convert", root, destination)
    assert status == 1 and "is damaged" in err and (destination / "0").exists()
    shutil.rmtree(destination / "0")
    procs.run_script(KILLED_CONVERT, str(root), str(destination))
    status, out, _ = run_cli(capsys, "convert", root, destination)
    assert status == 0 and "3 steps converted" in out
    assert sorted(os.listdir(destination)) == [fmt.LOCK, "0", "10", "20"]
    with ckpt.Checkpointer(root) as old, ckpt.Checkpointer(destination) as new:
        for step in (0, 10, 20):
            got, want = new.load(step), old.load(step)
            assert got["params"]["w"].tobytes() == want["params"]["w"].tobytes() and got["step"] == want["step"]
    status, _, err = run_cli(capsys, "convert", destination, destination)  # not taken for a convert to resume
    assert status == 2 and "is the root being converted" in err
    (destination / "notes.txt").write_text("a user's")
    status, _, err = run_cli(capsys, "convert", root, destination)
    assert status == 2 and "'notes.txt', not left by a convert" in err


KILLED_ROOT_METADATA_WRITE = r"""
import os, signal, sys
from ckpt import convert
replace, write = os.replace, os.write
def killed_before_the_rename(source, target):
    if os.path.basename(target) == "ckpt-root.json":
        os.kill(os.getpid(), signal.SIGKILL)   # its temporary is written, not yet renamed
    replace(source, target)
def killed_halfway(fd, data):
    if os.readlink(f"/proc/self/fd/{fd}").endswith("ckpt-root.json.tmp"):
        write(fd, bytes(data)[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)   # its temporary is half written
    return write(fd, data)
if sys.argv[3] == "rename":
    os.replace = killed_before_the_rename
else:
    os.write = killed_halfway
list(convert.convert_root(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("where", ["rename", "write"])
def test_a_convert_killed_while_it_wrote_the_roots_metadata_is_resumed_by_running_it_again(tmp_path, capsys, where):
    """It left ckpt-root.json.tmp, which running it again took for a user's file: 'is not empty' (also when killed
    before that file was whole)."""
    with ckpt.Checkpointer(tmp_path / "run", custom_metadata={"run": "a"}) as ckptr:
        ckptr.save(1, {"w": np.ones(2)}, force=True)
    killed = procs.run_script(KILLED_ROOT_METADATA_WRITE, str(tmp_path / "run"), str(tmp_path / "copy"), where)
    assert killed.returncode == -9 and sorted(os.listdir(tmp_path / "copy")) == [fmt.LOCK, fmt.ROOT_METADATA + ".tmp"]
    status, out, _ = run_cli(capsys, "convert", tmp_path / "run", tmp_path / "copy")
    assert status == 0 and "1 step converted" in out
    assert sorted(os.listdir(tmp_path / "copy")) == [fmt.LOCK, "1", fmt.ROOT_METADATA]
    with ckpt.Checkpointer(tmp_path / "copy") as copy:
        assert copy.root_metadata().custom_metadata == {"run": "a"}


KILLED_IN_ITS_CLEANUP = r"""
import os, signal, sys
from ckpt import convert
convert_step, unlink = convert._convert_step, os.unlink
def interrupted(step, *args):
    if step == 2:
        raise KeyboardInterrupt   # Ctrl-C while step 2 is converted: the convert removes steps 0 and 1 again
    return convert_step(step, *args)
def killed_in_the_removal(path, *args, **kwargs):
    unlink(path, *args, **kwargs)
    if os.path.basename(path) == "manifest.json":
        os.kill(os.getpid(), signal.SIGKILL)   # a second Ctrl-C, a SIGKILL: step 1 half removed
convert._convert_step, os.unlink = interrupted, killed_in_the_removal
list(convert.convert_root(sys.argv[1], sys.argv[2]))
"""


def test_a_convert_killed_while_it_removed_its_steps_after_a_failure_is_resumed_by_running_it_again(tmp_path, capsys):
    """Its cleanup removed step 1 where it was: killed then, it left a step 1 without its manifest (or with only
    some of its files), which running it again took for another run's ('is not empty', exit status 2) or for a
    damaged copy (exit status 1), for ever."""
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        for step in range(3):
            ckptr.save(step, {"w": np.full(2, step)}, force=True)
    killed = procs.run_script(KILLED_IN_ITS_CLEANUP, str(tmp_path / "run"), str(tmp_path / "copy"))
    assert killed.returncode == -9, killed.stderr
    status, out, err = run_cli(capsys, "convert", tmp_path / "run", tmp_path / "copy")
    assert status == 0 and "3 steps converted" in out, err
    assert sorted(os.listdir(tmp_path / "copy")) == [fmt.LOCK, "0", "1", "2"]
    with ckpt.Checkpointer(tmp_path / "copy") as copy:
        assert [copy.load(step)["w"].tolist() for step in range(3)] == [[0, 0], [1, 1], [2, 2]]


def test_a_failed_convert_never_removes_a_checkpoint_saved_at_a_steps_name_while_it_ran(tmp_path):
    """Was: the step was counted as written before it was, so the convert's cleanup deleted the user's checkpoint."""
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        for step in (0, 1):
            ckptr.save(step, {"w": np.full(2, step)}, force=True)
    converting = convert.convert_root(tmp_path / "run", tmp_path / "copy")
    assert next(converting).step == 0
    ckpt.save(tmp_path / "copy" / "1", {"mine": np.arange(3)})  # (a save of someone else's, at step 1's name)
    with pytest.raises(ckpt.errors.StepAlreadyExistsError):
        next(converting)
    assert sorted(os.listdir(tmp_path / "copy")) == ["1"] and ckpt.load(tmp_path / "copy" / "1")["mine"].tolist() == [0, 1, 2]


def converted_run_a_with_run_b_beside(tmp_path: Path, capsys) -> None:
    """Runs a and b (step 1 each, other values) in ``tmp_path``, and a converted into ``tmp_path / "copy"``."""
    for name, value in (("a", 1.0), ("b", 2.0)):
        with ckpt.Checkpointer(tmp_path / name) as ckptr:
            ckptr.save(1, {"w": np.full(3, value)}, force=True)
    assert run_cli(capsys, "convert", tmp_path / "a", tmp_path / "copy")[0] == 0


def test_a_convert_into_the_copy_of_another_run_with_the_same_steps_exits_2_saying_so_and_keeps_it(tmp_path, capsys):
    """It said the copy's leaf 'differs from its source (run `ckpt verify` for details)', exit status 1 (damage),
    though the copy verifies: the copy is another run's, which the docstring says raises FileExistsError."""
    converted_run_a_with_run_b_beside(tmp_path, capsys)
    status, _, err = run_cli(capsys, "convert", tmp_path / "b", tmp_path / "copy")
    assert status == 2 and f"its step 1 is not a copy of {tmp_path / 'b' / '1'}" in err and "into a new directory" in err
    np.testing.assert_array_equal(ckpt.load(tmp_path / "copy" / "1")["w"], np.full(3, 1.0))


def test_a_convert_into_the_root_of_another_run_holding_its_metadata_exits_2_and_keeps_it(tmp_path, capsys):
    """The destination's root metadata (another run's, of a Checkpointer opened there) was taken for the one a
    convert killed before had copied: the converted root's metadata was that run's, not its source's."""
    with ckpt.Checkpointer(tmp_path / "run", custom_metadata={"run": "a", "loss": float("nan")}) as ckptr:
        ckptr.save(1, {"w": np.ones(2)}, force=True)
    ckpt.Checkpointer(tmp_path / "other", custom_metadata={"run": "b"}).close()

    status, _, err = run_cli(capsys, "convert", tmp_path / "run", tmp_path / "other")
    assert status == 2 and f"{tmp_path / 'other'} is not empty (it holds 'ckpt-root.json'" in err
    with ckpt.Checkpointer(tmp_path / "other") as other:
        assert other.root_metadata().custom_metadata == {"run": "b"} and other.latest is None
    assert run_cli(capsys, "convert", tmp_path / "run", tmp_path / "copy")[0] == 0
    assert run_cli(capsys, "convert", tmp_path / "run", tmp_path / "copy")[0] == 0  # its own metadata: resumed
    with ckpt.Checkpointer(tmp_path / "copy") as copy:
        assert copy.root_metadata().custom_metadata["run"] == "a"


def test_a_failed_convert_keeps_the_lock_file_it_found_in_its_destination(tmp_path, capsys):
    """The failed convert removed the lock file the finished convert before it had left: not as it found it."""
    converted_run_a_with_run_b_beside(tmp_path, capsys)
    found = sorted(os.listdir(tmp_path / "copy"))
    assert run_cli(capsys, "convert", tmp_path / "b", tmp_path / "copy")[0] == 2
    assert sorted(os.listdir(tmp_path / "copy")) == found == [fmt.LOCK, "1"]


def test_a_convert_into_a_directory_another_writer_holds_exits_2_saying_so_and_writes_nothing(root, tmp_path, capsys):
    """A Checkpointer that has begun to save in the (still empty) destination holds its lock: the convert's
    DirectoryLockedError was a traceback, exit status 1."""
    with ckpt.Checkpointer(tmp_path / "copy", cleanup_tmp_directories=True):  # (its sweep takes the lock)
        status, _, err = run_cli(capsys, "convert", root, tmp_path / "copy")
        assert status == 2 and f"{tmp_path / 'copy'} is being written by another Checkpointer" in err
        assert os.listdir(tmp_path / "copy") == [fmt.LOCK]


def test_a_convert_of_a_root_whose_step_a_run_deletes_meanwhile_says_it_is_gone_not_damaged(root, tmp_path):
    """It said the step 'is not a checkpoint: it has none of the files ckpt writes (run `ckpt verify` for
    details)', as of damage, where the garbage collection of a run saving there had deleted it."""
    converting = convert.convert_root(root, tmp_path / "copy")
    assert next(converting).step == 0
    storage.remove_owned(root / "10")  # as a Checkpointer's garbage collection removes a step
    with pytest.raises(ckpt.errors.StepNotFoundError, match=r"step 10 .* was deleted while it was being read"):
        next(converting)
    assert not (tmp_path / "copy").exists()


def test_a_convert_of_a_root_whose_step_is_replaced_by_a_link_meanwhile_never_copies_what_it_leads_to(root, tmp_path):
    """Was: the copy's step 10 held what the link leads to (another run's step 10), and the convert succeeded."""
    ckpt.save(tmp_path / "other", {"w": np.zeros(2)})
    converting = convert.convert_root(root, tmp_path / "copy")
    assert next(converting).step == 0
    (root / "10").rename(tmp_path / "moved")
    (root / "10").symlink_to(tmp_path / "other")
    with pytest.raises(ckpt.errors.StepNotFoundError, match=r"step 10 .* is no committed step now: it holds a symbolic"):
        next(converting)
    assert not (tmp_path / "copy").exists()


def test_convert_without_torch_keeps_torch_tensors_torch_tensors(tmp_path):
    """Converted where torch is not installed, tensors were copied as the numpy arrays they load as."""
    torch = pytest.importorskip("torch")
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save(1, {"t": torch.arange(4, dtype=torch.bfloat16), "n": np.ones(2)}, force=True)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ckpt.convert import convert_root\n"
            "print([done.step for done in convert_root(sys.argv[1], sys.argv[2])])")
    result = procs.run_script(code, str(tmp_path / "run"), str(tmp_path / "copy"))
    assert result.returncode == 0 and "[1]" in result.stdout, result.stdout + result.stderr
    copy = ckpt.load(tmp_path / "copy" / "1")
    assert isinstance(copy["t"], torch.Tensor) and copy["t"].dtype == torch.bfloat16 and copy["t"].tolist() == [0, 1, 2, 3]
    assert type(copy["n"]) is np.ndarray


class Moments(NamedTuple):
    mu: Any
    count: Any


class NoState(NamedTuple):
    """A state without fields (as optax's EmptyState)."""


def test_convert_keeps_namedtuples_and_the_leaves_under_them_as_saved(tmp_path):
    """A tree loaded without an abstract tree has dicts for namedtuples and None for empty ones: the copy held
    those (keys ['mu'] for .mu, a None leaf), and a leaf under a namedtuple lost what it was saved as, matched
    by a key path the loaded tree no longer had (a torch tensor, converted where torch is not, became numpy)."""
    torch = pytest.importorskip("torch")
    state = (Moments(mu={"w": torch.arange(4, dtype=torch.bfloat16)}, count=np.int32(3)), NoState())
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save(1, state, force=True)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ckpt.convert import convert_root\n"
            "print([done.step for done in convert_root(sys.argv[1], sys.argv[2])])")
    result = procs.run_script(code, str(tmp_path / "run"), str(tmp_path / "copy"))
    assert result.returncode == 0 and "[1]" in result.stdout, result.stdout + result.stderr

    assert str(ckpt.metadata(tmp_path / "copy" / "1").metadata) == str(ckpt.metadata(tmp_path / "run" / "1").metadata)
    assert (tmp_path / "copy" / "1" / fmt.TREE).read_text().count('"NoState"') == 1
    copy = ckpt.load(tmp_path / "copy" / "1", state)
    assert type(copy[0]) is Moments and copy[1] == NoState()
    assert isinstance(copy[0].mu["w"], torch.Tensor) and copy[0].mu["w"].dtype == torch.bfloat16


def test_convert_of_a_root_holding_a_damaged_step_of_ckpts_stops_before_writing(root, tmp_path, capsys):
    (root / "10" / fmt.MANIFEST).unlink()  # not a step the Checkpointer lists, yet not to be left behind silently
    status, _, err = run_cli(capsys, "convert", root, tmp_path / "copy")
    assert status == 1 and "holds step 10, which is damaged" in err
    assert not (tmp_path / "copy").exists()


def test_show_and_verify_of_a_root_name_a_step_a_crash_left_set_aside_which_they_did_not_read(root, capsys):
    """Step 20 set aside (20.ckpt-replaced, the root's latest once a Checkpointer puts it back): ckpt show
    of the root showed step 10 as if it were the latest, ckpt verify checked 0 and 10 and said all was ok,
    and show of step 20 said there was no such step, none of them mentioning it."""
    os.rename(root / "20", root / ("20" + fmt.REPLACED_SUFFIX))  # as the crash leaves it (marked, as every step)
    note = f"20 (as 20{fmt.REPLACED_SUFFIX})"
    status, out, err = run_cli(capsys, "show", root)
    assert status == 0 and "step 10" in out and "not listed" in err and note in err and "puts them back" in err
    status, out, err = run_cli(capsys, "verify", root)
    assert status == 0 and "2 of 2 steps ok" in out and "not checked" in err and note in err
    status, _, err = run_cli(capsys, "show", root, "20")
    assert status == 2 and "no checkpoint at step 20" in err and note in err
    with ckpt.Checkpointer(root):  # puts it back
        pass
    status, out, err = run_cli(capsys, "verify", root)
    assert status == 0 and "3 of 3 steps ok" in out and "set aside" not in err


def test_convert_of_a_root_whose_step_a_crash_left_set_aside_stops_before_writing_saying_what_to_do(root, tmp_path,
                                                                                                   capsys):
    """A commit with overwrite=True killed between its two renames (no atomic exchange) leaves step 20 as
    20.ckpt-replaced, which a Checkpointer opened on the root puts back and lists as its latest step: convert
    converted steps 0 and 10 and said nothing of it, so the converted run lost its latest step."""
    os.rename(root / "20", root / ("20" + fmt.REPLACED_SUFFIX))  # as the crash leaves it (marked, as every step)
    status, _, err = run_cli(capsys, "convert", root, tmp_path / "copy")
    assert status == 2 and f"step 20 set aside as 20{fmt.REPLACED_SUFFIX}" in err and "open a Checkpointer" in err
    assert not (tmp_path / "copy").exists()
    with ckpt.Checkpointer(root):  # puts it back
        pass
    assert run_cli(capsys, "convert", root, tmp_path / "copy")[0] == 0
    with ckpt.Checkpointer(tmp_path / "copy") as ckptr:
        assert [c.step for c in ckptr.checkpoints] == [0, 10, 20]


class SavesItself:
    """A StatefulCheckpointable: its directory is its own, which no reader but itself understands."""

    async def save(self, directory):
        path = await directory.await_creation()

        async def write():
            (path / "n").write_text("3")
        return write()

    async def load(self, directory):
        async def read():
            pass
        return read()


def test_convert_of_a_root_holding_what_a_handler_saved_says_so_and_leaves_nothing(root, tmp_path, capsys):
    """Was a ValueError's traceback (Orbax's words for a load without the object)."""
    with ckpt.Checkpointer(root) as ckptr:
        ckptr.save_checkpointables(30, {"state": {"w": np.ones(3)}, "counter": SavesItself()}, force=True)
    status, _, err = run_cli(capsys, "convert", root, tmp_path / "copy")
    assert status == 2 and f"{root / '30'}" in err and "'counter'" in err and "Traceback" not in err
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("as_json", [False, True])
def test_convert_names_the_checkpoints_of_the_root_it_does_not_convert(root, tmp_path, capsys, as_json):
    """A run that changed its step_name_format holds steps of another naming, which ls and verify name:
    convert skipped them without a word, and the source looked converted whole."""
    names = ckpt.path.step.standard_name_format(step_prefix="step")
    with ckpt.Checkpointer(root, step_name_format=names) as ckptr:
        ckptr.save(30, {"w": np.ones(3)}, force=True)
    status, out, err = run_cli(capsys, "convert", root, tmp_path / "copy", *(["--json"] if as_json else []))
    assert status == 0 and sorted(os.listdir(tmp_path / "copy"))[-1] == "20"
    if as_json:
        assert json.loads(out)["not_steps"] == [str(root / "step_30")]
    else:
        assert f"not converted, not steps of {root} (named otherwise): step_30" in out + err


def test_show_and_verify_name_the_checkpointables_a_handler_wrote_as_not_read(tmp_path, capsys):
    """They were left out without a word: show listed the step's trees alone, verify said ok of the trees."""
    with ckpt.Checkpointer(tmp_path / "run", context=registry_context()) as ckptr:
        ckptr.save_checkpointables(1, {"state": {"w": np.ones(3)}, "vocab": Vocab(["a"]), "counter": Counter(3)},
                                   force=True)
    vocab_why = "written by tests.test_custom_checkpointables.VocabHandler, which only that handler reads"
    counter_why = "saved by the object itself (a StatefulCheckpointable), which only that object reads"
    status, out, _ = run_cli(capsys, "show", tmp_path / "run")
    assert status == 0 and f"vocab: not read by ckpt: {vocab_why}" in out and f"counter: not read by ckpt: {counter_why}" in out
    status, out, _ = run_cli(capsys, "verify", tmp_path / "run", "--json")
    unchecked = json.loads(out)["steps"][0]["unchecked"]
    assert status == 0 and vocab_why in unchecked["vocab"] and counter_why in unchecked["counter"]
    status, out, _ = run_cli(capsys, "verify", tmp_path / "run" / "1")
    assert status == 0 and f"not checked: vocab: {vocab_why}" in out


def test_convert_of_a_step_holding_what_a_handler_wrote_exits_2_naming_it_and_leaves_no_destination(tmp_path, capsys):
    """It ended in a traceback: the load of every checkpointable raised ValueError (a StatefulCheckpointable's,
    loaded without the object) or KeyError (a handler's, not registered in the command's process)."""
    with ckpt.Checkpointer(tmp_path / "run", context=registry_context()) as ckptr:
        ckptr.save_checkpointables(1, {"state": {"w": np.ones(3)}}, force=True)
        ckptr.save_checkpointables(2, {"state": {"w": np.ones(3)}, "vocab": Vocab(["a"]), "counter": Counter(3)},
                                   force=True)
    status, out, err = run_cli(capsys, "convert", tmp_path / "run", tmp_path / "copy")
    assert status == 2 and "step 1 ->" in out
    assert f"{tmp_path / 'run' / '2'}: ckpt convert copies trees only" in err
    assert "'vocab' is written by tests.test_custom_checkpointables.VocabHandler" in err
    assert "'counter' is saved by the object itself (a StatefulCheckpointable)" in err
    assert not (tmp_path / "copy").exists()


def test_convert_of_a_step_whose_saved_sharding_holds_a_nan_exits_2_naming_the_leaf_and_leaves_no_destination(
        tmp_path, capsys):
    """The load of such a step puts the array on the default device; convert copied the saved
    sharding into the new tree.json and ended in a traceback (ValueError: Out of range float values are not
    JSON compliant), naming neither the step nor the leaf."""
    jax = pytest.importorskip("jax")
    for step in (1, 2):
        ckpt.save(tmp_path / "run" / str(step), {"w": jax.numpy.arange(4.0), "n": 1})
    nan_mesh = {"mesh_shape": [float("nan")], "axis_names": ["x"], "device_ids": [0], "spec": ["x"]}
    rewrite_tree(tmp_path / "run" / "2",
                 lambda tree: tree["checkpointables"]["state"]["leaves"][0].update(sharding=nan_mesh))
    status, out, err = run_cli(capsys, "convert", tmp_path / "run", tmp_path / "copy")
    assert status == 2 and "step 1 ->" in out
    assert f"{tmp_path / 'run' / '2'}: ckpt convert cannot store leaf state['w'] as it is" in err and "sharding" in err
    assert not (tmp_path / "copy").exists()


def test_convert_of_arrays_saved_on_devices_this_process_lacks_keeps_their_sharding_without_a_warning(
        tmp_path, capsys, recwarn):
    """A run saved on 8 devices, converted on a machine with fewer: convert said, once per sharding, that 'the
    array is put on the default device', though the copy keeps the saved sharding (it never places arrays)."""
    jax = pytest.importorskip("jax")
    ckpt.save(tmp_path / "run" / "1", {"w": jax.numpy.arange(8.0), "k": jax.random.key(0)})
    on_8 = {"mesh_shape": [8], "axis_names": ["x"], "device_ids": list(range(8)), "spec": ["x"]}
    rewrite_tree(tmp_path / "run" / "1",
                 lambda tree: tree["checkpointables"]["state"]["leaves"][0].update(sharding=on_8))
    status, out, err = run_cli(capsys, "convert", tmp_path / "run", tmp_path / "copy")
    assert status == 0 and "1 step converted" in out
    assert [str(w.message) for w in recwarn if "cannot be restored" in str(w.message)] == []
    assert leaf_entry(tmp_path / "copy" / "1", "['w']")["sharding"] == on_8


def test_convert_of_one_step_directory_says_it_takes_a_root(root, tmp_path, capsys):
    status, _, err = run_cli(capsys, "convert", root / "10", tmp_path / "copy")
    assert status == 2 and "is one checkpoint, not a root" in err and f"convert its root ({root})" in err
    assert not (tmp_path / "copy").exists()


def test_format_bytes_picks_a_readable_unit():
    assert [progress.format_bytes(n) for n in (0, 1023, 1536, 3 << 30)] == ["0 B", "1023 B", "1.5 KiB", "3.0 GiB"]


# ----------------------------------------------------------------------------------- console script
def test_the_installed_ckpt_command_runs_and_returns_the_exit_status(root):
    command = shutil.which("ckpt", path=os.path.dirname(sys.executable))
    assert command, "the console script `ckpt` is not installed next to this Python"
    ok = subprocess.run([command, "verify", str(root), "0"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    flip_byte(root / "0" / fmt.TREE)
    bad = subprocess.run([command, "verify", str(root), "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and fmt.TREE in bad.stdout


# ------------------------------------------------------------------------------------ object stores
def test_the_command_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    ckpt.save(tmp_path / "many", {f"leaf_{i}": np.zeros(4) for i in range(4000)})  # a table far past a pipe's buffer
    command = shutil.which("ckpt", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen([command, "show", str(tmp_path / "many")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"checkpoint  ")
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b""  # no BrokenPipeError traceback


def test_ls_show_and_verify_work_on_an_s3_root(bucket, capsys):
    with ckpt.Checkpointer(bucket) as ckptr:
        for step in (1, 2):
            ckptr.save(step, {"big": np.full(300_000, step, np.float32), "small": np.arange(4)}, force=True,
                       metrics={"loss": 1.0 / step})
    status, out, _ = run_cli(capsys, "ls", bucket, "--json")
    listing = json.loads(out)
    assert status == 0 and listing["latest"] == 2 and [s["step"] for s in listing["steps"]] == [1, 2]
    assert run_cli(capsys, "show", bucket, "1")[1].startswith(f"step 1  {bucket}/1")
    assert run_cli(capsys, "verify", bucket)[0] == 0
    packed = ObjectPath(f"{bucket}/2/{fmt.PACKED}/c/0")
    data = bytearray(packed.read_bytes())
    data[leaf_entry(ObjectPath(f"{bucket}/2"), "['small']")["packed"][0]] ^= 0xFF
    packed.write_bytes(bytes(data))
    status, out, _ = run_cli(capsys, "verify", bucket, "2")
    assert status == 1 and "state['small']" in out


def test_ls_of_an_s3_root_holding_a_step_a_killed_save_left_lists_it_as_a_temporary(bucket, capsys):
    with ckpt.Checkpointer(bucket) as ckptr:
        ckptr.save(1, {"w": np.arange(3)})
    storage.make_temporary(ObjectPath(bucket) / "2")  # what a save killed before its manifest leaves there
    status, out, err = run_cli(capsys, "ls", bucket)
    assert status == 0, err  # was: exit status 2, a TypeError traceback (an object store's size is unknown)
    assert "1 temporary" in out and re.search(r"^  2 +-$", out, re.M)


# -------------------------------------------------------------------------------------- docstrings
@pytest.mark.parametrize("obj", [cli.main, progress.format_bytes, progress.Tracker, progress.enable, verify_step,
                                 ckpt.verify.Damage, ckpt.verify.VerifyResult],
                         ids=lambda obj: obj.__qualname__)
def test_public_cli_progress_and_verify_api_has_a_docstring_with_an_example(obj):
    assert "Example::" in (obj.__doc__ or "")
