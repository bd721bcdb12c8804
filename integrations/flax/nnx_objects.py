"""NNX objects (models, optimizers, ``nnx.Rngs``) as checkpointable trees, restored in place.

An NNX object is stored as ``nnx.state(obj)``, the pytree of its Variables (key paths such as
``['linear']['kernel'].value``), the form the Flax guide saves, less the ``nnx.Intermediate`` values
``sow`` recorded in its last call, each Variable as a plain one holding its array (a model built under
``nnx.var_defaults(ref=True)`` or ``hijax=True`` keeps its values in ``jax.Ref``s or hijax Variables, which
are not arrays; restored, they are in their mode again). Anything else in a tree is left as is,
so ``(model, optimizer)`` becomes ``(nnx.state(model), nnx.state(optimizer))`` and a TrainState
passes through untouched. ``flax.nnx`` is looked up only if it is already imported: a tree that holds
an NNX object implies it is.

Example:
    >>> tree = nnx_states((model, optimizer))   # what CheckpointHook saves
    >>> restored = checkpointer.load(None, tree)
    >>> update_nnx_in_place((model, optimizer), restored)
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import jax


def is_nnx_object(x: Any) -> bool:
    """True for an NNX graph object (a Module, an Optimizer, Rngs), False for a Variable or anything else."""
    kind = type(x)
    found = _NNX_TYPES.get(kind)
    if found is None:  # (asked once per type: flax's test costs microseconds, a save asks it of every leaf)
        nnx = sys.modules.get("flax.nnx")
        found = nnx is not None and nnx.graph.is_graph_node(x) and not isinstance(x, nnx.Variable)
        if nnx is not None:
            _NNX_TYPES[kind] = found
    return found


_NNX_TYPES: dict[type, bool] = {}  # whether the objects of a type are NNX objects (a type's own property)


def contains_nnx_objects(tree: Any) -> bool:
    """True when some node of ``tree`` is an NNX object (never when ``flax.nnx`` is not imported)."""
    if "flax.nnx" not in sys.modules:
        return False
    return any(is_nnx_object(leaf) or (_mixed_keys(leaf) and any(map(contains_nnx_objects, leaf.values())))
               for leaf in jax.tree.leaves(tree, is_leaf=_stop))


def _mixed_keys(x: Any) -> bool:
    """True for a dict whose keys are of more than one type (int beside str): jax sorts a dict's keys to
    flatten it, which fails for these, so the functions here descend into them themselves."""
    return type(x) is dict and len(set(map(type, x))) > 1


def _stop(x: Any) -> bool:
    return is_nnx_object(x) or _mixed_keys(x)


def _map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``jax.tree.map(fn, tree, *rest)`` with NNX objects and None as leaves, and dicts of mixed key types
    descended into here, their keys kept in order."""
    def visit(x: Any, *others: Any) -> Any:
        if _mixed_keys(x):
            return {k: _map(fn, v, *(other[k] for other in others)) for k, v in x.items()}
        return fn(x, *others)

    return jax.tree.map(visit, tree, *rest, is_leaf=lambda x: x is None or _stop(x))


def nnx_states(tree: Any) -> Any:
    """``tree`` with every NNX object replaced by its state, ``nnx.state(obj)`` without the ``nnx.Intermediate``
    values its last call sowed (outputs of a step, not state: a fresh model has none); the tree itself when it
    has no NNX object."""
    if not contains_nnx_objects(tree):
        return tree
    nnx = sys.modules["flax.nnx"]
    return _map(lambda x: _plain(nnx, _state(nnx, x)) if is_nnx_object(x) else x, tree)


def _state(nnx: Any, obj: Any) -> Any:
    """``nnx.state(obj)`` less the ``nnx.Intermediate`` values ``sow`` recorded."""
    return nnx.state(obj, nnx.Not(nnx.Intermediate))


def _variables(nnx: Any, state: Any) -> tuple[list[Any], Any]:
    """The leaves of ``state`` with its Variables as leaves, and its treedef."""
    return jax.tree.flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _plain(nnx: Any, state: Any) -> Any:
    """``state`` with each Variable in ``ref`` or ``hijax`` mode copied as a plain Variable holding its array
    (a ``jax.Ref`` read), so that it has the key paths and leaves of a plain model's state."""
    leaves, treedef = _variables(nnx, state)
    if not any(_mode(nnx, v, "ref") or _mode(nnx, v, "hijax") for v in leaves):
        return state
    plain = [v.copy(ref=False, hijax=False) if isinstance(v, nnx.Variable) else v for v in leaves]
    return jax.tree.unflatten(treedef, plain)


def _mode(nnx: Any, x: Any, mode: str) -> bool:
    """True for a Variable in that mode (``"ref"``, ``"hijax"``; flax before 0.12 has neither)."""
    return isinstance(x, nnx.Variable) and bool(getattr(x, mode, False))


def _in_modes_of(nnx: Any, obj: Any, state: Any) -> Any:
    """``state`` (restored into ``_plain(nnx, _state(nnx, obj))``) with each Variable that is a ``ref`` one in
    ``obj`` made one again: ``nnx.update`` puts a restored Variable's value itself into ``obj``'s, which would
    otherwise hold a plain array where its code writes into a ``jax.Ref``."""
    modes = [_mode(nnx, v, "ref") for v in _variables(nnx, _state(nnx, obj))[0]]
    if not any(modes):
        return state
    leaves, treedef = _variables(nnx, state)
    return jax.tree.unflatten(treedef, [v.copy(ref=True) if ref else v for v, ref in zip(leaves, modes)])


def update_nnx_in_place(target: Any, restored: Any) -> Any:
    """Writes the restored states into ``target``'s NNX objects (``nnx.update``) and returns the result.

    The result is ``target``'s tree with its NNX objects (now updated) and every other leaf taken
    from ``restored``; without NNX objects it is ``restored`` itself.
    """
    if not contains_nnx_objects(target):
        return restored
    nnx = sys.modules["flax.nnx"]

    def put(node: Any, state: Any) -> Any:
        if not is_nnx_object(node):
            return state
        nnx.update(node, _in_modes_of(nnx, node, state))
        return node

    return _map(put, target, restored)  # (a None of target is a leaf: it received the value as saved, any subtree)
