"""Orbax 0.12.8's own tests of reading, through the v1 ``training.Checkpointer``, the steps its v0
CheckpointManager and v1 Checkpointer wrote (the steps shipped in its wheel), run against ckpt.

ckpt reads those steps in place (ckpt/orbax/). The tests are read from the installed wheel with only
their imports swapped (tests/orbax_suite/port.py); ``CKPT_CONFORMANCE_TARGET=orbax`` runs them
against Orbax instead.
"""
from tests.orbax_suite import port

base = port.orbax_test_module("experimental/v1/_src/testing/compatibility/manager_compatibility_test_base.py")


class ManagerCompatibilityTest(base.ManagerCompatibilityTestBase):
    pass
