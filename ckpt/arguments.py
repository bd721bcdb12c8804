"""Checks of the objects a user hands to a constructor, so that a wrong one is named there, by the
argument it was given as, and not by an ``AttributeError`` at its first use, after steps were saved.

Example::

    arguments.implements(policy, SaveDecisionPolicy, "save_decision_policy")   # TypeError if not
"""
from __future__ import annotations

import numbers
from typing import Any, Collection, Container, Sequence, TypeVar

T = TypeVar("T")


def instance_of(value: T, cls: type, what: str) -> T:
    """``value``, if it is a ``cls``; else a TypeError naming ``what``."""
    if not isinstance(value, cls):
        raise TypeError(f"{what} must be an instance of {cls.__name__}, got {_describe(value)}{_hint(value)}")
    return value


def implements(value: T, protocol: type, what: str) -> T:
    """``value``, if it is an object (not a class) with the methods of ``protocol`` (runtime checkable)."""
    if isinstance(value, type) or not isinstance(value, protocol):
        methods = " and ".join(f"a {name} method" for name in _methods(protocol))
        raise TypeError(f"{what} must be an object with {methods} (a {protocol.__name__}), "
                        f"got {_describe(value)}{_hint(value)}")
    return value


def each_implements(values: Sequence[Any], protocol: type, what: str) -> None:
    """Every item of the sequence ``values`` implements ``protocol``; ``what[i]`` names a wrong one."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{what} must be a list of {protocol.__name__} objects, got {_describe(values)}")
    for i, value in enumerate(values):
        implements(value, protocol, f"{what}[{i}]")


def step_numbers(values: Any, what: str) -> None:
    """``values`` is a container (list, set, range) of int steps; else a TypeError naming ``what``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Container) or (
            isinstance(values, Collection) and not isinstance(values, range)
            and not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)):
        raise TypeError(f"{what} must be a collection of int steps (a list, set or range), got {_describe(values)}")


def count(value: Any, what: str, *, positive: bool = False, optional: bool = False) -> int | None:
    """``value`` as an int, if it is an integer >= 0 (> 0 if ``positive``) of Python or numpy (a size
    computed with numpy, ``np.int64(4)``, will do; a bool will not), or None if ``optional``; else a
    ValueError naming ``what``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (1 if positive else 0):
        kind = "a positive int" if positive else "a non-negative int"
        raise ValueError(f"{what} must be {kind}{' or None' if optional else ''}, got {_describe(value)}")
    return int(value)


def number(value: Any, what: str, *, optional: bool = False) -> None:
    """``value`` is a real number >= 0 (or None, if ``optional``); else an error naming ``what``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{what} must be a number of seconds >= 0{' or None' if optional else ''}, "
                         f"got {_describe(value)}")


def _methods(protocol: type) -> list[str]:
    return [name for name, member in vars(protocol).items() if not name.startswith("_") and callable(member)]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:200]}{'...' if len(text) > 200 else ''}"


def _hint(value: Any) -> str:
    if isinstance(value, type):
        return f" (the class itself: pass an instance, {value.__name__}(...))"
    if type(value).__module__.startswith("omegaconf."):
        return (" (an OmegaConf config: Hydra's instantiate gives the objects it makes inside a list back as "
                "configs unless told `_convert_: object` beside the `_target_`)")
    if isinstance(value, dict) and "class_path" in value:
        return (" (a class_path configuration that was not instantiated: jsonargparse, as LightningCLI uses "
                "it, leaves one as a dict when an object inside it does not parse, e.g. a policy of your own "
                "whose method lacks the protocol's type hints)")
    return ""
