"""tree.json as text: each checkpointable's structure and table of leaf entries, then the document.

A leaf table (see :mod:`ckpt.leaf_table`) is written column by column from the text of each leaf's
field (:func:`rows`); the texts of a packed leaf but its CRC32 do not change from one save of a tree to
the next, so the layout of a reused plan keeps them, and a save adds only the CRC32s (:func:`table`).
The bytes are those ``json.dumps`` of the whole document writes.
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Iterable, Iterator, Sequence

from ckpt import format as fmt
from ckpt.leaf_table import COLUMNS, FIELDS
from ckpt.tree import KeyPath, keystrs

_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_STRING = json.encoder.encode_basestring_ascii  # a str as _ENCODE writes it
_ARRAY_KEYS = ("type", "dtype", "shape")
_ROW_COLUMNS = tuple(name for name in COLUMNS if name != "crc32")
NULL = "null"


def rows(paths: Sequence[str], metas: Sequence[dict], spans: Sequence[tuple[int, int] | None]) -> dict[str, list[str]]:
    """The text of each field of the leaves at key paths ``paths`` (their manifest entries ``metas``,
    their ``[offset, nbytes]`` in the packed array or None) in tree.json's table, their CRC32 aside: one
    list per column but ``crc32``. Each entry object (leaves alike share one, see
    :func:`ckpt.leaves.describe`) is written once, and each distinct type, dtype and shape encoded once.

    Example::

        texts = rows([".w"], [{"type": "numpy", "dtype": "float32", "shape": [2]}], [(0, 8)])
        assert table(texts, ["7"]) == ('{"path":[".w"],"type":["numpy"],"dtype":["float32"],"shape":[[2]],'
                                       '"packed":[[0,8]],"crc32":[7],"more":[null]}')
    """
    unique, at = _distinct(metas)
    fields = _fields(unique)
    types, dtypes, shapes, more_texts = fields if at is None else [list(map(column.__getitem__, at)) for column in fields]
    spans_texts = [NULL if span is None else f"[{span[0]},{span[1]}]" for span in spans]
    return dict(zip(_ROW_COLUMNS, (list(map(_STRING, paths)), types, dtypes, shapes, spans_texts, more_texts)))


def heads(paths: Sequence[KeyPath], metas: Sequence[dict], offsets: Sequence[int | None], nbytes: Sequence[int],
          counts: Sequence[int]) -> tuple[list[list[bytes]], list[str]]:
    """The :func:`head` of each of the consecutive tables of ``counts`` leaves (their key paths, manifest entries,
    and offsets in the packed array (None for a leaf not packed) and sizes), and the ``more`` text of each leaf:
    what :func:`rows` and :func:`head` make, one column at a time, the leaves' own texts (a key path's, a span's)
    ``_BATCH`` at a time, with no list of a text per leaf (a layout's first tree.json, see
    ckpt.layout.Layout.table_texts).

    Example::

        texts = rows(["[0]", "[1]"], [{"type": "int", "value": 1}] * 2, [None, (64, 4)])
        assert heads([(("idx", 0),), (("idx", 1),)], [{"type": "int", "value": 1}] * 2, [None, 64], [0, 4], [1, 1]) == (
            [head({name: column[:1] for name, column in texts.items()}),
             head({name: column[1:] for name, column in texts.items()})], texts["more"])
    """
    unique, at = _distinct(metas)
    *fields, more_texts = _fields(unique)

    def columns(start: int, stop: int) -> Iterator[str]:
        batches = [(lo, min(lo + _BATCH, stop)) for lo in range(start, stop, _BATCH)]
        yield ",".join([",".join(map(_STRING, keystrs(paths[lo: hi]))) for lo, hi in batches])
        for column in fields:
            yield ",".join(column[start: stop] if at is None else map(column.__getitem__, at[start: stop]))
        yield ",".join([",".join([NULL if offset is None else f"[{offset},{size}]"
                                  for offset, size in zip(offsets[lo: hi], nbytes[lo: hi])]) for lo, hi in batches])

    out, start = [], 0
    for count in counts:
        out.append(_head_of(columns(start, start + count)))
        start += count
    return out, more_texts if at is None else list(map(more_texts.__getitem__, at))


_BATCH = 256  # leaves whose own texts heads makes at a time


def _distinct(metas: Sequence[dict]) -> tuple[list[dict], list[int] | None]:
    """The distinct entry objects of ``metas`` (leaves alike share one, see :func:`ckpt.leaves.describe`) and the
    position of each leaf's among them; None when every leaf has its own."""
    distinct = dict(zip(map(id, metas), metas))
    if len(distinct) == len(metas):
        return list(metas), None
    position = {key: k for k, key in enumerate(distinct)}
    return list(distinct.values()), [position[id(meta)] for meta in metas]


def _fields(metas: list[dict]) -> tuple[list[str], list[str], list[str], list[str]]:
    """The texts of the type, dtype, shape and other fields of each entry."""
    types = [meta["type"] for meta in metas]
    dtypes = [meta.get("dtype") for meta in metas]
    shapes = [meta.get("shape") for meta in metas]
    strings = {value: _STRING(value) for value in {*types, *dtypes} - {None}}
    strings[None] = NULL
    if {*map(type, itertools.chain.from_iterable(filter(None, shapes)))} <= {int}:
        keys: list[Any] = [shape if shape is None else tuple(shape) for shape in shapes]
    else:  # tuples would take True for 1 and 1.0 for 1
        keys = list(map(str, shapes))
    shape_texts = {key: NULL if shape is None else _ENCODE(shape) for key, shape in dict(zip(keys, shapes)).items()}
    return (list(map(strings.__getitem__, types)), list(map(strings.__getitem__, dtypes)),
            list(map(shape_texts.__getitem__, keys)), more(metas))


def _more(meta: dict) -> str:
    """The text of a leaf's fields that have no column of their own (a Python value, an array's spec)."""
    other = {key: value for key, value in meta.items() if key not in FIELDS}
    return _ENCODE(other) if other else NULL


def table(texts: dict[str, list[str]], crcs: Sequence[str]) -> str:
    """The leaf table of tree.json from the texts of :func:`rows` and of each leaf's CRC32 (:data:`NULL`
    for a leaf not packed)."""
    return b"".join(table_parts(head(texts), crcs, texts["more"])).decode()


_HEAD_COLUMNS = COLUMNS[:COLUMNS.index("crc32")]
assert COLUMNS[len(_HEAD_COLUMNS):] == ("crc32", "more")  # (what table_parts writes after the head)


def head(texts: dict[str, list[str]]) -> list[bytes]:
    """The text of a leaf table's columns before ``crc32`` (``path`` to ``packed``) from the texts of
    :func:`rows`, in parts of ASCII bytes: what does not change from one save of a tree to the next (a layout
    keeps it, a few parts per checkpointable, in place of a text per field; see :func:`heads`)."""
    return _head_of(",".join(texts[name]) for name in _HEAD_COLUMNS)


_OPENERS = [b'%s"%s":[' % (b"," if k else b"", name.encode()) for k, name in enumerate(_HEAD_COLUMNS)]


def _head_of(columns: Iterable[str]) -> list[bytes]:
    """:func:`head` from the text of each column's elements, in order (each encoded once made, not joined:
    tree.json is joined from the parts)."""
    parts = []
    for opener, text in zip(_OPENERS, columns):
        parts += [opener, text.encode(), b"]"]
    return parts


def table_parts(head_parts: list[bytes], crcs: Sequence[str], more_texts: Sequence[str]) -> list[bytes]:
    """The leaf table of tree.json, in parts that :func:`tree_json` joins (the head not copied), from the text
    of its columns before ``crc32`` (:func:`head`), the texts of each leaf's CRC32 (:data:`NULL` for a leaf
    not packed) and of its other fields (:func:`more`).

    Example::

        texts = rows([".w"], [{"type": "numpy", "dtype": "float32", "shape": [2]}], [(0, 8)])
        assert b"".join(table_parts(head(texts), ["7"], texts["more"])).decode() == table(texts, ["7"])
    """
    return [b"{", *head_parts, b',"crc32":[', ",".join(crcs).encode(), b'],"more":[', ",".join(more_texts).encode(),
            b"]}"]


def more(metas: Sequence[dict]) -> list[str]:
    """The text of each entry's fields that have no column of their own (the ``more`` column of :func:`rows`)."""
    return [NULL if fields == _ARRAY_KEYS else _more(meta) for fields, meta in zip(map(tuple, metas), metas)]


def tree_json(structures: dict[str, str], tables: dict[str, list[bytes]], handled: dict | None,
              packed: dict | None) -> list[bytes]:
    """tree.json, in parts to write one after another (a save holds no copy of the whole document): each
    checkpointable's structure (``structures``: their texts, see :func:`ckpt.tree.to_text`) and its leaf table
    (``tables``: the parts of each, see :func:`table_parts`), the checkpointables saved by handlers, and the
    packed array.

    Raises:
      ValueError: the document is larger than a reader accepts (``fmt.TREE_MAX_BYTES``).
    """
    parts = [b'{"checkpointables":{']
    for k, (name, text) in enumerate(structures.items()):
        parts += [b"," if k else b"", f'{_ENCODE(name)}:{{"tree":'.encode(), text.encode(), b',"leaves":',
                  *tables[name], b"}"]
    parts.append(b"}")
    if handled is not None:
        parts.append(f',"handled":{_ENCODE(handled)}'.encode())
    if packed is not None:
        parts.append(f',"packed":{_ENCODE(packed)}'.encode())
    parts.append(b"}")
    if sum(map(len, parts)) > fmt.TREE_MAX_BYTES:
        raise ValueError(f"the tree takes {sum(map(len, parts))} bytes as JSON, more than the {fmt.TREE_MAX_BYTES} "
                         "a reader accepts")
    return parts
