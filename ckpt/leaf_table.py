"""The leaf entries of one checkpointable as a table: one list per field, one row per leaf.

tree.json (format version 2) stores a checkpointable's leaves as columns, each a JSON list with one
element per leaf in flatten order::

    {"path": ["['w']", "['b']", "['step']"], "type": ["numpy", "numpy", "int"],
     "dtype": ["float32", "float32", null], "shape": [[2, 3], [3], null],
     "packed": [[0, 24], [64, 12], null], "crc32": [912345678, 123, null],
     "more": [null, null, {"value": 7}]}

``path`` to ``crc32`` are the fields most leaves have (null where a leaf has none); ``more`` holds a
leaf's other fields (an inline value, a large leaf's array and chunk checksums, a PRNG key's
implementation), or null. Row ``i`` is the entry format version 1 wrote as one object per leaf:
``table[i]`` gives it as a dict, made when first asked, so the rare reader of one leaf pays for that
leaf alone, while a load of thousands of small leaves reads the columns themselves.

Example::

    table = LeafTable.of_entries([{"path": "['w']", "type": "numpy", "dtype": "float32", "shape": [2],
                                   "packed": [0, 8], "crc32": 7}])
    assert table.shape == [[2]] and table[0]["crc32"] == 7
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

FIELDS = ("path", "type", "dtype", "shape", "packed", "crc32")  # the columns of the usual fields
COLUMNS = (*FIELDS, "more")


class LeafTable:
    """The leaf entries of one checkpointable (see the module): ``path`` ... ``crc32`` and ``more`` are
    its columns, lists of one element per leaf (None where a leaf lacks the field). ``spans`` is the
    ``packed`` column as an (n, 2) int64 array once :mod:`ckpt.schema` has checked that every leaf is
    a packed array (else None): a load reads its leaves by it."""

    __slots__ = (*COLUMNS, "spans", "_entries")

    def __init__(self, columns: dict[str, list], entries: list[dict | None] | None = None):
        for name in COLUMNS:
            setattr(self, name, columns[name])
        self.spans: np.ndarray | None = None
        self._entries: list[dict | None] = [None] * len(self.path) if entries is None else entries

    @classmethod
    def of_entries(cls, entries: list[dict]) -> LeafTable:
        """The table of entries given one dict per leaf (format version 1, an Orbax step); ``table[i]``
        is ``entries[i]`` itself."""
        columns = {name: [entry.get(name) for entry in entries] for name in FIELDS}
        columns["more"] = [{k: v for k, v in entry.items() if k not in FIELDS} or None for entry in entries]
        return cls(columns, list(entries))

    def __len__(self) -> int:
        return len(self.path)

    def __getitem__(self, i: int) -> dict:
        entry = self._entries[i]
        if entry is None:
            entry = {name: value for name in FIELDS if (value := getattr(self, name)[i]) is not None}
            more = self.more[i]
            if more:
                entry.update(more)
            self._entries[i] = entry
        return entry

    def __iter__(self) -> Iterator[dict]:
        return map(self.__getitem__, range(len(self.path)))

    def columns(self) -> dict[str, list]:
        """The columns by name, as tree.json holds them."""
        return {name: getattr(self, name) for name in COLUMNS}


def as_table(leaves: LeafTable | list[dict]) -> LeafTable:
    """``leaves`` as a table (a list of entries, one dict per leaf, is made into one)."""
    return leaves if type(leaves) is LeafTable else LeafTable.of_entries(leaves)
