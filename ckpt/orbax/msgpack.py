"""The msgpack ``checkpoint`` file of Orbax's PyTree handlers, read as untrusted input: the leaves Orbax
before 0.5.21 saved with ``SaveArgs(aggregate=True)`` (as ``flax.training.orbax_utils.save_args_from_target``
asked, up to flax 0.8.5), whose ``_METADATA`` entries say ``skip_deserialize``.

The file is one msgpack value: maps with string keys, arrays, strings, numbers, booleans, nil, and
Orbax's extension types (1: an array, as a msgpack ``[shape, dtype name, bytes]``; 2: a complex number;
3: a numpy scalar, as an array; 4: a tuple). Only these are decoded, no object is ever built from a
name in the file, and every length is checked against the bytes left.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ckpt import leaves as leaves_lib

_ARRAY, _COMPLEX, _SCALAR, _TUPLE = 1, 2, 3, 4
_CHUNKED = "__msgpack_chunked_array__"  # an array over 1 GiB, in flat chunks (Orbax's msgpack_utils)


class MsgpackError(ValueError):
    """The bytes are not a value this reader decodes; the message says where."""


def decode(data: bytes, max_depth: int, memory: int) -> Any:
    """The value ``data`` holds (arrays as numpy arrays, tuples as lists), nested at most ``max_depth`` deep, in at
    most ``memory`` bytes (a byte of msgpack, an empty map, is a Python dict of 64 bytes: a hostile file of a few
    GiB would take all the memory there is).

    Raises:
      MsgpackError: malformed or truncated bytes, a type it does not decode, trailing bytes, values that would
        take more than ``memory`` bytes, or values nested deeper than the Python stack left to the caller allows.
    """
    reader = _Reader(data, max_depth, memory)
    try:
        return reader.whole(len(data), 0)
    except RecursionError:  # (max_depth levels fit a fresh stack, not one the caller has filled already)
        raise MsgpackError(f"its values, nested {max_depth} deep at most, go deeper than the Python stack left to this "
                           f"call allows (at byte {reader.at}): load it from a shallower call, or raise "
                           "sys.setrecursionlimit") from None


_FIXED = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
          0xCA: ">f", 0xCB: ">d"}
_SIZED = {0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"), 0xC4: (">B", "bin"), 0xC5: (">H", "bin"),
          0xC6: (">I", "bin"), 0xDC: (">H", "array"), 0xDD: (">I", "array"), 0xDE: (">H", "map"), 0xDF: (">I", "map"),
          0xC7: (">B", "ext"), 0xC8: (">H", "ext"), 0xC9: (">I", "ext")}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
# The most memory a decoded value takes, charged as its container's header is read (a dict of one item: 184
# bytes, for 3 values, with its slot in a list)
_VALUE_BYTES = 96


class _Reader:
    """Decodes ``data`` in place: an extension's payload is read within its bounds (``end``), never copied, so
    that extensions nested in extensions cost no more memory than the file."""

    def __init__(self, data: bytes, max_depth: int, memory: int):
        self.data, self.at, self.end, self.max_depth = memoryview(data), 0, len(data), max_depth
        self.memory, self.left = memory, memory

    def charge(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise MsgpackError(f"its values, decoded, would take more than the {self.memory} bytes this process may "
                               f"still allocate (at byte {self.at})")

    def whole(self, end: int, depth: int) -> Any:
        """The one value that the bytes up to ``end`` hold."""
        self.charge(_VALUE_BYTES)
        outer, self.end = self.end, end
        value = self.value(depth)
        if self.at != end:
            raise MsgpackError(f"{end - self.at} bytes follow the value that ends at byte {self.at}")
        self.end = outer
        return value

    def take(self, n: int) -> memoryview:
        if n > self.end - self.at:
            raise MsgpackError(f"a value of {n} bytes at byte {self.at} runs past the end of its bytes (byte {self.end})")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, form: str) -> Any:
        return struct.unpack(form, self.take(struct.calcsize(form)))[0]

    def value(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise MsgpackError(f"nested deeper than {self.max_depth} levels")
        byte = self.take(1)[0]
        if byte <= 0x7F or byte >= 0xE0:
            return byte if byte <= 0x7F else byte - 0x100
        if byte in (0xC0, 0xC2, 0xC3):
            return {0xC0: None, 0xC2: False, 0xC3: True}[byte]
        if byte in _FIXED:
            return self.unpack(_FIXED[byte])
        if 0xA0 <= byte <= 0xBF:
            return self.text(byte & 0x1F)
        if byte in _FIXEXT:
            return self.ext(_FIXEXT[byte], depth)
        if 0x80 <= byte <= 0x9F:
            kind, n = "map" if byte <= 0x8F else "array", byte & 0x0F
        elif byte in _SIZED:
            form, kind = _SIZED[byte]
            n = self.unpack(form)
        else:
            raise MsgpackError(f"byte {self.at - 1} starts no msgpack value (0x{byte:02x})")
        if kind == "str":
            return self.text(n)
        if kind == "bin":
            self.charge(2 * n)  # (and the array made of it)
            return bytes(self.take(n))
        if kind == "ext":
            return self.ext(n, depth)
        if n > self.end - self.at:  # (each element takes a byte at least)
            raise MsgpackError(f"{n} elements at byte {self.at} cannot fit in the bytes left")
        self.charge(n * _VALUE_BYTES * (1 if kind == "array" else 2))  # (before any is made: a hostile count is
        return [self.value(depth + 1) for _ in range(n)] if kind == "array" else self.mapping(n, depth)  # refused)

    def text(self, n: int) -> str:
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise MsgpackError(f"a string before byte {self.at} is not UTF-8") from None

    def mapping(self, n: int, depth: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value(depth + 1)
            if not isinstance(key, str):
                raise MsgpackError(f"a map key before byte {self.at} is a {type(key).__name__}, not a string")
            out[key] = self.value(depth + 1)
        return out

    def ext(self, n: int, depth: int) -> Any:
        code = self.unpack(">b")
        if n > self.end - self.at:
            raise MsgpackError(f"an extension of {n} bytes at byte {self.at} runs past the end of its bytes "
                               f"(byte {self.end})")
        end = self.at + n
        if code == _TUPLE:
            return self.whole(end, depth + 1)
        if code == _COMPLEX:
            parts = self.whole(end, self.max_depth - 1)
            if not (isinstance(parts, list) and len(parts) == 2 and all(type(p) in (int, float) for p in parts)):
                raise MsgpackError(f"a complex number before byte {self.at} is not two numbers")
            return complex(*parts)
        if code in (_ARRAY, _SCALAR):
            return _array(self.whole(end, self.max_depth - 2), self.at)
        raise MsgpackError(f"extension type {code} before byte {self.at} is none of Orbax's")


def _array(fields: Any, at: int) -> np.ndarray:
    """An array from Orbax's ``[shape, dtype name, bytes]``; its size must be that of its bytes."""
    if not (isinstance(fields, list) and len(fields) == 3 and _is_shape(fields[0]) and isinstance(fields[2], bytes)):
        raise MsgpackError(f"an array before byte {at} is not [shape, dtype, bytes]")
    shape, name, buffer = fields
    try:
        dtype = leaves_lib.parse_dtype(name.decode() if isinstance(name, bytes) else name)
    except (ValueError, UnicodeDecodeError):
        raise MsgpackError(f"an array before byte {at} has dtype {name!r}, which ckpt does not read") from None
    if dtype.subdtype is not None:  # (numpy would read it as an array of more dimensions than its shape)
        raise MsgpackError(f"an array before byte {at} has dtype {name!r}, an array of {dtype.shape} per element")
    if dtype.itemsize == 0 or dtype.itemsize * int(np.prod(shape, dtype=object)) != len(buffer):
        raise MsgpackError(f"an array before byte {at} of shape {shape} and dtype {dtype} holds {len(buffer)} bytes")
    try:
        return np.frombuffer(buffer, dtype).reshape(shape).copy()
    except ValueError as e:  # a size past numpy's (an empty array may claim any other size)
        raise MsgpackError(f"an array before byte {at} of shape {shape} cannot be made: {e}") from None


def unchunked(value: Any) -> Any:
    """``value``, or the array Orbax split into flat chunks (a map marked ``__msgpack_chunked_array__``)."""
    if not (isinstance(value, dict) and value.get(_CHUNKED) is True):
        return value
    sizes, parts = value.get("shape"), value.get("chunks")  # (maps of "0", "1"...: an array there indexes otherwise)
    try:
        if isinstance(sizes, dict) and isinstance(parts, dict):
            shape, chunks = [sizes[str(i)] for i in range(len(sizes))], [parts[str(i)] for i in range(len(parts))]
            # (Orbax writes slices of the array, of its dtype: numpy would promote chunks of other dtypes)
            if (_is_shape(shape) and chunks and all(isinstance(c, np.ndarray) for c in chunks)
                    and len({c.dtype for c in chunks}) == 1):
                return np.concatenate(chunks).reshape(shape)
    except (KeyError, TypeError, ValueError):
        pass
    raise MsgpackError("an array split into chunks is malformed")


def _is_shape(shape: Any) -> bool:
    """A list of at most numpy's 64 sizes, each an int >= 0."""
    return isinstance(shape, list) and len(shape) <= 64 and all(type(d) is int and d >= 0 for d in shape)
