"""Checkpointables saved by a handler (:mod:`ckpt.handlers`) or by themselves (``StatefulCheckpointable``).

Each is written into ``<step>/<name>/`` by its handler; tree.json records, under ``"handled"``, the
handler's name (``{"handler": "pkg.mod.FooHandler"}``) or ``{"handler": null}`` for an object that
saved itself. A save runs the handler's ``save`` coroutine in the caller (it may capture state) and
the awaitable it returns in the writer, before the commit. On load, the handler is the registry's
entry for the name, else the one whose ``is_abstract_handleable`` accepts the abstract checkpointable,
else the registry entry whose name is the recorded one: nothing is imported from a name on disk.

Example::

    registry = ckpt.handlers.local_registry().add(TokenizerHandler)
    ctx = ckpt.Context()
    ctx.checkpointables.registry = registry
    with ctx:
        ckpt.save_checkpointables("model", {"state": {"w": np.ones(3)}, "tokenizer": tokenizer})
        assert ckpt.load_checkpointables("model")["tokenizer"] == tokenizer
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable

from ckpt import format as fmt
from ckpt import handlers, storage
from ckpt.context import get_context
from ckpt.errors import CheckpointCorruptedError


def run(awaitable: Awaitable) -> Any:
    """Runs a coroutine (or any awaitable) to completion from synchronous code, in a loop of its own
    (in another thread when this one already runs an event loop, as in a notebook)."""
    async def wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, wait()).result()


@dataclasses.dataclass
class _Directory:
    """The ``PathAwaitingCreation`` a handler's ``save`` gets: ``await_creation()`` makes the directory."""

    path: Path
    make: Callable[[], None]

    async def await_creation(self) -> Path:
        self.make()
        return self.path

    def __truediv__(self, other: str | os.PathLike) -> "_Directory":
        """A path below this directory, as Orbax's: awaiting it makes this directory and returns the path
        (the handler makes the subdirectory itself)."""
        return _Directory(self.path / other, self.make)


def _is_stateful(value: Any) -> bool:
    # a plain container never saves itself, and asking a runtime Protocol costs tens of microseconds
    return (type(value) not in (dict, list, tuple) and not isinstance(value, type)
            and isinstance(value, handlers.StatefulCheckpointable))


def _registry(registry: handlers.CheckpointableHandlerRegistry | None) -> handlers.CheckpointableHandlerRegistry:
    return registry if registry is not None else get_context().checkpointables_options.registry


def saving_handler(name: str, value: Any, registry: handlers.CheckpointableHandlerRegistry | None) -> type | None:
    """The handler type that saves ``value`` as ``name`` (the newest general entry that handles it, unless
    one is registered for the name), or None: a tree, or an object that saves itself."""
    entries = _registry(registry).get_all_entries()
    for handler_type, scope in entries:
        if scope == name:
            return handler_type
    for handler_type, scope in reversed(entries):
        if scope is None and handler_type().is_handleable(value):
            return handler_type
    return None


@dataclasses.dataclass
class Saves:
    """The custom checkpointables of one save: what tree.json records, and the background parts."""

    records: dict[str, dict]
    pending: list[Awaitable]

    def finish(self) -> None:
        """Runs what the handlers left for the background (in the writer, before the commit)."""
        for awaitable in self.pending:
            run(awaitable)
        self.pending = []


def split(checkpointables: dict[str, Any], registry: handlers.CheckpointableHandlerRegistry | None = None
          ) -> tuple[dict[str, Any], dict[str, tuple[type | None, Any]]]:
    """(the trees, {name: (handler type or None for a StatefulCheckpointable, value)}).

    Raises:
      ValueError: ``checkpointables`` is not a non-empty dict, or a name is invalid.
    """
    if not isinstance(checkpointables, dict) or not checkpointables:
        raise ValueError(f"checkpointables must be a non-empty dict of name -> tree, got {type(checkpointables).__name__}")
    trees, custom = {}, {}
    for name, value in checkpointables.items():
        fmt.validate_checkpointable_name(name)
        handler_type = saving_handler(name, value, registry)
        if handler_type is not None:
            custom[name] = (handler_type, value)
        elif _is_stateful(value):
            custom[name] = (None, value)
        else:
            trees[name] = value
    return trees, custom


def start(custom: dict[str, tuple[type | None, Any]], step_dir: Path, prepare: Callable[[], None]) -> Saves:
    """Runs each handler's ``save`` coroutine now; ``step_dir`` is the temporary step directory,
    made by ``prepare`` when a handler first awaits its own directory."""
    records, pending = {}, []
    for name, (handler_type, value) in custom.items():
        def make(path: Path = step_dir / name) -> None:
            prepare()
            storage.make_dir(path)

        directory = _Directory(step_dir / name, make)
        if handler_type is None:
            pending.append(run(value.save(directory)))
        else:
            pending.append(run(handler_type().save(directory, value)))
        records[name] = {"handler": None if handler_type is None else handlers.typestr(handler_type)}
    return Saves(records, pending)


def _loading_handler(name: str, record: dict, abstract: Any, registry: handlers.CheckpointableHandlerRegistry,
                     step_dir: Path) -> Any:
    entries = registry.get_all_entries()
    for handler_type, scope in entries:
        if scope == name:
            return handler_type()
    if abstract is not None:
        for handler_type, scope in reversed(entries):
            if scope is None and handler_type().is_abstract_handleable(abstract):
                return handler_type()
    recorded = record.get("handler")
    for handler_type, scope in reversed(entries):
        if recorded is not None and (handlers.typestr(handler_type) == recorded
                                     or recorded in registry.get_secondary_typestrs(handler_type)):
            return handler_type()
    if recorded is None:  # Orbax's error and words
        raise ValueError(f"To restore a `StatefulCheckpointable`, you must pass an instance of the object. "
                         f"{step_dir}: checkpointable {name!r} was saved by itself: pass the object to load into")
    raise KeyError(f"{step_dir}: checkpointable {name!r} was saved by {recorded}, and no handler for it is "
                   "registered: register one (ckpt.handlers.register_handler, or the Context's checkpointables "
                   "registry), or pass the object to load into")


def loads(name: str, record: dict, abstract: Any, registry: handlers.CheckpointableHandlerRegistry | None = None
          ) -> bool:
    """Whether :func:`load` reads the checkpointable ``name`` (``record``: what its step records): a handler for it
    is registered, or the object saved itself (the object passed loads it; without one, :func:`load` raises
    Orbax's error)."""
    if record.get("handler") is None or _is_stateful(abstract):
        return True
    try:
        _loading_handler(name, record, abstract, _registry(registry), Path())
    except KeyError:
        return False
    return True


def load(step_dir: Path, records: dict[str, dict], abstract: dict[str, Any],
         registry: handlers.CheckpointableHandlerRegistry | None = None) -> dict[str, Any]:
    """Loads the named custom checkpointables (``abstract``: name -> abstract checkpointable or None)."""
    registry = _registry(registry)
    out = {}
    for name, target in abstract.items():
        directory = _made_directory(step_dir, name)
        if _is_stateful(target) and not isinstance(target, type):
            run(run(target.load(directory)))
            out[name] = target
            continue
        handler = _loading_handler(name, records[name], target, registry, step_dir)
        out[name] = run(run(handler.load(directory, target)))
    return out


def metadata(step_dir: Path, records: dict[str, dict],
             registry: handlers.CheckpointableHandlerRegistry | None = None) -> dict[str, Any]:
    """What each custom checkpointable's handler says was saved (None, as in Orbax, for one without a
    registered handler and for a ``StatefulCheckpointable``, which saved itself)."""
    registry = _registry(registry)
    out = {}
    for name, record in records.items():
        try:
            handler = _loading_handler(name, record, None, registry, step_dir)
        except (KeyError, ValueError):  # no handler for it; ValueError: it saved itself
            out[name] = None
            continue
        out[name] = run(handler.metadata(_made_directory(step_dir, name)))
    return out


def _made_directory(step_dir: Path, name: str) -> Path:
    """``<step>/<name>``, the directory ckpt made for the checkpointable's files, for its handler.

    Raises:
      CheckpointCorruptedError: something else is there (a symbolic link, which would hand the handler
        what lies outside the step; a file): ckpt never hands it over.
    """
    directory = step_dir / name
    if isinstance(directory, Path) and os.path.lexists(directory) and not stat.S_ISDIR(os.lstat(directory).st_mode):
        raise CheckpointCorruptedError(f"{directory} is {storage.describe(directory)}, not the directory ckpt made "
                                       f"for checkpointable {name!r}: its handler is not given it", path=step_dir)
    return directory
