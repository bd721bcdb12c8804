"""Every Trainer configuration in tests/lightning_matrix.py, SIGKILLed after the checkpoint of the step
that exposes its problem and started again at once, ends bit-identical to a run never killed: final
weights, optimizer, scheduler, loop progress, callback, datamodule and torchmetrics states, logged metrics, and the
per-batch trace of sample ids, losses and learning rates.

One worker process (imports done once) runs the configurations; each run is a forked child."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# the worker imports them; this process does not (it would change which namespace other tests resolve)
for package in ("pytorch_lightning", "lightning", "torchmetrics", "torch"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package} (the dev extra)", allow_module_level=True)

from tests import procs  # noqa: E402
from tests.lightning_matrix import CONFIGS  # noqa: E402

WORKER = Path(__file__).resolve().parent / "lightning_matrix.py"


@pytest.fixture(scope="module")
def matrix():
    """``matrix(name)``: the worker's answer for one configuration."""
    worker = procs.start(WORKER, stdin=True)
    try:
        procs.wait_for_line(worker, '{"ready"', timeout=120)

        def check(name: str) -> dict:
            worker.stdin.write(name + "\n")
            worker.stdin.flush()
            return json.loads(procs.wait_for_line(worker, "{", timeout=120))

        yield check
        worker.stdin.close()  # the worker removes its directory and exits
        procs.output(worker, timeout=60)
    finally:
        procs.stop(worker)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_killed_and_restarted_at_once_ends_bit_identical_to_an_uninterrupted_run(matrix, name):
    answer = matrix(name)
    assert answer["name"] == name
    assert answer["ok"], "\n".join(answer["problems"])
