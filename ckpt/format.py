"""The step directory: file names, the manifest schema, the commit record, name validation.

A committed step directory holds::

    <step>/
      manifest.json   written last: format version, step, timestamps, metrics, custom metadata,
                      checkpointable names and the CRC32 of tree.json; its last member, ``manifest_crc32``,
                      is the CRC32 of the bytes before it. Its presence is the commit record.
      tree.json       per checkpointable: the tree structure and a table of one row per leaf (type,
                      dtype, shape, where its bytes are, checksum)
      arrays/<i>/     one zarr3 array (tensorstore) per large leaf, chunks checked by the crc32c codec
      packed/         one zarr3 uint8 array holding the bytes of every small leaf, each with its CRC32

      .ckpt-owned     ckpt's marker (empty), made first in every directory ckpt makes: ckpt removes a
                      temporary or half-deleted directory only when it holds this file

While written, the directory is ``<step>.ckpt-tmp``; it is renamed to ``<step>`` once complete.
Durability order on a local file system: (1) every data file (chunks and ``zarr.json`` of ``arrays/``
and ``packed/``) is written and fsync'd (by tensorstore as it writes it, or, in the background of an
async save, once all are written); (2) tree.json, then
manifest.json, are written and fsync'd; (3) every directory of the step is fsync'd; (4) the step is
renamed to its final name (a step it replaces is swapped out atomically with ``renameat2``'s
``RENAME_EXCHANGE`` where the system has it); (5) the root directory is fsync'd. A crash at any moment
leaves the old step or the new one, never a partial step under a step name; temporaries
(``*.ckpt-tmp``, ``*.ckpt-deleting``) are never listed. Paths inside the manifest are relative to the
step directory and may not leave it.
"""
from __future__ import annotations

import copy
import json
import math
import operator
from typing import Any

# crc32(data, value=0): every CRC32 the format stores (the manifest, tree.json, leaves, chunks). With the
# `fast` extra it is zlib-ng's, the same values 2.7-6x as fast as those of the zlib Python links.
try:
    from zlib_ng.zlib_ng import crc32
except ImportError:
    from zlib import crc32

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 2                # what a save writes (2: leaf entries as a table, see ckpt.leaf_table)
READ_VERSIONS = (1, 2)            # what a reader reads
MANIFEST = "manifest.json"
TREE = "tree.json"
ARRAYS = "arrays"
PACKED = "packed"
ROOT_METADATA = "ckpt-root.json"
LOCK = ".ckpt.lock"
TMP_SUFFIX = ".ckpt-tmp"
DELETING_SUFFIX = ".ckpt-deleting"
REPLACED_SUFFIX = ".ckpt-replaced"  # a step set aside by a commit with overwrite=True (see storage.commit_dir)
TEMPORARY_SUFFIXES = (TMP_SUFFIX, DELETING_SUFFIX, REPLACED_SUFFIX)
MARKER = ".ckpt-owned"            # in every directory ckpt makes: only a directory holding it is ever removed
PROMOTING = ".ckpt-promoting"     # in a local tier's step whose promotion is owed to the durable tier, until it commits
DEFAULT_CHECKPOINTABLE = "state"
AUTO = "AUTO"                     # Orbax's name for "the state, else the first tree checkpointable"
RESERVED_NAMES = frozenset({"metrics", AUTO, MANIFEST, TREE, ARRAYS, PACKED})

SMALL_LEAF_BYTES = 1 << 20        # leaves below this are packed together
PACKED_CHUNK_BYTES = 4 << 20      # chunk size of the packed array
ARRAY_CHUNK_BYTES = 16 << 20      # target chunk size of a large leaf's array (64 MiB chunks saved 1.3x slower)
ALIGN = 64                        # packed offsets; loaded arrays start at such an address (jax on CPU then uses them as is)

# The most bytes a reader reads of each JSON file (a larger one is refused: see docs/format.md).
MANIFEST_MAX_BYTES = 16 << 20     # metrics and custom metadata included
MANIFEST_ROOM = 64 << 10          # what a manifest holds besides metrics and custom metadata, at most
TREE_MAX_BYTES = 256 << 20        # about 700,000 leaves
ZARR_JSON_MAX_BYTES = 1 << 20     # an array's zarr.json: a few hundred bytes
MAX_JSON_DEPTH = 64               # how deep metrics and custom metadata may nest
MAX_NDIM = 32                     # the most dimensions an array may have (numpy's limit once was 32)
MAX_INT_BITS = 13_000             # the largest int stored (about 3,900 digits; Python parses 4,300 by default)


def validate_checkpointable_name(name: Any) -> None:
    """Raises ValueError for names that are empty, reserved, or not a plain directory name."""
    if not isinstance(name, str):
        raise ValueError(f"checkpointable name {name!r} must be a str, got {type(name).__name__}")
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"checkpointable name {name!r} is empty, '.'/'..', or contains a path separator")
    if name in RESERVED_NAMES or name.startswith("."):
        raise ValueError(f"checkpointable name {name!r} is reserved (reserved: {sorted(RESERVED_NAMES)}, "
                         "and names starting with '.')")


def validate_step(step: Any) -> int:
    """Returns ``step`` as an int: an int, or a 0-d integer array of numpy, jax or torch (a Flax
    ``TrainState.step``); raises ValueError for anything else (bools included) and negative steps."""
    try:
        number = operator.index(step)
    except TypeError:
        number = None
    if (number is None or isinstance(step, bool) or getattr(step, "ndim", 0) != 0
            or "bool" in str(getattr(step, "dtype", ""))):
        raise ValueError(f"step must be a non-negative int, got {step!r} of type {type(step).__name__}")
    if number < 0:
        raise ValueError(f"step must be a non-negative int, got {number}")
    if number.bit_length() > MAX_INT_BITS:
        raise ValueError(f"step must be a non-negative int of at most {MAX_INT_BITS} bits, got one of "
                         f"{number.bit_length()}")
    return number


def to_json_bytes(obj: Any, what: str, limit: int | None = None) -> bytes:
    """Strict JSON (no NaN/inf, no objects); raises ValueError naming ``what`` when ``obj`` is not JSON,
    or when it takes more than ``limit`` bytes (what a reader would refuse)."""
    try:
        data = json.dumps(obj, allow_nan=False, sort_keys=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON (finite numbers, str, bool, None, lists, dicts with str keys): {e}") from None
    if limit is not None and len(data) > limit:
        raise ValueError(f"{what} takes {len(data)} bytes as JSON, more than the {limit} a reader accepts")
    return data


def check_json(obj: Any, what: str) -> None:
    """Raises ValueError if ``obj`` is not strict JSON with str keys."""
    _walk_json(obj, what)
    to_json_bytes(obj, what)


def stored_json(value: Any, what: str, *, numbers: bool = False) -> tuple[Any, list[list[str | int]]]:
    """``value`` (metrics, or custom metadata) as a manifest stores it, and the key path of each float in
    it that is not finite (see :func:`encode_json`). ValueError unless that is strict JSON with str keys,
    nested at most ``MAX_JSON_DEPTH`` levels (checked first: a deeper one, or one that holds itself,
    would exhaust the encoder's recursion). With ``numbers``, numbers may be numpy scalars or 0-d arrays
    of numpy, jax or torch (a loss as a training step returns it), stored as the Python numbers they hold."""
    _walk_json(value, what, finite=False, numbers=numbers)
    encoded, paths = encode_json(value)
    check_json(encoded, what)
    return encoded, paths


_JSON_LEAVES = (str, int, float, bool, type(None))


def _number(obj: Any) -> bool | int | float | None:
    """The Python number a numpy scalar or a 0-d array (numpy, jax, torch) holds; None for anything else."""
    if getattr(obj, "shape", None) != () or not callable(getattr(obj, "item", None)):
        return None
    value = obj.item()
    return value if isinstance(value, (bool, int, float)) else None


def _walk_json(obj: Any, where: str, depth: int = 0, finite: bool = True, numbers: bool = False) -> None:
    if depth > MAX_JSON_DEPTH and isinstance(obj, (dict, list, tuple)):
        raise ValueError(f"{where} must be JSON nested at most {MAX_JSON_DEPTH} levels deep")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} must be JSON: key {k!r} is of type {type(k).__name__}, not str")
            _walk_json(v, f"{where}[{k!r}]", depth + 1, finite, numbers)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk_json(v, f"{where}[{i}]", depth + 1, finite, numbers)
    elif finite and isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} must be JSON: {obj!r} is not a finite number")
    elif not isinstance(obj, _JSON_LEAVES) and not (numbers and _number(obj) is not None):
        shape = getattr(obj, "shape", None)
        raise ValueError(f"{where} must be JSON (a number, str, bool or None here), not an object of type "
                         f"{type(obj).__name__}{'' if shape is None else f', shape {tuple(shape)}'}")


_NOT_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
NON_FINITE = "non_finite"  # the member listing where metrics and custom metadata hold floats that are not finite
_ABSENT = object()


def encode_json(value: Any) -> tuple[Any, list[list[str | int]]]:
    """``value`` as strict JSON, and where it held floats that are not finite: each such float (a diverged
    run's NaN loss) becomes the string ``"nan"``, ``"inf"`` or ``"-inf"``, and its key path (dict keys
    and list indices) is listed, so that a string ``"nan"`` stays a string. Tuples become lists, numpy
    scalars and 0-d arrays the Python numbers they hold (``stored_json`` lets no other object here)."""
    paths: list[list[str | int]] = []

    def encode(v: Any, path: list[str | int]) -> Any:
        if isinstance(v, dict):
            return {k: encode(x, [*path, k]) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [encode(x, [*path, i]) for i, x in enumerate(v)]
        if not isinstance(v, _JSON_LEAVES):
            v = _number(v)
        if isinstance(v, float) and not math.isfinite(v):
            paths.append(path)
            return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
        return v

    return encode(value, []), paths


def root_metadata_bytes(custom_metadata: Any) -> bytes:
    """``ckpt-root.json``: a root's custom metadata, stored as a manifest stores a step's (``non_finite`` included)."""
    encoded, paths = stored_json(custom_metadata, "custom_metadata")
    return to_json_bytes({"custom_metadata": encoded, NON_FINITE: {"custom_metadata": paths} if paths else {}},
                         "custom_metadata")


def decode_json(doc: dict, key: str) -> Any:
    """``doc[key]`` (a manifest's ``metrics`` or ``custom_metadata``, ckpt-root.json's ``custom_metadata``)
    with the floats :func:`encode_json` stored as strings again: those at the key paths
    ``doc["non_finite"][key]`` lists. A manifest without ``non_finite`` (written by ckpt before it recorded
    them) held those strings for such floats only: each of its metrics' strings ``"nan"``, ``"inf"`` and
    ``"-inf"`` is such a float. A path that leads to no such string is ignored."""
    value = doc.get(key)
    marks = doc.get(NON_FINITE)
    if not isinstance(marks, dict):
        return _legacy_floats(value) if key == "metrics" else value
    paths = marks.get(key)
    if not isinstance(paths, list) or not paths:
        return value
    value = copy.deepcopy(value)
    for path in paths:
        if not isinstance(path, list):
            continue
        if not path:
            value = _NOT_FINITE.get(value, value) if isinstance(value, str) else value
            continue
        node = value
        for k in path[:-1]:
            node = _child(node, k)
        last = path[-1]
        leaf = _child(node, last)
        if isinstance(leaf, str) and leaf in _NOT_FINITE:
            node[last] = _NOT_FINITE[leaf]
    return value


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, dict) and isinstance(key, str):
        return node.get(key, _ABSENT)
    if isinstance(node, list) and type(key) is int and 0 <= key < len(node):
        return node[key]
    return _ABSENT


def _legacy_floats(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _legacy_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_legacy_floats(v) for v in value]
    return _NOT_FINITE.get(value, value) if isinstance(value, str) else value


def reported_custom_metadata(custom_metadata: Any) -> Any:
    """Custom metadata as ckpt reports it (step or root): ``{}`` where none was given, as Orbax reports it."""
    return {} if custom_metadata is None else custom_metadata


_MANIFEST_CRC = b',"manifest_crc32":'


def sealed_manifest(manifest: dict) -> bytes:
    """The manifest's JSON with one more member, last: ``manifest_crc32``, the CRC32 of the JSON before it
    (with its closing brace), so that a changed byte anywhere in the manifest is detected."""
    body = to_json_bytes(manifest, "the manifest (metrics and custom metadata included)", MANIFEST_MAX_BYTES - 32)
    return body[:-1] + _MANIFEST_CRC + str(crc32(body)).encode() + b"}"


def manifest_seal_ok(data: bytes) -> bool:
    """Whether manifest bytes end with the CRC32 of the rest (see :func:`sealed_manifest`)."""
    head, member, tail = data.rpartition(_MANIFEST_CRC)
    value = tail.removesuffix(b"}")
    return bool(member) and value.isdigit() and tail.endswith(b"}") and int(value) == crc32(head + b"}")
