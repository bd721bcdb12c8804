"""Every public item of the core has a docstring with an ``Example::`` block, and the examples run as
written (their asserts hold), each in a fresh directory; the example of an error makes that error."""
from __future__ import annotations

import inspect
import textwrap
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import ckpt
from ckpt import (background, checkpoint, context, distributed, errors, metadata, objectstore, preemption,
                  training)
from ckpt.path import step as step_lib
from ckpt.training import Checkpointer, preservation_policies, save_decision_policies

# Examples shown to the reader but not run here, and why.
NOT_RUN = {
    "ckpt.distributed.JaxProcesses": "needs a multi-process jax.distributed job",
    "ckpt.distributed.TorchProcesses": "needs a multi-rank torch.distributed job",
    "ckpt.errors.StepReplacedError": "needs another process to save the step again while it is read "
                                     "(tests/test_strange_roots.py makes one)",
}


def exported(module: ModuleType) -> list[tuple[str, Any]]:
    return [(f"{module.__name__}.{name}", getattr(module, name)) for name in module.__all__]


def defined_in(module: ModuleType) -> list[tuple[str, Any]]:
    """The public classes and functions ``module`` defines, not those it imports (an alias counts once)."""
    items, seen = [], set()
    for name, obj in vars(module).items():
        if (not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                and obj.__module__ == module.__name__ and id(obj) not in seen):
            seen.add(id(obj))
            items.append((f"{module.__name__}.{name}", obj))
    return items


CHECKPOINTER_MEMBERS = [(f"Checkpointer.{name}", member) for name, member in vars(Checkpointer).items()
                        if not name.startswith("_")]

# ckpt.PLACEHOLDER is Ellipsis (as Orbax's), which has no docstring of its own: ckpt.load's example shows it.
DOCUMENTED = ([item for item in exported(ckpt) if item[1] is not ckpt.PLACEHOLDER] + exported(training)
              + defined_in(save_decision_policies) + defined_in(preservation_policies) + CHECKPOINTER_MEMBERS)

# (name, item, the module whose names its example may use besides ``ckpt`` and ``np``)
RUN = [(name, obj, module) for module in (checkpoint, context, metadata, preemption, step_lib, distributed, errors,
                                          save_decision_policies, preservation_policies)
       for name, obj in defined_in(module)]
RUN += [("ckpt.Checkpointer", Checkpointer, training),
        ("ckpt.AsyncResponse", background.AsyncResponse, background),
        ("ckpt.objectstore.ObjectPath", objectstore.ObjectPath, objectstore)]
RUN += [(name, member, training) for name, member in CHECKPOINTER_MEMBERS]


def example_of(obj: Any) -> str:
    """The code of the ``Example::`` block in ``obj``'s own docstring, dedented."""
    lines = inspect.cleandoc(obj.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Example::"), None)
    assert start is not None, "the docstring has no 'Example::' block"
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip("\n")


@pytest.mark.parametrize("name, obj", DOCUMENTED, ids=[name for name, _ in DOCUMENTED])
def test_public_item_has_a_docstring_with_an_example(name, obj):
    assert "Example::" in (obj.__doc__ or ""), f"{name} has no 'Example::' in its docstring"


def test_the_examples_not_run_are_core_items_with_an_example():
    examples = {name: example_of(obj) for name, obj, _ in RUN if name in NOT_RUN}
    assert examples.keys() == NOT_RUN.keys() and all(examples.values())


@pytest.mark.parametrize("name, obj, module", RUN, ids=[name for name, _, _ in RUN])
def test_docstring_example_runs_and_its_asserts_hold(name, obj, module, tmp_path, monkeypatch):
    if name in NOT_RUN:
        pytest.skip(NOT_RUN[name])
    code = compile(example_of(obj), f"<example of {name}>", "exec")
    namespace = {**vars(module), "ckpt": ckpt, "np": np, "__name__": "docstring_example"}
    is_error, made = inspect.isclass(obj) and issubclass(obj, BaseException), []
    if is_error:  # count the errors the example makes
        init = obj.__init__

        def counting_init(self, *args, **kwargs):
            made.append(self)
            init(self, *args, **kwargs)

        monkeypatch.setattr(obj, "__init__", counting_init)
    monkeypatch.chdir(tmp_path)
    try:
        if name.startswith("Checkpointer."):  # a method's example uses ``ckptr``, a Checkpointer of a fresh root
            with Checkpointer("run") as ckptr:
                exec(code, {**namespace, "ckptr": ckptr})
        else:
            exec(code, namespace)
    finally:
        preemption.reset()  # examples of preemption call notify()
    if is_error:
        assert made, f"the example of {name} does not make a {obj.__name__}"
