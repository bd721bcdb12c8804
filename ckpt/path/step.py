"""Step name formats: how a step number becomes a directory name and back.

Example::

    fmt = standard_name_format(step_prefix="step", step_format_fixed_length=4)
    fmt.build_name(23)            # 'step_0023'
    fmt.parse_name("step_0023")   # 23
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Protocol, runtime_checkable


@runtime_checkable
class NameFormat(Protocol):
    """Turns a step into a directory name and recognises such names."""

    def build_name(self, step: int) -> str:
        """The directory name of ``step``."""

    def parse_name(self, name: str) -> int | None:
        """The step a directory name stands for, or None if it is not one of ours."""


@dataclasses.dataclass(frozen=True)
class StandardNameFormat:
    """Names like ``23``, ``0023``, ``step_23`` or ``step_0023``.

    Args:
      step_prefix: joined to the number with ``_``; None for bare numbers.
      step_format_fixed_length: zero-pads the number to this many digits.
    """

    step_prefix: str | None = None
    step_format_fixed_length: int | None = None

    def __post_init__(self):
        if self.step_prefix is not None and (
            not self.step_prefix or "/" in self.step_prefix or "\\" in self.step_prefix
            or self.step_prefix in (".", "..") or self.step_prefix.startswith(".")
        ):
            raise ValueError(
                f"step_prefix {self.step_prefix!r} is not a plain directory-name prefix "
                "(empty, starts with '.', or contains a path separator)"
            )
        length = self.step_format_fixed_length
        if length is not None and (not isinstance(length, int) or length < 1):
            raise ValueError(f"step_format_fixed_length must be a positive int, got {length!r}")
        prefix = "" if self.step_prefix is None else re.escape(self.step_prefix) + "_"
        digits = r"0|[1-9]\d*" if length is None else rf"\d{{{length}}}|[1-9]\d{{{length},}}"
        object.__setattr__(self, "_regex", re.compile(rf"^{prefix}({digits})$"))

    def build_name(self, step: int) -> str:
        number = str(step) if self.step_format_fixed_length is None else f"{step:0{self.step_format_fixed_length}d}"
        return number if self.step_prefix is None else f"{self.step_prefix}_{number}"

    def parse_name(self, name: str) -> int | None:
        match = self._regex.match(name)
        return int(match.group(1)) if match else None


def standard_name_format(
    step_prefix: str | None = None, step_format_fixed_length: int | None = None
) -> StandardNameFormat:
    """The usual step names: ``23``, ``0023`` (fixed length 4), ``step_23`` (prefix ``step``)."""
    return StandardNameFormat(step_prefix, step_format_fixed_length)


def find_steps(names: Iterable[str], name_format: NameFormat) -> dict[int, str]:
    """Maps each step found among directory ``names`` to its name (temporaries never match)."""
    found = {}
    for name in names:
        step = name_format.parse_name(name)
        if step is not None:
            found[step] = name
    return found
