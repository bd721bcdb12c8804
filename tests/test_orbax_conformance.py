"""Orbax's own v1 tests, run against ckpt (tests/orbax_suite/): every test not about Orbax's internals passes.

Two modules of Orbax's wheel: the training Checkpointer's tests (orbax_checkpointer.py) and its tests of
reading the steps its v0 CheckpointManager and v1 Checkpointer wrote (orbax_compatibility.py); and
orbax_options.py, which compares Orbax's option tree with ckpt's Context; orbax_v0v1.py, Orbax 0.11's tests of the
Checkpointer over steps its v0 CheckpointManager wrote, over 0.12.8's test base. They run
in one interpreter of their own, with 8 CPU devices (Orbax's meshes need them); this test starts it and
asserts that nothing failed. By hand, against Orbax itself (the control run)::

    CKPT_CONFORMANCE_TARGET=orbax .venv/bin/python -m pytest -q tests/orbax_suite/orbax_*.py
"""
import re

import pytest

from tests import procs

pytest.importorskip("orbax.checkpoint", reason="needs orbax-checkpoint (the dev extra): its tests are the input")


def test_orbax_v1_checkpointer_tests_pass_against_ckpt():
    suite = procs.REPO / "tests" / "orbax_suite"
    run = procs.run_script("import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))", "-q", "-p", "no:cacheprovider",
                           str(suite / "orbax_checkpointer.py"), str(suite / "orbax_compatibility.py"),
                           str(suite / "orbax_options.py"), str(suite / "orbax_v0v1.py"), timeout=600,
                           CKPT_CONFORMANCE_TARGET="ckpt")
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ failed", summary), summary
