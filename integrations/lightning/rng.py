"""The random number generators a training step draws from, as checkpointable values.

Covers torch's default generator (CPU, and CUDA when initialised), numpy's global ``RandomState``,
Python's ``random``, and the ``torch.Generator`` objects held by DataLoaders and their samplers
(``DataLoader(generator=...)``, a sampler's ``generator``). States are tensors and Python numbers only, so
that ckpt stores them as they are and a Lightning ``.ckpt`` holding them still loads with
``torch.load(weights_only=True)``.

Example::

    state = capture(loaders)
    ...                       # draws
    restore(state, loaders)   # the same draws again
"""
from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch


def capture(loaders: Iterable[Any] = ()) -> dict[str, Any]:
    """The current state of every generator, ``loaders``' own generators included."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "loaders": [g.get_state() for g in _loader_generators(loaders)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any], loaders: Iterable[Any] = ()) -> None:
    """Sets every generator to ``state`` (from :func:`capture`, possibly after a save and load)."""
    _set(state, torch.set_rng_state, np.random.set_state, random.setstate, _loader_generators(loaders))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def is_state(state: Any) -> bool:
    """Whether :func:`restore` sets the generators to ``state`` (a value read from a checkpoint, which may be
    forged), tried on generators of its own: torch, numpy and Python refuse a state of another size or kind."""
    try:
        loaders = [torch.Generator() for _ in state["loaders"]]
        _set(state, torch.Generator().set_state, np.random.RandomState().set_state, random.Random().setstate, loaders)
        cuda = state.get("torch_cuda", [])
        return isinstance(cuda, list) and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError):
        return False


def _set(state: dict[str, Any], set_torch: Any, set_numpy: Any, set_python: Any,
         loaders: list[torch.Generator]) -> None:
    """Sets torch's, numpy's, Python's and the ``loaders``' generators to ``state`` with these setters."""
    set_torch(state["torch"])
    numpy = state["numpy"]
    set_numpy((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
               numpy["cached_gaussian"]))
    python = state["python"]
    set_python((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    for generator, saved in zip(loaders, state["loaders"]):
        generator.set_state(saved)


def _loader_generators(loaders: Iterable[Any]) -> list[torch.Generator]:
    """The distinct generators of the loaders and their samplers (a ``batch_sampler``'s and its sampler's
    included: ``DataLoader(batch_sampler=BatchSampler(RandomSampler(data, generator=g), ...))``), in a stable order."""
    found: list[torch.Generator] = []
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found
