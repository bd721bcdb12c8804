"""Orbax's tests build meshes over 8 devices: 8 CPU devices, set before jax starts its backend.

This folder runs in an interpreter of its own (tests/test_orbax_conformance.py starts it), so that
the rest of the suite keeps one device.
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from absl import flags  # noqa: E402  (absltest's create_tempdir reads --test_tmpdir)

flags.FLAGS.mark_as_parsed()
