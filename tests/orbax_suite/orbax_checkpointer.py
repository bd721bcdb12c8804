"""Orbax 0.12.8's own tests of ``training.Checkpointer``, run against ckpt (``import ckpt as ocp``).

The tests are read from the installed orbax-checkpoint wheel with only their imports swapped
(tests/orbax_suite/port.py); ``CKPT_CONFORMANCE_TARGET=orbax`` runs them against Orbax instead.
"""
import re

import pytest

from tests.orbax_suite import port

base = port.orbax_test_module("experimental/v1/_src/training/checkpointer_test_base.py")

# Tests of Orbax's internals, which ckpt does not have: skipped for ckpt, run for Orbax.
SKIPPED = {
    "test_save_async": "patches Orbax's serialization.async_serialize_from_host and reads OCDBT's d/ files",
    "test_save_async_raises_on_background_failure": "patches the private CheckpointManager checkpointer._manager",
    "test_gcs_deletion_options": "reads the private checkpointer._manager._options (of todelete_full_path, which "
                                 "ckpt refuses with a ValueError: it deletes for good, README, What differs)",
    "test_cleanup_tmp_directories": "reads the private checkpointer._manager._options",
    "test_lightweight_initialize": "reads the private checkpointer._manager._options",
    "test_context_constructor_override": "asserts that OCDBT's manifest.ocdbt exists (the scoping it also checks "
                                         "is tested in tests/test_context.py)",
}
# Deliberate differences (README, "What differs"): ckpt never deletes the latest step, so a policy
# that would delete it keeps one checkpoint more than Orbax.
DIFFERS = {
    "test_preservation3": "the latest step is never deleted (EveryNSteps(4) would delete step 9)",
    "test_preservation4": "the latest step is never deleted (EveryNSeconds(40) would delete step 9)",
    "test_preservation_metrics1": "the latest step is never deleted (BestN(n=2) would delete step 4)",
    "test_preservation_metrics3": "the latest step is never deleted (BestN(n=0) would delete step 4)",
}

def mark_differences(cls):
    """Marks the tests of ``cls`` named in SKIPPED (skip) and DIFFERS (strict xfail), for ckpt's runs."""
    for name in dir(cls):
        if not name.startswith("test"):
            continue
        stem = next((s for s in list(SKIPPED) + list(DIFFERS)  # a parameterized test adds 0, 1, ... or _true
                     if name.startswith(s) and re.fullmatch(r"(\d+|_true|_false)?", name[len(s):])), None)
        if stem is None or port.TARGET == "orbax":
            continue
        mark = (pytest.mark.skip(reason=SKIPPED[stem]) if stem in SKIPPED
                else pytest.mark.xfail(reason=DIFFERS[stem], strict=True))
        setattr(cls, name, mark(getattr(cls, name)))
    return cls

@mark_differences
class CheckpointerTest(base.CheckpointerTestBase.Test):
    pass

@mark_differences
class DeprecationsTest(base.CheckpointerTestBase.DeprecationsTest):
    pass
