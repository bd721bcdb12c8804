"""tree.json as text: the leaf entries of each checkpointable, then the document around them.

A packed leaf's entry differs from one save of a tree to the next only by its CRC32, so it is kept
as a :class:`Template` (its JSON before and after the checksum) that the layout of a reused plan
holds; a save fills the checksums in with one string format per leaf, where encoding a dict per
leaf cost several microseconds. The bytes are those ``json.dumps`` of the whole document writes.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

from ckpt import format as fmt

_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_STRING = json.encoder.encode_basestring_ascii  # a str as _ENCODE writes it
_ARRAY_KEYS = ("type", "dtype", "shape")


class Template(NamedTuple):
    """A packed leaf's entry without its CRC32: ``head`` + the checksum + ``tail``."""

    head: str
    tail: str

    def fill(self, crc: int) -> str:
        return f"{self.head}{crc}{self.tail}"


def template(path: str, meta: dict, offset: int, nbytes: int) -> Template:
    """The entry of a packed leaf at ``path`` (a key path string) whose ``meta`` has no checksum yet.

    Example::

        text = template(".w", {"type": "numpy", "dtype": "float32", "shape": [2]}, 0, 8).fill(7)
        assert text == '{"path":".w","type":"numpy","dtype":"float32","shape":[2],"crc32":7,"packed":[0,8]}'
    """
    return Template(f'{entry(path, meta)[:-1]},"crc32":', f',"packed":[{offset},{nbytes}]}}')


def entry(path: str, meta: dict) -> str:
    """The entry of a leaf at ``path`` with manifest entry ``meta`` (an inline or a large leaf's)."""
    if tuple(meta) == _ARRAY_KEYS and type(meta["type"]) is str and type(meta["dtype"]) is str:  # the usual entry
        shape = meta["shape"]
        if type(shape) is list and all(type(d) is int for d in shape):
            return (f'{{"path":{_STRING(path)},"type":{_STRING(meta["type"])},"dtype":{_STRING(meta["dtype"])},'
                    f'"shape":[{",".join(map(str, shape))}]}}')
    parts = ['{"path":', _STRING(path)]
    for key, value in meta.items():  # str and int-list fields written at once: most entries hold nothing else
        if type(value) is str:
            parts += [",", _STRING(key), ":", _STRING(value)]
        elif type(value) is list and all(type(d) is int for d in value):
            parts += [",", _STRING(key), ":[", ",".join(map(str, value)), "]"]
        else:
            return _ENCODE({"path": path, **meta})
    parts.append("}")
    return "".join(parts)


def structure(tree: dict) -> str:
    """A checkpointable's tree structure (``ckpt.tree.to_json``) as tree.json writes it."""
    return _ENCODE(tree)


def tree_json(structures: dict[str, str], leaves: dict[str, list[str]], handled: dict | None,
              packed: dict | None) -> bytes:
    """tree.json: each checkpointable's structure (``structures``: their texts, see :func:`structure`)
    and its leaf entries (``leaves``: their texts, in order), the checkpointables saved by handlers,
    and the packed array.

    Raises:
      ValueError: the document is larger than a reader accepts (``fmt.TREE_MAX_BYTES``).
    """
    trees = ",".join(f'{_ENCODE(name)}:{{"tree":{text},"leaves":[{",".join(leaves[name])}]}}'
                     for name, text in structures.items())
    parts = [f'{{"checkpointables":{{{trees}}}']
    if handled is not None:
        parts.append(f',"handled":{_ENCODE(handled)}')
    if packed is not None:
        parts.append(f',"packed":{_ENCODE(packed)}')
    data = "".join([*parts, "}"]).encode()
    if len(data) > fmt.TREE_MAX_BYTES:
        raise ValueError(f"the tree takes {len(data)} bytes as JSON, more than the {fmt.TREE_MAX_BYTES} a reader accepts")
    return data
