"""Step name formats: how a step number becomes a directory name and back.

Example::

    fmt = standard_name_format(step_prefix="step", step_format_fixed_length=4)
    fmt.build_name(23)            # 'step_0023'
    fmt.parse_name("step_0023")   # 23
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from ckpt import root, storage
from ckpt.metadata import CheckpointMetadata


@runtime_checkable
class NameFormat(Protocol):
    """Turns a step into a directory name and recognises such names.

    Example::

        class EpochNames:                                # ckpt.Checkpointer(..., step_name_format=EpochNames())
            def build_name(self, step):
                return f"epoch-{step}"
            def parse_name(self, name):
                return int(name[6:]) if name.startswith("epoch-") and name[6:].isdigit() else None
        assert checked_name(EpochNames(), 3) == "epoch-3"
    """

    def build_name(self, step: int) -> str:
        """The directory name of ``step``."""

    def parse_name(self, name: str) -> int | None:
        """The step a directory name stands for, or None if it is not one of ours."""


@runtime_checkable
class OrbaxNameFormat(Protocol):
    """Orbax's ``NameFormat`` protocol, which a ``Checkpointer`` takes too: the steps of a root are those
    ``find_all`` lists (once per listing of the root), and ``find_step`` finds one.
    ckpt's own formats have these methods besides ``parse_name``.

    Example::

        class EpochNames:                                # written for Orbax: build_name, find_all, find_step
            def __init__(self):
                self._std = standard_name_format(step_prefix="epoch")
            def build_name(self, step):
                return self._std.build_name(step)
            def find_all(self, base_path):
                return self._std.find_all(base_path)
            def find_step(self, base_path, step):
                return self._std.find_step(base_path, step)
        with ckpt.Checkpointer("runs/exp1", step_name_format=EpochNames()) as ckptr:
            ckptr.save(3, {"w": np.ones(3)})
            assert ckptr.latest.path.name == "epoch_3"
    """

    def build_name(self, step: int) -> str:
        """The directory name of ``step``."""

    def find_all(self, base_path: Any) -> Iterable[Any]:
        """The committed steps below ``base_path``: objects with ``step`` and ``path``."""

    def find_step(self, base_path: Any, step: int) -> Any:
        """The committed ``step`` below ``base_path`` (with ``step`` and ``path``); ValueError if there is none."""


class _FindsSteps:
    """Orbax's ``find_all`` and ``find_step`` for a format with ``parse_name``."""

    def find_all(self, base_path: str | os.PathLike) -> list[CheckpointMetadata]:
        """The committed steps below ``base_path``, ascending (``step`` and ``path`` set)."""
        base = storage.location(base_path)
        return [CheckpointMetadata(step, base / name) for step, name in find_all(base, self).items()]

    def find_step(self, base_path: str | os.PathLike, step: int) -> CheckpointMetadata:
        """The committed ``step`` below ``base_path``; ValueError (as in Orbax) if there is none."""
        for found in self.find_all(base_path):
            if found.step == step:
                return found
        raise ValueError(f"no committed step {step} named by {self!r} in {base_path}")


@dataclasses.dataclass(frozen=True)
class StandardNameFormat(_FindsSteps):
    """Names like ``23``, ``0023``, ``step_23`` or ``step_0023``.

    Args:
      step_prefix: joined to the number with ``_``; None for bare numbers ("" names step 23 ``_23``, as in Orbax).
      step_format_fixed_length: zero-pads the number to this many digits; None or 0 (as in Orbax) for none.

    Example::

        names = StandardNameFormat(step_prefix="step", step_format_fixed_length=4)
        assert names.build_name(23) == "step_0023" and names.parse_name("step_0023") == 23
        assert names.parse_name("step_23") is None       # not one of this format's names
    """

    step_prefix: str | None = None
    step_format_fixed_length: int | None = None

    def __post_init__(self):
        if self.step_prefix is not None and not (isinstance(self.step_prefix, str)
                                                 and _is_plain_name(self.step_prefix + "_")):
            raise ValueError(
                f"step_prefix {self.step_prefix!r} is not a plain directory-name prefix "
                "(no str, starts with '.', or contains a path separator)"
            )
        length = self.step_format_fixed_length
        if length is not None and (not isinstance(length, int) or length < 0):
            raise ValueError(f"step_format_fixed_length must be an int of at least 0, got {length!r}")
        if not length:  # 0 is no padding: the format equals the one without
            object.__setattr__(self, "step_format_fixed_length", length := None)
        prefix = "" if self.step_prefix is None else re.escape(self.step_prefix) + "_"
        digits = r"0|[1-9]\d*" if length is None else rf"\d{{{length}}}|[1-9]\d{{{length},}}"
        object.__setattr__(self, "_regex", re.compile(rf"{prefix}({digits})", re.ASCII))  # digits 0-9 only

    def build_name(self, step: int) -> str:
        number = str(step) if self.step_format_fixed_length is None else f"{step:0{self.step_format_fixed_length}d}"
        return number if self.step_prefix is None else f"{self.step_prefix}_{number}"

    def parse_name(self, name: str) -> int | None:
        match = self._regex.fullmatch(name)
        return int(match.group(1)) if match else None


def standard_name_format(
    step_prefix: str | None = None, step_format_fixed_length: int | None = None, *,
    single_host_load_and_broadcast: bool = False,
) -> StandardNameFormat:
    """The usual step names: ``23``, ``0023`` (fixed length 4), ``step_23`` (prefix ``step``).

    ``single_host_load_and_broadcast`` is accepted for code written for Orbax (whose process 0 then lists
    the steps alone and sends them to the others) and changes nothing: each process lists the root, which
    every process of a job sees, as Orbax's processes do by default.

    Example::

        with ckpt.Checkpointer("runs/exp1", step_name_format=standard_name_format(step_prefix="step")) as ckptr:
            ckptr.save(23, {"w": np.ones(3)})
            assert ckptr.latest.path.name == "step_23"
    """
    return StandardNameFormat(step_prefix, step_format_fixed_length)


@dataclasses.dataclass(frozen=True)
class CompositeNameFormat(_FindsSteps):
    """Writes names of ``write_name_format``; reads a name by the first of ``read_name_formats`` that
    parses it (a run that changed its naming lists both).

    Example::

        names = CompositeNameFormat(standard_name_format(step_prefix="ckpt"),
                                    (standard_name_format(step_prefix="ckpt"), standard_name_format(step_prefix="step")))
        assert names.build_name(2) == "ckpt_2" and names.parse_name("step_1") == 1
    """

    write_name_format: NameFormat
    read_name_formats: tuple[NameFormat, ...]

    def __post_init__(self):
        for i, name_format in enumerate(self.read_name_formats):
            if not isinstance(name_format, NameFormat) or isinstance(name_format, type):
                raise TypeError(f"read_name_formats[{i}] must be a step name format with build_name and parse_name "
                                f"(such as standard_name_format(...)), got {name_format!r}")
        if self.write_name_format not in self.read_name_formats:
            raise ValueError(f"write_name_format {self.write_name_format!r} must be one of read_name_formats "
                             "(as in Orbax): steps it writes must be read back")

    def build_name(self, step: int) -> str:
        return self.write_name_format.build_name(step)

    def parse_name(self, name: str) -> int | None:
        for name_format in self.read_name_formats:
            step = name_format.parse_name(name)
            if step is not None:
                return step
        return None


def composite_name_format(write_name_format: NameFormat, read_name_formats: Sequence[NameFormat]) -> CompositeNameFormat:
    """Orbax's ``composite_name_format``: writes with ``write_name_format``, which must be one of
    ``read_name_formats``; lists and loads the steps any of them names (the first that parses a name wins).

    Example::

        old, new = standard_name_format(step_prefix="step"), standard_name_format(step_prefix="ckpt")
        with ckpt.Checkpointer("runs/exp1", step_name_format=composite_name_format(new, [new, old])) as ckptr:
            ckptr.save(2, {"w": np.ones(3)})
            assert ckptr.latest.path.name == "ckpt_2"
    """
    return CompositeNameFormat(write_name_format, tuple(read_name_formats))


def _is_plain_name(name: object) -> bool:
    """A non-empty name of one directory, not hidden, without a path separator or NUL."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".")
            and not any(c in name for c in "/\\\0"))


def checked_name(name_format: NameFormat, step: int) -> str:
    """``name_format.build_name(step)``, checked before anything is written.

    Raises:
      ValueError: the name is not a plain directory name (so it could land outside the root), or it does
        not parse back to ``step`` (so the step would never be listed).

    Example::

        assert checked_name(standard_name_format(step_format_fixed_length=4), 23) == "0023"
        try:
            checked_name(standard_name_format(), -1)     # "-1" does not parse back: never listed
        except ValueError as e:
            print(e)
    """
    name = name_format.build_name(step)
    if not _is_plain_name(name):
        raise ValueError(f"step name format {name_format!r} built {name!r} for step {step}, which is not a plain "
                         "directory name (empty, starts with '.', or contains a path separator)")
    if not isinstance(name_format, NameFormat):  # Orbax's protocol: its find_all reads names, after the commit
        return name
    parsed = name_format.parse_name(name)
    if parsed != step:
        raise ValueError(f"step name format {name_format!r} built {name!r} for step {step}, which parses back to "
                         f"{parsed!r}, not step {step}: the step would never be listed")
    return name


def find_steps(names: Iterable[str], name_format: NameFormat) -> dict[int, str]:
    """Maps each step found among directory ``names`` to its name (temporaries never match).

    Example::

        names = ["0", "100", "200.ckpt-tmp", "notes.txt"]
        assert find_steps(names, standard_name_format()) == {0: "0", 100: "100"}
    """
    found = {}
    for name in names:
        step = name_format.parse_name(name)
        if step is not None:
            found[step] = name
    return found


def find_all(directory: str | os.PathLike, name_format: NameFormat | None = None) -> dict[int, str]:
    """The committed steps below a root directory (local or ``s3://``/``gs://``), ascending, with their
    directory names. Temporary, uncommitted and foreign entries are left out (see :mod:`ckpt.root`).

    Example::

        find_all("runs/exp1")                                        # {0: '0', 1000: '1000'}
        find_all("runs/exp2", standard_name_format(step_prefix="step"))  # {5: 'step_5'}
    """
    entries = root.scan(storage.location(directory), name_format or standard_name_format(), read_manifests=False)
    found: dict[int, str] = {}
    for e in entries:
        if e.kind in root.LISTED:
            found.setdefault(e.step, e.path.name)  # (the first of a step's names, as a Checkpointer lists it)
    return found


_NUMBERED = re.compile(r"(?:(.*)_)?(\d+)", re.ASCII)
_CANDIDATES = 4  # the formats, besides the default, whose steps are counted (the ones most names fit)


def name_format_of(directory: str | os.PathLike | storage.Location) -> StandardNameFormat:
    """The standard name format a root's steps were written with, for a reader not told it (``ckpt ls``):
    of the formats its names suggest (``23``, ``0023``, ``step_23``, ``step_0023``), the one that names the
    most committed steps; the default (bare numbers) on a tie or when none names a step. Listing the root
    with it (:func:`find_all`, :func:`ckpt.root.scan`) finds the steps a Checkpointer given that format lists.

    Example::

        with ckpt.Checkpointer("runs/exp2", step_name_format=standard_name_format(step_prefix="step")) as c:
            c.save(5, {"w": np.ones(3)})
        assert name_format_of("runs/exp2") == standard_name_format(step_prefix="step")
    """
    location = storage.location(directory)
    suggested: dict[StandardNameFormat, int] = {}
    for name in storage.list_names(location):
        match = _NUMBERED.fullmatch(name)  # (a temporary's name ends otherwise: never a candidate)
        if match is None or not _is_plain_name(match.group(1) or "x"):
            continue
        digits = match.group(2)
        fixed = len(digits) if len(digits) > 1 and digits.startswith("0") else None
        candidate = StandardNameFormat(match.group(1), fixed)
        suggested[candidate] = suggested.get(candidate, 0) + 1
    default = standard_name_format()
    ranked = sorted(suggested, key=lambda c: -suggested[c])[:_CANDIDATES]
    counts = {c: len(find_all(location, c)) for c in [default, *ranked]}
    return max(counts, key=lambda c: (counts[c], c == default))
