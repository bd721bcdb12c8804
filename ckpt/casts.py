"""The casts a load makes into the dtype asked for (an abstract leaf's, or jax's): every value kept.

A cast rounds as numpy rounds (float64 to float32, float32 to bfloat16), but a value the dtype cannot
hold is refused with :class:`OutOfRangeError`, where numpy and jax change it without a word: an
integer out of range wraps around (``2**40 + 5`` becomes 5 in int32), a finite float becomes
infinite (``1e300`` in float32), NaN (float8) or, in a float without infinities, its largest (``100.0``
becomes 6 in float4_e2m1fn), a NaN becomes an integer; into or from a dtype that is no number (text, bytes, dates,
void, object) a cast must read back as its source (``1e300`` as ``U3`` would be ``'1e+'``, ``'cde'`` as ``U1``
``'c'``, a time in seconds as days its day). Casts that hold every value of their source (int32 into int64, float32 into float64) cost nothing more; the others cost a
pass over the values (a min and a max, or a look for infinities), about the time of the cast itself.

Example::

    cast(np.array([2**40 + 5], np.int64), np.int32)   # raises OutOfRangeError
    for_jax(np.arange(3, dtype=np.int64))             # int32 without jax_enable_x64, int64 with it
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import ml_dtypes
import numpy as np


class OutOfRangeError(OverflowError):
    """Saved values that the dtype a load casts them into cannot hold (an integer out of its range, a finite
    float that would become infinite): the load raises ``ckpt.errors.TreeMismatchError`` naming the leaf."""


def cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    """``array`` as ``dtype`` (``array`` itself when it has that dtype already), rounded as numpy rounds;
    raises :class:`OutOfRangeError` where a value does not fit ``dtype``."""
    if array.dtype == dtype:
        return array
    dtype = np.dtype(dtype)
    check = _check(array.dtype, dtype)
    if check is None:
        return array.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # (what numpy would warn of is raised below)
        out = (array.real if array.dtype.kind == "c" and dtype.kind != "c" else array).astype(dtype)
    check(array, out)
    return out


def changes_values(source: Any, target: Any) -> bool:
    """Whether a cast from dtype ``source`` into ``target`` can change a value: one that :func:`cast`, or
    :func:`check` after a cast made by other means (torch's), checks."""
    return _check(np.dtype(source), np.dtype(target)) is not None


def check(source: np.ndarray, out: np.ndarray) -> None:
    """Raises :class:`OutOfRangeError` where ``out``, ``source`` cast by other means (torch's cast, which
    rounds as numpy's does), lost a value as :func:`cast` would (its dtype cannot hold it)."""
    found = _check(source.dtype, out.dtype)
    if found is not None:
        found(source, out)


def for_jax(array: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``array`` cast into ``dtype`` (default: its own) as jax holds it (without ``jax_enable_x64``, 64-bit
    types become 32-bit ones, which jax does without a check); raises :class:`OutOfRangeError` as
    :func:`cast` does, saying so where it is jax that narrows the dtype."""
    asked = array.dtype if dtype is None else np.dtype(dtype)
    held = sys.modules["jax"].dtypes.canonicalize_dtype(asked)
    try:
        return cast(array, held)
    except OutOfRangeError as e:
        if held == asked:
            raise
        raise OutOfRangeError(f"{e}: jax holds {asked} values as {held} without jax_enable_x64; enable it "
                              "(jax.config.update('jax_enable_x64', True)) to load them, or load the leaf as numpy "
                              "(np.ndarray as its abstract leaf)") from None


@functools.lru_cache(maxsize=None)
def _check(source: np.dtype, target: np.dtype) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """What checks a cast from ``source`` into ``target`` (None: it holds every value). A bool is an integer from 0
    to 1 (a saved 2 into a bool is refused); a complex number is two floats, and becomes a real one only without an
    imaginary part (numpy and torch drop it); a cast into or from a dtype that is no number (text, dates) must read
    back as its source."""
    into, held = _integer_range(target), _integer_range(source)
    if (held is None and _float_max(source) is None) or (into is None and _float_max(target) is None):
        return _check_round_trip
    if source.kind == "c" and target.kind != "c" and (into is not None or _float_max(target) is not None):
        return functools.partial(_check_real, then=_check(np.dtype(source.type().real.dtype), target))
    if into is not None:
        if held is not None and into[0] <= held[0] and held[1] <= into[1]:
            return None
        return functools.partial(_check_range, into=into)
    top = _float_max(target)
    reach = _float_max(source) if held is None else max(-held[0], held[1])
    info = ml_dtypes.finfo(target)
    # (float8_e8m0fnu holds no zero, no negatives; float6_e3m2fn makes a float8_e3m4's inf 28, its NaN 0)
    if reach <= top and float(info.min) == -top and (_holds_nan(target) or not _holds_nan(source)):
        return None
    if _holds_infinity(target):
        return functools.partial(_check_finite, top=top)
    # (a value from half a step past the largest on would round past it)
    return functools.partial(_check_saturated, limit=top + float(info.eps) * 2.0 ** (int(info.maxexp) - 2))


def _integer_range(dtype: np.dtype) -> tuple[int, int] | None:
    if dtype == np.bool_:
        return 0, 1
    try:
        info = ml_dtypes.iinfo(dtype)  # (numpy's integers and ml_dtypes' int4, uint4, int2...)
    except ValueError:
        return None
    return int(info.min), int(info.max)


def _float_max(dtype: np.dtype) -> float | None:
    try:
        return float(ml_dtypes.finfo(dtype).max)  # (numpy's floats, a complex dtype's parts, bfloat16, float8...)
    except ValueError:
        return None


def _holds_infinity(dtype: np.dtype) -> bool:
    """False for the ml_dtypes floats without infinities, which make a value past their range their largest
    (float4_e2m1fn, float6_*) or NaN (float8_e4m3fn, ...)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isinf(np.array(np.inf).astype(dtype)))


def _holds_nan(dtype: np.dtype) -> bool:
    """False for integers and the ml_dtypes floats without NaN (float4_e2m1fn, float6_*), which make a NaN a number."""
    with np.errstate(invalid="ignore"):
        return bool(np.isnan(np.array(np.nan).astype(dtype)))


def _check_range(source: np.ndarray, out: np.ndarray, *, into: tuple[int, int]) -> None:
    """Every value of ``source`` (integers or floats) is one the integer dtype of ``out`` holds (a float's
    fraction is dropped, as numpy drops it)."""
    if not source.size:
        return
    low, high = source.min().item(), source.max().item()  # (a NaN in floats makes both NaN: refused below)
    if into[0] - 1 < low and high < into[1] + 1:
        return
    raise OutOfRangeError(f"its {source.dtype} values, from {low} to {high}, do not fit {out.dtype} "
                          f"(from {into[0]} to {into[1]})")


def _check_real(source: np.ndarray, out: np.ndarray, *, then: Callable[[np.ndarray, np.ndarray], None] | None) -> None:
    """No complex value of ``source`` has an imaginary part (``out`` holds its real parts), and ``then`` finds
    none of the real parts lost."""
    kept = source.imag == 0
    if not kept.all():
        raise OutOfRangeError(f"its {source.dtype} value {source[~kept].flat[0].item()} has an imaginary part, which "
                              f"{out.dtype} cannot hold ({int((~kept).sum())} such value(s))")
    if then is not None:
        then(source.real, out)


def _check_finite(source: np.ndarray, out: np.ndarray, *, top: float) -> None:
    """No finite value of ``source`` became infinite or NaN in ``out`` (whose dtype's largest value is ``top``)."""
    # (compared as Python floats: in the source's dtype, top may round up, 65504 to 65536 in bfloat16; NaN, inf: below)
    if source.dtype.kind != "c" and source.size and -top <= float(source.min()) and float(source.max()) <= top:
        return
    if not np.isfinite(out).all():
        _refuse_lost(source, out, np.isfinite(source) & ~np.isfinite(out))


def _check_saturated(source: np.ndarray, out: np.ndarray, *, limit: float) -> None:
    """Into a float dtype without infinities: no finite value of ``source`` past its range (``limit``) became its
    largest, infinite or NaN, and no infinity or NaN became a finite value."""
    bound = np.float64(limit)  # (compared as float64: in the source's dtype, the limit may round down, or overflow)
    past = (source >= bound) | (source <= -bound)
    _refuse_lost(source, out, np.where(np.isfinite(source), past | ~np.isfinite(out), np.isfinite(out)))


def _check_round_trip(source: np.ndarray, out: np.ndarray) -> None:
    """Into or from a dtype that is no number: ``out`` read back as the source's dtype is ``source`` (NaN as NaN, NaT
    as NaT): a text cut short, a number as text that is not its own, a date made coarser, are refused."""
    try:
        with np.errstate(all="ignore"):
            back = out.astype(source.dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise OutOfRangeError(f"its {source.dtype} values do not fit {out.dtype}: they cannot be read back ({e})") from None
    same = np.asarray(back == source)
    if source.dtype.kind in "fc":
        same |= np.isnan(back) & np.isnan(source)
    elif source.dtype.kind in "mM":
        same |= np.isnat(back) & np.isnat(source)
    _refuse_lost(source, out, ~same)


def _refuse_lost(source: np.ndarray, out: np.ndarray, lost: np.ndarray) -> None:
    if lost.any():
        raise OutOfRangeError(f"its {source.dtype} value {source[lost][0].item()} does not fit {out.dtype} (it would "
                              f"become {out[lost][0].item()}; {int(lost.sum())} such value(s))")
