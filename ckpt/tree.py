"""Flatten and unflatten trees with key paths, and describe their structure as JSON.

Containers: dict, OrderedDict and Counter (str or int keys; a torch ``state_dict`` is an OrderedDict,
the milestones in ``MultiStepLR``'s a Counter), list, tuple, NamedTuple and, when jax is imported, every
registered jax pytree node (flax struct dataclasses, FrozenDict, nnx.State, optax states). Everything
else is a leaf, including None, which is stored as a value so that it round-trips.

A key path is a tuple of entries ``("key", k)`` (a dict key), ``("idx", i)`` (a sequence position) or
``("attr", name)`` (a field); :func:`keystr` renders it as jax does: ``['params']['w']``, ``[0]``, ``.mu``.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import operator
import sys
from typing import Any, Callable, Iterator

import numpy as np

KeyEntry = tuple[str, Any]
KeyPath = tuple[KeyEntry, ...]

# Never containers: skip the container checks (and jax's, which cost microseconds) for them. jax's
# array types join when first seen (an isinstance check against jax.Array costs about 2 us).
_PLAIN_LEAVES = {np.ndarray, int, float, bool, str, bytes, type(None)}
_STR = {str}
# The dict types stored as dicts, each with what makes it again from (key, value) pairs (Counter's own
# constructor would count the pairs).
_DICTS = {dict: dict, collections.OrderedDict: collections.OrderedDict,
          collections.Counter: lambda pairs: collections.Counter(dict(pairs))}


@dataclasses.dataclass(eq=False)
class Node:
    """One container (or a leaf) of a flattened tree.

    ``kind`` is one of leaf, dict, list, tuple, namedtuple, pytree. ``rebuild`` turns child values
    back into the container (absent for structures read from a manifest). Nodes compare by identity:
    every leaf's node is :data:`LEAF`.
    """

    kind: str
    keys: list[KeyEntry] = dataclasses.field(default_factory=list)
    children: list["Node"] = dataclasses.field(default_factory=list)
    name: str | None = None
    rebuild: Callable[[list[Any]], Any] | None = None
    container: type | None = None  # the flattened container's type (absent for structures read from a manifest)


LEAF = Node("leaf")  # every leaf's node: nodes are never changed once built
_KEY = operator.itemgetter(1)  # a key entry's key


@dataclasses.dataclass(frozen=True)
class Stored:
    """A tree given as a step stores it: its structure (read from tree.json, :func:`from_json`) and its
    leaves in flatten order. :func:`flatten` gives back that very structure, namedtuples, pytree nodes and
    their names included, which a tree loaded without an abstract tree no longer has (``ckpt convert``).
    """

    node: Node
    leaves: list[Any]


def keystr(path: KeyPath) -> str:
    """Renders a key path the way jax does: ``['params']['w']``, ``[0]``, ``.count``."""
    return "".join(map(_entry_str, path))


def keystrs(paths: list[KeyPath]) -> list[str]:
    """:func:`keystr` of each path; a path's parent is rendered once for a run of its children."""
    out, parent, prefix = [], None, ""
    for path in paths:
        if not path:
            out.append("")
            continue
        head = path[:-1]
        if head != parent:
            parent, prefix = head, keystr(head)
        out.append(prefix + _entry_str(path[-1]))
    return out


def _entry_str(entry: KeyEntry) -> str:
    kind, key = entry
    if kind == "attr":
        return f".{key}"
    if kind == "idx" or not isinstance(key, str):
        return f"[{key}]"
    return f"[{key!r}]"


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _jax_children(x: Any) -> tuple[list[KeyEntry], list[Any], Any] | None:
    """One level of a registered jax pytree node, or None if ``x`` is a jax leaf (or jax is absent)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):  # jax leaves: skip the flatten call
        _PLAIN_LEAVES.add(type(x))
        return None
    tree_util = jax.tree_util
    flat, treedef = tree_util.tree_flatten_with_path(x, is_leaf=lambda node: node is not x)
    if treedef.num_leaves == 1 and tree_util.treedef_is_leaf(treedef):  # (a node without children has no leaf)
        return None
    keys, children = [], []
    for path, child in flat:
        (entry,) = path
        if isinstance(entry, tree_util.GetAttrKey):
            keys.append(("attr", entry.name))
        elif isinstance(entry, tree_util.SequenceKey):
            keys.append(("idx", entry.idx))
        elif isinstance(entry, tree_util.DictKey):
            keys.append(("key", entry.key))
        elif isinstance(entry, tree_util.FlattenedIndexKey):
            keys.append(("idx", entry.key))
        else:
            keys.append(("key", str(entry)))
        children.append(child)
    return keys, children, treedef


def children(x: Any) -> tuple[list[Any], list[Any]] | None:
    """The keys and children of a registered jax pytree node, one level down; None for anything else."""
    found = _jax_children(x)
    return None if found is None else ([key for _, key in found[0]], found[1])


def flatten(tree: Any, *, prefix: KeyPath = ()) -> tuple[Node, list[tuple[KeyPath, Any]]]:
    """Splits ``tree`` into its structure and its ``(key_path, leaf)`` pairs, in a stable order.

    Raises:
      TypeError: a dict key (or a registered pytree's) that is neither str nor int (named by its key path).
      ValueError: a tree nested deeper than Python's recursion allows, or one that holds itself; a registered
        pytree node that gives two children the same key.
    """
    if type(tree) is Stored:
        return tree.node, list(zip(leaf_paths(tree.node, prefix), tree.leaves))
    leaves: list[tuple[KeyPath, Any]] = []

    def check_key(k: Any, path: KeyPath) -> None:
        if type(k) is not str and (isinstance(k, bool) or not isinstance(k, (str, int))):
            raise TypeError(f"dict key {k!r} of type {type(k).__name__} at {keystr(path) or 'the root'} cannot be "
                            "stored: only str and int keys round-trip")

    def visit_children(keys: list[tuple[str, Any]], values: Any, path: KeyPath) -> list[Node]:
        values = list(values)
        if set(map(type, values)) <= _PLAIN_LEAVES:  # the usual node: every child a leaf, in a few passes in C
            leaves.extend(zip(map(path.__add__, zip(keys)), values))
            return [LEAF] * len(values)
        return [visit(v, path + (k,)) for k, v in zip(keys, values)]

    def visit(x: Any, path: KeyPath) -> Node:
        if type(x) in _PLAIN_LEAVES:
            leaves.append((path, x))
            return LEAF
        if type(x) in _DICTS:
            if not set(map(type, x)) <= _STR:
                for k in x:
                    check_key(k, path)
            keys = list(zip(itertools.repeat("key"), x))
            return Node("dict", keys, visit_children(keys, x.values(), path),
                        rebuild=lambda vals, ks=list(x), make=_DICTS[type(x)]: make(zip(ks, vals)), container=type(x))
        if _is_namedtuple(x):
            keys = [("attr", f) for f in type(x)._fields]
            return Node("namedtuple", keys, visit_children(keys, x, path), name=type(x).__name__,
                        rebuild=lambda vals, t=type(x): t(*vals), container=type(x))
        if type(x) in (list, tuple):
            keys = list(zip(itertools.repeat("idx"), range(len(x))))
            return Node(type(x).__name__, keys, visit_children(keys, x, path), rebuild=type(x), container=type(x))
        if x is not None:
            try:
                node = _jax_children(x)
            except (TypeError, ValueError) as e:  # (a defaultdict of int and str keys, which jax sorts)
                raise TypeError(f"the {type(x).__name__} at {keystr(path) or 'the root'} cannot be flattened as the "
                                f"jax pytree node it is: {e}") from None
            if node is not None:
                keys, values, treedef = node
                for kind, k in keys:
                    if kind == "key":
                        check_key(k, path)
                if len(set(map(_KEY, keys))) != len(keys):
                    raise _repeated_keys(x, keys, path)
                children = visit_children(keys, values, path)
                jax = sys.modules["jax"]
                return Node(
                    "pytree", keys, children, name=type(x).__name__,
                    rebuild=lambda vals, td=treedef: jax.tree_util.tree_unflatten(td, vals), container=type(x),
                )
        leaves.append((path, x))
        return LEAF

    try:
        node = visit(tree, prefix)
    except RecursionError:
        raise ValueError("the tree is nested deeper than Python's recursion limit allows, or holds itself (a "
                         "container inside itself): neither can be stored") from None
    del visit  # it refers to itself: kept, it would keep ``leaves`` until the collector found the cycle
    return node, leaves


def _repeated_keys(x: Any, keys: list[KeyEntry], path: KeyPath) -> ValueError:
    """The error for a registered pytree node whose flatten gives two children the same key (a custom key
    type rendered as the same text, ``.a`` beside ``['a']``): a step keeps each child under its key, so a
    load could not tell them apart."""
    seen: dict[Any, KeyEntry] = {}
    for entry in keys:
        first = seen.setdefault(entry[1], entry)
        if first is not entry:
            break
    return ValueError(f"the {type(x).__name__} at {keystr(path) or 'the root'} gives two of its children the key "
                      f"{entry[1]!r} ({keystr(path + (first,))} and {keystr(path + (entry,))}): ckpt stores each child "
                      "under its key, so they must differ (give the pytree's flatten_with_keys distinct keys)")


def unflatten(node: Node, leaves: Iterator[Any]) -> Any:
    """Rebuilds a tree of ``node``'s structure from leaves taken in flatten order."""
    if node.kind == "leaf":
        return next(leaves)
    children = node.children
    if children.count(LEAF) == len(children):  # the usual node, its leaves taken at once
        values = list(itertools.islice(leaves, len(children)))
        if len(values) != len(children):
            raise ValueError(f"{len(values)} leaves for a {node.kind} of {len(children)}")
    else:
        values = [next(leaves) if child.kind == "leaf" else unflatten(child, leaves) for child in children]
    if node.rebuild is not None:
        return node.rebuild(values)
    return _plain_container(node, values)


def _plain_container(node: Node, values: list[Any]) -> Any:
    """The container a structure read from disk becomes: its own kind, or a dict for typed nodes (None
    for a typed node without children, such as optax's ``EmptyState``, as Orbax loads it)."""
    if node.kind in ("namedtuple", "pytree") and not node.children:
        return None
    if node.kind == "list":
        return values
    if node.kind == "tuple":
        return tuple(values)
    if node.kind == "pytree" and node.keys and all(kind == "idx" for kind, _ in node.keys):
        return values
    return {key: value for (_, key), value in zip(node.keys, values)}


def to_text(node: Node) -> str:
    """The structure as JSON text: ``{"t": kind, "c": children, "k": keys, "n": type name}`` (keys for
    dicts, namedtuples and pytrees; a name for namedtuples and pytrees), written from the nodes
    without a JSON object per node (a leaf is ``{"t":"leaf"}``)."""
    if node.kind == "leaf":
        return _LEAF_TEXT
    children = node.children
    if children.count(LEAF) == len(children):  # the usual node, its leaves written at once
        inner = ",".join([_LEAF_TEXT] * len(children))
    else:
        inner = ",".join([_LEAF_TEXT if child.kind == "leaf" else to_text(child) for child in children])
    keys = f',"k":{_ENCODE(node.keys)}' if node.kind in ("dict", "namedtuple", "pytree") else ""
    name = "" if node.name is None else f',"n":{_ENCODE(node.name)}'
    return f'{{"t":{_ENCODE(node.kind)},"c":[{inner}]{keys}{name}}}'


def to_json(node: Node) -> dict:
    """The structure as JSON (see :func:`to_text`)."""
    return json.loads(to_text(node))


_LEAF_TEXT = '{"t":"leaf"}'
_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode  # key tuples as JSON arrays


def from_json(data: dict) -> Node:
    """Inverse of :func:`to_json` (without the original Python types)."""
    kind = data["t"]
    if kind == "leaf":
        return LEAF
    children = [LEAF if c["t"] == "leaf" else from_json(c) for c in data["c"]]  # leaves without a call
    keys = data.get("k")  # (null, as absent: the keys of a pytree node's children are their indices)
    keys = [("idx", i) for i in range(len(children))] if keys is None else list(map(tuple, keys))
    return Node(kind, keys, children, name=data.get("n"))


def same_keys(a: Node, b: Node) -> bool:
    """Whether two structures have the same keys, in the same order, at every level (then their
    leaves pair up in flatten order; the kinds of their containers may differ)."""
    if a.kind == "leaf" or b.kind == "leaf":
        return a.kind == b.kind
    if len(a.keys) != len(b.keys) or (a.keys != b.keys and any(ka[1] != kb[1] for ka, kb in zip(a.keys, b.keys))):
        return False
    for ca, cb in zip(a.children, b.children):
        if ca is not cb and not same_keys(ca, cb):  # (every leaf's node is LEAF)
            return False
    return True


def plain_leaves(node: Node, tree: Any) -> list[Any] | None:
    """The leaves of ``tree`` in flatten order when it has the structure ``node`` (read from a manifest)
    in plain containers: a dict, list or tuple where ``node`` has one, with the same keys in the same order
    (and of the same types), and a leaf of a type :func:`flatten` never descends into where ``node`` has
    a leaf; else None. :func:`flatten` of such a tree gives :func:`same_keys` structures, so its leaves
    pair with ``node``'s in order: this finds them without a key path made per leaf."""
    out: list[Any] = []
    try:
        if not _plain_walk(node, tree, out):
            return None
    except RecursionError:  # (flatten says why)
        return None
    return out if set(map(type, out)) <= _PLAIN_LEAVES else None


_PLAIN_KINDS = {"dict": dict, "list": list, "tuple": tuple}


def _plain_walk(node: Node, x: Any, out: list[Any]) -> bool:
    if node.kind == "leaf":
        out.append(x)
        return True
    if type(x) is not _PLAIN_KINDS.get(node.kind):
        return False
    keys = list(map(_KEY, node.keys))
    if type(x) is dict:
        if list(x) != keys or (not set(map(type, x)) <= _STR and list(map(type, x)) != list(map(type, keys))):
            return False  # (1 == 1.0 == True: the keys' types count, as flatten refuses all but str and int)
        values: Any = x.values()
    elif keys != list(range(len(x))):
        return False
    else:
        values = x
    children = node.children
    if children.count(LEAF) == len(children):  # the usual node, its leaves taken at once
        out.extend(values)
        return True
    return all(map(_plain_walk, children, values, itertools.repeat(out)))


def leaf_order(a: Node, b: Node) -> list[int] | None:
    """Where each leaf of ``a`` is among the leaves of ``b`` (positions in flatten order) when the two
    have the same keys at every level, in any order (a dict saved in insertion order, its
    ``jax.eval_shape`` with sorted keys); None when they do not."""
    counts: dict[int, int] = {}
    out: list[int] = []

    def count(node: Node) -> int:  # the leaves under one of b's nodes (without recursion: b is read from a file)
        found = counts.get(id(node))
        if found is None:
            found, stack = 0, [node]
            while stack:
                below = stack.pop()
                if below.kind == "leaf":
                    found += 1
                else:
                    stack.extend(below.children)
            counts[id(node)] = found
        return found

    def visit(x: Node, y: Node, start: int) -> bool:  # recurses as deep as a, the caller's tree
        if x.kind == "leaf" or y.kind == "leaf":
            out.append(start)
            return x.kind == y.kind
        if x.children.count(LEAF) == len(x.children) == len(y.children) == y.children.count(LEAF):
            # the usual node, of leaves only: matched in a few passes in C, without a call per leaf
            where = dict(zip(map(_KEY, y.keys), range(start, start + len(y.keys))))
            found = list(map(where.get, map(_KEY, x.keys)))
            out.extend(found)
            return len(where) == len(found) and None not in found
        where, position = {}, start
        for (_, key), child in zip(y.keys, y.children):
            where[key] = (child, position)
            position += 1 if child.kind == "leaf" else count(child)
        if len(x.keys) != len(y.keys) or len(where) != len(y.keys):
            return False
        for (_, key), child in zip(x.keys, x.children):
            found = where.get(key)
            if found is None or not visit(child, *found):
                return False
        return True

    return out if visit(a, b, 0) else None


def stored_leaves(node: Node, tree: Any) -> list[Any]:
    """The leaves of ``tree``, which :func:`unflatten` built from ``node`` (a structure read from a manifest,
    so of plain containers), in flatten order: a typed node without children, loaded as None, has none."""
    if node.kind == "leaf":
        return [tree]
    if not node.children:
        return []
    values = tree.values() if isinstance(tree, dict) else tree
    return [leaf for child, value in zip(node.children, values) for leaf in stored_leaves(child, value)]


def leaf_paths(node: Node, prefix: KeyPath = ()) -> list[KeyPath]:
    """The key paths of ``node``'s leaves, in flatten order."""
    if node.kind == "leaf":
        return [prefix]
    out = []
    for key, child in zip(node.keys, node.children):
        out.extend(leaf_paths(child, prefix + (key,)))
    return out


def subtree(node: Node, path: KeyPath) -> Node | None:
    """The node at ``path`` below ``node``, or None if there is none."""
    for key in path:
        if node.kind == "leaf":
            return None
        for k, child in zip(node.keys, node.children):
            if k[1] == key[1]:
                node = child
                break
        else:
            return None
    return node
