"""tree.json as text: the leaf entries of each checkpointable, then the document around them.

A packed leaf's entry differs from one save of a tree to the next only by its CRC32, so it is kept
as a template (its JSON before and after the checksum, see :func:`templates`) that the layout of a
reused plan holds; a save fills the checksums in with one string format per leaf, where encoding a
dict per leaf cost several microseconds. The bytes are those ``json.dumps`` of the whole document writes.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from ckpt import format as fmt

_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_STRING = json.encoder.encode_basestring_ascii  # a str as _ENCODE writes it
_ARRAY_KEYS = ("type", "dtype", "shape")


def templates(paths: Sequence[str], metas: Sequence[dict], offsets: Sequence[int],
              nbytes: Sequence[int]) -> list[tuple[str, str]]:
    """The entries of packed leaves (their key path strings, manifest entries without a checksum,
    offsets and sizes) without their CRC32: for each, the ``(head, tail)`` that :func:`filled` puts
    around it. The text between the path and the checksum is made once for each type, dtype and shape.

    Example::

        (text,) = filled(templates([".w"], [{"type": "numpy", "dtype": "float32", "shape": [2]}], [0], [8]), [7])
        assert text == '{"path":".w","type":"numpy","dtype":"float32","shape":[2],"crc32":7,"packed":[0,8]}'
    """
    bodies: dict[tuple | None, str] = {}
    out = []
    for path, meta, offset, size in zip(paths, metas, offsets, nbytes):
        shape = meta.get("shape")
        key = (meta["type"], meta["dtype"], *shape, *map(type, shape)) if tuple(meta) == _ARRAY_KEYS else None
        body = bodies.get(key) if key is not None else None
        if body is None:
            body = _body(meta)
            if key is not None:
                bodies[key] = body
        out.append((f'{{"path":{_STRING(path)}{body},"crc32":', f',"packed":[{offset},{size}]}}'))
    return out


def filled(templates: Sequence[tuple[str, str]], crcs: Sequence[int]) -> list[str]:
    """The entries of :func:`templates` with their CRC32s ``crcs`` filled in."""
    return [f"{head}{crc}{tail}" for (head, tail), crc in zip(templates, crcs)]


def entry(path: str, meta: dict) -> str:
    """The entry of a leaf at ``path`` with manifest entry ``meta`` (an inline or a large leaf's)."""
    return f'{{"path":{_STRING(path)}{_body(meta)}}}'


def _body(meta: dict) -> str:
    """The fields of ``meta`` as an entry writes them after its path: ``,"type":...``."""
    if tuple(meta) == _ARRAY_KEYS and type(meta["type"]) is str and type(meta["dtype"]) is str:  # the usual entry
        shape = meta["shape"]
        if type(shape) is list and all(type(d) is int for d in shape):
            return f',"type":{_STRING(meta["type"])},"dtype":{_STRING(meta["dtype"])},"shape":[{",".join(map(str, shape))}]'
    parts = []
    for key, value in meta.items():  # str and int-list fields written at once: most entries hold nothing else
        if type(value) is str:
            parts += [",", _STRING(key), ":", _STRING(value)]
        elif type(value) is list and all(type(d) is int for d in value):
            parts += [",", _STRING(key), ":[", ",".join(map(str, value)), "]"]
        else:
            return "," + _ENCODE(meta)[1:-1]
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
