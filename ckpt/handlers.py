"""Custom checkpointables: one protocol for a handler, one for an object that saves itself, one table.

A checkpointable that is not a tree (a tokenizer, a data iterator's position) is saved by a handler
into a directory of its own inside the step (``<step>/<name>/``). The protocols are Orbax's, so an
Orbax handler works unchanged. On load a handler is found only in a registry, by the checkpointable's
name, by what the abstract checkpointable asks for, or by the handler name recorded at save time
looked up in the registry: nothing is imported or built from a name read from disk.

Example::

    @ckpt.handlers.register_handler
    class TokenizerHandler:                      # any class with these five methods
        async def save(self, directory, checkpointable):
            path = await directory.await_creation()
            (path / "vocab.json").write_text(json.dumps(checkpointable.vocab))
            async def done(): pass
            return done()                        # runs in the background, before the commit
        async def load(self, directory, abstract_checkpointable=None):
            async def read(): return Tokenizer(json.loads((directory / "vocab.json").read_text()))
            return read()
        async def metadata(self, directory): return AbstractTokenizer()
        def is_handleable(self, checkpointable): return isinstance(checkpointable, Tokenizer)
        def is_abstract_handleable(self, abstract): return isinstance(abstract, AbstractTokenizer)

    ckptr.save_checkpointables(0, {"state": state, "tokenizer": tokenizer})
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Awaitable, Protocol, Sequence, TypeVar, runtime_checkable

T = TypeVar("T")
AbstractT = TypeVar("AbstractT")

Checkpointable = Any
"""Orbax's name for what a handler saves (any object), for annotations."""
AbstractCheckpointable = Any
"""Orbax's name for what a handler loads into and its ``metadata`` returns, for annotations."""


class PathAwaitingCreation(Protocol):
    """A directory that exists once ``await_creation()`` returns (handed to ``save``)."""

    @property
    def path(self) -> Path:
        """Where the directory will be."""

    async def await_creation(self) -> Path:
        """Waits until the directory exists; returns it."""

    def __truediv__(self, other: str | os.PathLike) -> "PathAwaitingCreation":
        """A path below the directory, whose ``await_creation()`` waits for the directory and returns it."""


@runtime_checkable
class CheckpointableHandler(Protocol[T, AbstractT]):
    """Saves and loads one kind of checkpointable in a directory of its own (Orbax's protocol).

    ``save`` and ``load`` are coroutines that do what must happen before the caller goes on and
    return an awaitable of the rest, which runs in the background (before the step is committed).

    Example::

        registry = ckpt.handlers.local_registry().add(TokenizerHandler)
        ckptr = ckpt.Checkpointer("runs/exp1", context=ckpt.Context(checkpointables_options=
                                   ckpt.CheckpointablesOptions(registry=registry)))
    """

    async def save(self, directory: PathAwaitingCreation, checkpointable: T) -> Awaitable[None]:
        """Starts saving ``checkpointable`` into ``directory``."""

    async def load(self, directory: Path, abstract_checkpointable: AbstractT | None = None) -> Awaitable[T]:
        """Starts loading the checkpointable saved in ``directory``."""

    async def metadata(self, directory: Path) -> AbstractT:
        """What was saved in ``directory``, without loading it."""

    def is_handleable(self, checkpointable: Any) -> bool:
        """Whether this handler saves ``checkpointable``."""

    def is_abstract_handleable(self, abstract_checkpointable: Any) -> bool | None:
        """Whether this handler loads into ``abstract_checkpointable``."""


@runtime_checkable
class StatefulCheckpointable(Protocol):
    """An object that saves itself into a directory and loads itself back in place (no handler needed).

    Example::

        class Counter:
            def __init__(self): self.n = 0
            async def save(self, directory):
                path = await directory.await_creation()
                (path / "n").write_text(str(self.n))
                async def done(): pass
                return done()
            async def load(self, directory):
                async def read(): self.n = int((directory / "n").read_text())
                return read()

        ckptr.save_checkpointables(0, {"counter": counter})
        ckptr.load_checkpointables(0, {"counter": counter})   # counter.n is the saved value
    """

    async def save(self, directory: PathAwaitingCreation) -> Awaitable[None]:
        """Starts saving this object into ``directory``."""

    async def load(self, directory: Path) -> Awaitable[None]:
        """Starts loading this object's saved state from ``directory`` into itself."""


def typestr(handler_type: type) -> str:
    """The name recorded for a handler in a checkpoint (looked up in a registry on load, never imported)."""
    return f"{handler_type.__module__}.{handler_type.__qualname__}"


class CheckpointableHandlerRegistry:
    """Handler types, each for any checkpointable or for one name; the later entry wins a tie.

    Example::

        registry = ckpt.handlers.local_registry()
        registry.add(TokenizerHandler, checkpointable_name="tokenizer")
        assert registry.get("tokenizer") is TokenizerHandler
    """

    def __init__(self, other: CheckpointableHandlerRegistry | None = None):
        self._entries: list[tuple[type, str | None]] = list(other.get_all_entries()) if other else []
        self._secondary: dict[type, Sequence[str]] = {}

    def add(self, handler_type: type, *, checkpointable_name: str | None = None,
            secondary_typestrs: Sequence[str] | None = None) -> CheckpointableHandlerRegistry:
        """Adds a handler type; ValueError when the name or the (unnamed) type is already there."""
        if not isinstance(handler_type, type):
            raise ValueError(f"The `handler_type` must be a type, but got {handler_type}.")
        if checkpointable_name is not None and self.has(checkpointable_name):
            raise ValueError(f"Entry for checkpointable_name={checkpointable_name} already exists in the registry.")
        if checkpointable_name is None and (handler_type, None) in self._entries:
            raise ValueError(f"Handler type {handler_type} already exists in the registry.")
        self._entries.append((handler_type, checkpointable_name))
        if secondary_typestrs is not None:
            self._secondary[handler_type] = tuple(secondary_typestrs)
        return self

    def get(self, checkpointable_name: str) -> type:
        """The handler type registered for ``checkpointable_name``; KeyError when none is."""
        for handler_type, name in self._entries:
            if name == checkpointable_name:
                return handler_type
        raise KeyError(f"No entry for checkpointable_name={checkpointable_name} in the registry.")

    def has(self, checkpointable_name: str) -> bool:
        """Whether a handler is registered for ``checkpointable_name``."""
        return any(name == checkpointable_name for _, name in self._entries)

    def get_all_entries(self) -> Sequence[tuple[type, str | None]]:
        """Every (handler type, checkpointable name or None), in the order added."""
        return list(self._entries)

    def get_secondary_typestrs(self, handler_type: type) -> Sequence[str]:
        """The other names ``handler_type`` answers to on load (a renamed handler's old name)."""
        return self._secondary.get(handler_type, ())

    def __repr__(self) -> str:
        return f"CheckpointableHandlerRegistry({self._entries})"


_GLOBAL = CheckpointableHandlerRegistry()


def global_registry() -> CheckpointableHandlerRegistry:
    """The registry :func:`register_handler` adds to; every save and load looks here.

    Example::

        assert ckpt.handlers.global_registry().get_all_entries() is not None
    """
    return _GLOBAL


def local_registry(other_registry: CheckpointableHandlerRegistry | None = None, *,
                   include_global_registry: bool = True) -> CheckpointableHandlerRegistry:
    """A new registry: the global one's entries (unless excluded), then ``other_registry``'s.

    Example::

        registry = ckpt.handlers.local_registry().add(TokenizerHandler)
        ctx = ckpt.Context()
        ctx.checkpointables.registry = registry
        with ctx:
            ckpt.save_checkpointables("model", {"tokenizer": tokenizer})
    """
    registry = CheckpointableHandlerRegistry(_GLOBAL if include_global_registry else None)
    for handler_type, name in (other_registry.get_all_entries() if other_registry else ()):
        registry.add(handler_type, checkpointable_name=name,
                     secondary_typestrs=other_registry.get_secondary_typestrs(handler_type) or None)
    return registry


def register_handler(cls: type, *, checkpointable_name: str | None = None,
                     secondary_typestrs: Sequence[str] | None = None) -> type:
    """Adds the handler class ``cls`` to the global registry (usable as a class decorator); returns it.

    Example::

        @ckpt.handlers.register_handler
        class TokenizerHandler: ...
    """
    if (cls, checkpointable_name) not in _GLOBAL.get_all_entries():
        _GLOBAL.add(cls, checkpointable_name=checkpointable_name, secondary_typestrs=secondary_typestrs)
    return cls
