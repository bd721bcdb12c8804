"""Loads one of Orbax's own test modules from the installed orbax-checkpoint wheel, with its imports swapped.

The test code itself is Orbax's, unchanged: only the import lines are replaced, each by the line in
``IMPORTS`` (``import ckpt as ocp`` and the local utilities of :mod:`tests.orbax_suite.utils`), so no
assertion can be weakened here. Every import line of the file must have an entry: a new Orbax
version that imports something else fails loudly instead of testing something else.

With ``CKPT_CONFORMANCE_TARGET=orbax`` the module is imported as Orbax ships it (the control run).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys
import types

TARGET = os.environ.get("CKPT_CONFORMANCE_TARGET", "ckpt")
if TARGET not in ("ckpt", "orbax"):
    raise ValueError(f"CKPT_CONFORMANCE_TARGET must be 'ckpt' or 'orbax', got {TARGET!r}")

ORBAX_VERSION = "0.12.8"  # the version whose import lines IMPORTS covers

U = "tests.orbax_suite.utils"
IMPORTS = {
    "from orbax.checkpoint import test_utils": f"from {U} import test_utils",
    "from orbax.checkpoint._src.serialization import serialization": f"from {U} import serialization",
    "import orbax.checkpoint.experimental.v1 as ocp": "import ckpt as ocp",
    "from orbax.checkpoint.experimental.v1._src.layout import checkpoint_layout": f"from {U} import checkpoint_layout",
    "from orbax.checkpoint.experimental.v1._src.path import step as path_step_lib":
        "from ckpt.path import step as path_step_lib",
    "from orbax.checkpoint.experimental.v1._src.synchronization import multihost": f"from {U} import multihost",
    "from orbax.checkpoint.experimental.v1._src.testing import array_utils as array_test_utils":
        f"from {U} import array_test_utils",
    "from orbax.checkpoint.experimental.v1._src.testing import handler_utils": f"from {U} import handler_utils",
    "from orbax.checkpoint.experimental.v1._src.testing import tree_utils as tree_test_utils":
        f"from {U} import tree_test_utils",
    "from orbax.checkpoint.experimental.v1._src.tree import types as tree_types": f"from {U} import tree_types",
    # manager_compatibility_test_base.py: its setUp patches Orbax's v0 manager (for Orbax's run); ckpt never calls it
    "from orbax.checkpoint import checkpoint_manager": "from orbax.checkpoint import checkpoint_manager",
    "from orbax.checkpoint._src.sharding_utils import make_single_device_sharding":
        f"from {U} import make_single_device_sharding",
    "from orbax.checkpoint.experimental.v1._src.handlers import registration": "from ckpt import handlers as registration",
    "from orbax.checkpoint.experimental.v1._src.path import step": "from ckpt.path import step",
    "from orbax.checkpoint.experimental.v1._src.testing.compatibility import test_utils as compatibility_test_utils":
        f"from {U} import compatibility_test_utils",
}
_OTHER_IMPORTS = re.compile(r"^(import (datetime|threading|json|os|shutil|jax|jax\.numpy as jnp|numpy as np)"
                            r"|from (typing|unittest|absl\.testing|etils) import .*)$")


def orbax_test_module(relative: str) -> types.ModuleType:
    """Orbax's test module ``orbax/checkpoint/<relative>`` as a module, its imports swapped for ckpt's.

    Example::

        base = orbax_test_module("experimental/v1/_src/training/checkpointer_test_base.py")
        class CheckpointerTest(base.CheckpointerTestBase.Test): ...
    """
    dotted = "orbax.checkpoint." + relative.removesuffix(".py").replace("/", ".")
    if TARGET == "orbax":
        return importlib.import_module(dotted)
    dist = importlib.metadata.distribution("orbax-checkpoint")
    if dist.version != ORBAX_VERSION:
        raise RuntimeError(f"the import table covers orbax-checkpoint {ORBAX_VERSION}; {dist.version} is installed")
    source = dist.locate_file(f"orbax/checkpoint/{relative}").read_text()
    lines = []
    for line in source.splitlines():
        if line.startswith(("import ", "from ")) and not _OTHER_IMPORTS.match(line):
            if line not in IMPORTS:
                raise RuntimeError(f"{relative}: no replacement for {line!r}")
            line = IMPORTS[line]
        lines.append(line)
    module = types.ModuleType(f"tests.orbax_suite.ported.{dotted.rsplit('.', 1)[-1]}")
    module.__file__ = str(dist.locate_file(f"orbax/checkpoint/{relative}"))
    sys.modules[module.__name__] = module
    exec(compile("\n".join(lines) + "\n", module.__file__, "exec"), module.__dict__)
    return module
