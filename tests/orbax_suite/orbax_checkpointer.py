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
    "test_gcs_deletion_options": "reads the private checkpointer._manager._options",
    "test_cleanup_tmp_directories": "reads the private checkpointer._manager._options",
    "test_lightweight_initialize": "reads the private checkpointer._manager._options",
}
# Tests ckpt fails today (the gaps); each is removed from here when it passes.
XFAIL = {
    "test_checkpointables_metadata": "no handler registry for custom checkpointables yet",
    "test_custom_checkpointables": "no handler registry for custom checkpointables yet",
    "test_different_custom_checkpointables": "no handler registry for custom checkpointables yet",
    "test_load_with_switched_abstract_checkpointables": "no handler registry for custom checkpointables yet",
    "test_context_constructor_override": "no Orbax option tree in Context (ctx.array.saving.use_ocdbt)",
    "test_custom_save_decision_policy": "DecisionContext has no multiprocessing_options",
    "test_preservation": "checkpoint times do not follow the datetime.datetime clock Orbax's test mocks",
    "test_preservation_metrics1": "the latest step is never deleted (BestN would delete it)",
    "test_preservation_metrics3": "the latest step is never deleted (BestN would delete it)",
    "test_save_restore_pytree": "a load without an abstract tree does not restore the saved NamedSharding",
    "test_skips_when_ongoing_save": "the step in flight is not a previous step for the default policy",
    "test_step_already_exists": "saving an existing step returns False instead of raising StepAlreadyExistsError",
    "test_load_pytree": "deprecation warnings are not Orbax's words",
    "test_load_pytree_async": "deprecation warnings are not Orbax's words",
    "test_pytree_metadata": "deprecation warnings are not Orbax's words",
    "test_save_pytree": "deprecation warnings are not Orbax's words",
    "test_save_pytree_async": "deprecation warnings are not Orbax's words",
}

# A failing subtest is reported on its own; the test around it then passes, so it cannot be a strict xfail.
WITH_SUBTESTS = {"test_save_restore_pytree"}


def _marked(cls):
    for name in dir(cls):
        if not name.startswith("test"):
            continue
        stem = next((s for s in list(SKIPPED) + list(XFAIL)  # a parameterized test adds 0, 1, ... or _true
                     if name.startswith(s) and re.fullmatch(r"(\d+|_[a-z]+)?", name[len(s):])), None)
        if stem is None or port.TARGET == "orbax":
            continue
        mark = (pytest.mark.skip(reason=SKIPPED[stem]) if stem in SKIPPED
                else pytest.mark.xfail(reason=XFAIL[stem], strict=stem not in WITH_SUBTESTS))
        setattr(cls, name, mark(getattr(cls, name)))
    return cls


@_marked
class CheckpointerTest(base.CheckpointerTestBase.Test):
    pass


@_marked
class DeprecationsTest(base.CheckpointerTestBase.DeprecationsTest):
    pass
