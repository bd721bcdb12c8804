"""What the standalone benchmarks (``jax_leaves.py``, ``sharded_save.py``) share: one measurement in a
scratch root of its own, written as JSON with the machine's environment."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def measure_into(out: Path, measure: Callable[[Path], dict], prefix: str, **versions: Any) -> dict:
    """``measure(root)`` (``root``: a fresh directory, removed afterwards), with ``environment`` added (the
    given library ``versions``, the CPU count and the load average), written to ``out``; returns it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        result = measure(Path(scratch) / "root")
    result["environment"] = {**versions, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result
