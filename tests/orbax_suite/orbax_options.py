"""Orbax 0.12.8's option tree against ckpt's: every option of Orbax's groups is an option of ckpt's
same group, and every option of ckpt's is honoured or named in ``ckpt.context.NOT_APPLICABLE`` with the reason.
Runs against ckpt only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.orbax_suite import port

if port.TARGET == "orbax":
    pytest.skip("compares Orbax's options with ckpt's", allow_module_level=True)

from orbax.checkpoint.experimental.v1._src.context import options as orbax_options  # noqa: E402

import ckpt  # noqa: E402
from ckpt import context  # noqa: E402


def option_paths(options: Any, prefix: str = "") -> dict[str, str]:
    """Each option of a group and of the groups in it: its dotted path -> the qualified name of its group."""
    paths = {}
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            paths.update(option_paths(value, f"{prefix}{field.name}."))
        else:
            paths[prefix + field.name] = type(options).__qualname__
    return paths


# The Context's groups, under the names NOT_APPLICABLE gives them.
GROUPS = {"array": "array", "asynchronous": "async", "file": "file", "memory": "memory",
          "multiprocessing": "multiprocessing", "pytree": "pytree", "checkpointables": "checkpointables",
          "deletion": "deletion"}
# The options ckpt honours (or refuses with a ValueError where it cannot, as multiprocessing.active_processes).
HONOURED = {
    "async.timeout_secs", "async.post_finalization_callback", "file.path_permission_mode", "memory.max_inflight_bytes",
    "pytree.loading.partial_load", "array.saving.storage_options.dtype", "array.saving.storage_options.chunk_byte_size",
    "array.saving.scoped_storage_options_creator",
    "multiprocessing.primary_host", "multiprocessing.active_processes", "multiprocessing.barrier_sync_key_prefix",
    "multiprocessing.processes", "checkpointables.registry", "deletion.gcs_deletion_options.todelete_full_path",
}


def test_every_option_of_ckpts_context_is_honoured_or_named_not_applicable_with_its_reason():
    every = {f"{name}.{path}" for group, name in GROUPS.items() for path in option_paths(getattr(ckpt.Context(), group))}
    assert every - HONOURED == set(context.NOT_APPLICABLE)
    assert HONOURED <= every and all(context.NOT_APPLICABLE.values())


def test_every_option_of_orbaxs_groups_is_accepted_by_ckpt():
    ours, theirs = ckpt.Context(), orbax_options
    for group in GROUPS:
        mine = option_paths(getattr(ours, group))
        orbax_group = type(getattr(ours, group)).__name__
        for path, where in option_paths(getattr(theirs, orbax_group)()).items():
            prefixes = [path.rsplit(".", n)[0] for n in range(path.count(".") + 1)]
            accepted = any(prefix in mine for prefix in prefixes)  # a nested Orbax group may be one option here
            assert accepted, f"ctx.{group}.{path} ({where}) is no option of ckpt's"
