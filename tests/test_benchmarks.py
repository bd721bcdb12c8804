"""The benchmark suite (benchmarks/run.py) runs end to end in its tiny mode and reports every figure.

One run of ``run.py --tiny`` (KiB-sized states, every workload, system and section; about 20 s on two
idle cores) is shared by the tests below. Its numbers mean nothing; what is checked is that every
measurement exists, that loads returned the saved bytes (the workers' warm-up checks them and the run
fails otherwise), and that the report names the targets.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)  # a tiny run takes 20-30 s on two idle cores, minutes on busy ones
REPO = Path(__file__).resolve().parents[1]
SYSTEMS = {"floor", "ckpt", "orbax", "torch", "dcp"}
FIGURES = {"save_s", "blocking_s", "async_total_s", "load_s", "save_peak_bytes", "async_peak_bytes",
           "load_peak_bytes", "files"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """(the results JSON, the printed report) of one tiny run."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny", "--out", str(out),
                           "--scratch", str(tmp)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not [p for p in tmp.iterdir() if p.name.startswith("ckpt-bench-")], "the scratch directory was left behind"
    assert (tmp / "chart.png").read_bytes().startswith(b"\x89PNG"), "the chart is written beside the results"
    return json.loads(out.read_text()), proc.stdout


def test_every_workload_has_every_figure_of_every_system(tiny):
    results, _ = tiny
    names = [w["name"] for w in results["workloads"]]
    assert names == ["large_1MiB", "many_leaves", "flax_adam", "lightning"]
    for workload in results["workloads"]:
        assert workload["nbytes"] > 0 and workload["leaves"] > 0
        assert set(workload["systems"]) == SYSTEMS, workload["name"]
        for system, figures in workload["systems"].items():
            assert FIGURES <= set(figures), (workload["name"], system, FIGURES - set(figures))
            assert len(figures["save_s"]["runs"]) == results["environment"]["reps"]
            assert all(t > 0 for t in figures["save_s"]["runs"] + figures["load_s"]["runs"])


def test_sections_measure_scaling_interference_and_fixed_costs(tiny):
    results, _ = tiny
    sizes = [p["nbytes"] for p in results["scaling"]["bytes"]]
    assert sizes == sorted(sizes) and len(sizes) >= 2
    assert [p["leaves"] for p in results["scaling"]["leaves"]] == [10, 100]
    assert set(results["interference"]["systems"]) == {"ckpt", "orbax", "torch", "dcp"}
    assert results["interference"]["systems"]["ckpt"]["iteration_during_s"]["median"] > 0
    ckpt_costs = results["overheads"]["systems"]["ckpt"]
    assert ckpt_costs["steps"] == 20 and ckpt_costs["init_s"] > 0 and ckpt_costs["declined_save_s"] > 0


def test_report_prints_a_table_per_workload_and_the_targets(tiny):
    results, printed = tiny
    for name in ("large_1MiB", "many_leaves", "flax_adam", "lightning"):
        assert f"== {name}:" in printed
    assert "-- targets --" in printed and "-- scaling by size" in printed
    for system in ("ckpt", "floor"):  # the floor's beside ckpt's: what one more leaf costs the hardware path
        assert f"  {system} cost per extra leaf from 10 to 100 leaves: first save" in printed
    targets = {t["target"] for t in results["targets"]}
    assert "large_1MiB: durable save throughput / write floor" in targets
    assert "many_leaves: Orbax save time / ckpt's" in targets
    assert "scaling: load cost per extra leaf, 10 to 100 (us)" in targets
    assert "scaling: 100 leaves, load throughput / read floor" in targets
    assert all(t["ok"] in (True, False) for t in results["targets"])


def test_the_summary_gives_the_readme_table_and_each_target_across_runs(tiny, tmp_path, capsys):
    results, _ = tiny
    second = json.loads(json.dumps(results))
    second["targets"][0]["ok"] = not results["targets"][0]["ok"]  # another run, where the first target went the other way
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, run in zip(paths, (results, second)):
        path.write_text(json.dumps(run))
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import summary
    finally:
        sys.path.pop(0)
    assert summary.main([str(p) for p in paths]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| workload | durable save: ckpt / Orbax / torch / DCP / floor |")
    assert len(rows) == 1 + len(results["workloads"])
    assert all(row.count(" / ") == 3 * 4 for row in rows[1:]), rows  # five systems in each of three columns
    first = results["targets"][0]
    (line,) = [line for line in printed.splitlines() if line.startswith(first["target"] + " ")]
    assert line.rstrip().endswith("1 of 2") and "(missed)" in line
    held = sum(t["ok"] for t in results["targets"])
    assert f"targets held per run: {held} of {len(results['targets'])}" in printed


def test_the_reported_modes_measure_a_state_of_small_and_0_d_leaves():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import config
        import workloads
    finally:
        sys.path.pop(0)
    for mode in ("full", "quick"):
        (spec,) = [w for w in config.MODES[mode].workloads if w["name"] == "small_leaves"]
    leaves = list(workloads.iter_leaves(workloads.build(spec)))
    assert len(leaves) == 2000 and sum(leaf.ndim == 0 for leaf in leaves) == 1000
    assert all(leaf.nbytes <= 16384 for leaf in leaves)


def test_the_jax_leaves_benchmark_times_both_loads_alternating(tmp_path):
    pytest.importorskip("jax")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import jax_leaves
    finally:
        sys.path.pop(0)
    result = jax_leaves.measure(20, 2, tmp_path / "root")
    assert len(result["load_jax_s"]) == len(result["load_numpy_s"]) == 2
    assert result["ratio"] > 0 and result["ratio_range"][0] <= result["ratio"] <= result["ratio_range"][1]
    assert result["jax_us_per_leaf_range"][0] <= result["jax_us_per_leaf"] <= result["jax_us_per_leaf_range"][1]


def test_the_sharded_save_benchmark_times_both_saves_and_measures_their_memory(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "sharded_save.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sharded_save.py"), "--mib", "16", "--reps", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    kinds = {"save_sharded", "save_numpy", "blocking_sharded", "blocking_numpy"}
    assert result["state_bytes"] == 16 << 20 and set(result["seconds"]) == set(result["peak_ratio"]) == kinds
    assert all(len(seconds) == 1 for seconds in result["seconds"].values())
    assert result["time_ratio"]["save"] > 0 and result["time_ratio"]["blocking"] > 0


def test_the_gpu_benchmark_runs_on_cpu_arrays_with_every_figure(tmp_path):
    """benchmarks/gpu.py gets one short go when a GPU is lent: run it here first, tiny, on CPU arrays."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--gib", "0.001",
                           "--reps", "1", "--leaves", "10", "--out", str(out), "--scratch", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["device"] == "cpu"
    background = "ckpt async until durable, in the background"
    operations = {"torch": {"floor pinned copy", "floor write", "floor read", "ckpt async blocking",
                            "ckpt async until durable", background, "ckpt save", "ckpt load", "dcp async blocking",
                            "dcp async until durable", "dcp save", "dcp load"},
                  "jax": {"floor pinned copy", "floor read", "ckpt async blocking", "ckpt async until durable",
                          background, "ckpt load", "orbax async blocking", "orbax async until durable", "orbax load"}}
    expected = {f"{framework}/{kind}/{op}" for framework, ops in operations.items() for kind in ("large", "small")
                for op in ops}
    assert set(report["results"]) == expected
    assert all(r["median"] > 0 for r in report["results"].values())
    assert len(report["targets"]) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"], "the scratch directory was left behind"
