"""``import ckpt`` works with neither jax nor torch, and ``pip install -e .`` works in a fresh venv.

The venv test needs numpy and tensorstore from a package index or the local wheel cache; set
``CKPT_SKIP_INSTALL_TEST=1`` to skip it offline (it also skips itself when they cannot be installed).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import procs

WITHOUT_FRAMEWORKS = r"""
import sys
for name in ("jax", "jaxlib", "torch", "flax", "optax", "pytorch_lightning", "lightning"):
    sys.modules[name] = None  # any import of them now raises ImportError
import numpy as np
import ckpt
from ckpt import training

path = sys.argv[1]
with training.Checkpointer(path) as ckptr:
    ckptr.save(0, {"w": np.arange(4.0), "n": 1, "s": "x"})
    restored = ckptr.load()
assert np.array_equal(restored["w"], np.arange(4.0)) and restored["n"] == 1 and restored["s"] == "x"
print("IMPORT-OK")
"""

NOTHING_HEAVY_IMPORTED = r"""
import sys
import ckpt, ckpt.training
heavy = sorted(m for m in ("jax", "torch", "flax", "optax", "pytorch_lightning", "lightning") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_ckpt_imports_saves_and_loads_with_jax_and_torch_unavailable(tmp_path):
    result = procs.run_script(WITHOUT_FRAMEWORKS, str(tmp_path / "run"), timeout=60)
    assert result.returncode == 0 and "IMPORT-OK" in result.stdout, result.stdout + result.stderr


def test_importing_ckpt_does_not_import_any_framework():
    result = procs.run_script(NOTHING_HEAVY_IMPORTED, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``cmd`` outside the repository and the test venv, so only what the new venv holds is importable."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})


@pytest.mark.skipif(os.environ.get("CKPT_SKIP_INSTALL_TEST") == "1", reason="CKPT_SKIP_INSTALL_TEST=1")
def test_editable_install_in_a_fresh_venv_without_frameworks_imports_and_round_trips(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(procs.REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "__pycache__", "tests", "benchmarks", "examples", "runs", "bench-results"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, timeout=120).check_returncode()
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]  # this pip, into the new venv
    deps = _run(pip + ["numpy", "tensorstore"], cwd=tmp_path, timeout=300)
    if deps.returncode != 0:
        pytest.skip(f"numpy and tensorstore cannot be installed here (offline?): {deps.stderr[-500:]}")
    install = _run(pip + ["--no-deps", "-e", str(source)], cwd=tmp_path, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    check = _run([python, "-c", "import importlib.util as u, ckpt; "
                  "print(ckpt.__file__, u.find_spec('jax'), u.find_spec('torch'))"], cwd=tmp_path, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == [str(source / "ckpt" / "__init__.py"), "None", "None"]
    roundtrip = _run([python, "-c", WITHOUT_FRAMEWORKS, str(tmp_path / "run")], cwd=tmp_path, timeout=60)
    assert roundtrip.returncode == 0 and "IMPORT-OK" in roundtrip.stdout, roundtrip.stdout + roundtrip.stderr
