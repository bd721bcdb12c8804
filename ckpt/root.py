"""What a checkpoint root holds: each entry named like a step or a temporary, classified as a committed
ckpt step, a step Orbax wrote, a temporary of ckpt's, or something foreign, with what it holds in words.

Listing, the writer's sweep of leftovers, saving and garbage collection all ask this module, so that
nothing ckpt did not write is ever listed as a step, overwritten, renamed or removed: a save to a step
whose name is taken by something foreign fails before anything is written, and a temporary
(``*.ckpt-tmp``, ``*.ckpt-deleting``, or an uncommitted step on an object store) is removed only when
it holds ckpt's marker (``.ckpt-owned``) or is an empty directory.

Example::

    entries = scan(storage.location("runs/exp1"), step_lib.standard_name_format())
    steps = [e.step for e in entries if e.kind in LISTED]
    for e in entries:
        print(e.path.name, e.kind.name, e.holds)         # e.g. 7 FOREIGN a directory holding 'notes.txt'
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import functools
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from ckpt import format as fmt
from ckpt import formats, loading, objectstore, orbax, schema, storage
from ckpt.errors import (CheckpointCorruptedError, CheckpointNotFoundError, ForeignEntryError, InvalidLayoutError,
                         RootDirectoryError, StepAlreadyExistsError, StepNotFoundError, StepReplacedError)

if TYPE_CHECKING:
    from ckpt.path.step import NameFormat

T = TypeVar("T")


class Kind(enum.Enum):
    """What an entry of a root is."""

    STEP = "a committed ckpt step"
    ORBAX = "a step Orbax wrote (read in place by ckpt.orbax; never overwritten by a save)"
    TEMPORARY = "a temporary of ckpt's (a save or a deletion a crash interrupted)"
    FOREIGN = "not a step ckpt can use: never listed, overwritten, renamed or removed"


LISTED = frozenset({Kind.STEP, Kind.ORBAX})
"""The kinds listed as checkpoints: loaded, and deleted when the preservation policy says so."""

REMOVABLE = frozenset({Kind.TEMPORARY})
"""The kinds a writer removes before its first save."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of a root.

    path: where it is. kind: what it is. step: the step its name stands for (None for a temporary).
    holds: what it holds, in words, for warnings and errors. manifest: a listed step's validated manifest, or
    for an Orbax step the same fields (``ckpt.formats.info``), when read.
    """

    path: storage.Location
    kind: Kind
    step: int | None
    holds: str
    manifest: dict | None = None


def scan(root: storage.Location, name_format: NameFormat, *, read_manifests: bool = True) -> list[Entry]:
    """The entries of ``root`` named like a step of ``name_format`` or like a temporary, ascending by step
    (temporaries last). Other names (the lock, ckpt-root.json, a user's notes) are not entries.

    ``read_manifests=False`` takes a directory holding a regular ``manifest.json`` for a STEP without
    reading it (``lightweight_initialize``).
    """
    entries, named = [], []
    parse = step_parser(name_format, root)
    for name, may_be_step in _listing(root):
        try:
            if name.endswith(fmt.TEMPORARY_SUFFIXES):
                entries.append(classify_temporary(root / name))
            elif (step := parse(name)) is not None:
                named.append((root / name, step, may_be_step))
        except FileNotFoundError:
            continue  # removed since the listing
    for (path, step, _), entry in zip(named, _committed(named, read_manifests)):
        try:
            entries.append(entry or classify(path, step, read_manifest=read_manifests))
        except FileNotFoundError:
            continue
    written = name_format.build_name

    def order(e: Entry) -> tuple:
        # Of two entries of one step (a composite name format reads several names), the one committed last comes
        # first, else (manifests not read) the one at the name the format writes: see replaced_and_left.
        committed = (e.manifest or {}).get("commit_timestamp_nsecs") or 0
        return e.step is None, e.step or 0, -committed, e.step is None or e.path.name != written(e.step), e.path.name

    return sorted(entries, key=order)


def step_parser(name_format: Any, root: storage.Location) -> Callable[[str], int | None]:
    """How the names in ``root`` are read as steps: the format's ``parse_name``; for a format written to
    Orbax's protocol (``build_name``, ``find_all``, ``find_step``: no ``parse_name``), the steps its
    ``find_all`` lists there now."""
    if hasattr(name_format, "parse_name"):
        return name_format.parse_name
    found = {os.path.basename(str(m.path).rstrip("/")): int(m.step) for m in name_format.find_all(root)}
    return found.get


def _listing(root: storage.Location) -> list[tuple[str, bool]]:
    """The names in ``root``, each with whether the listing shows it may be a committed step, which it tells
    without a request or system call per name: locally, a directory itself (not a link to one); on an object
    store, whose listing holds every key below the root, a name with a ``manifest.json`` directly in it."""
    if not isinstance(root, Path):
        keys = root.keys()
        committed = {key[: -len(fmt.MANIFEST) - 1] for key in keys if key.endswith("/" + fmt.MANIFEST)}
        return [(name, name in committed) for name in sorted({key.split("/", 1)[0] for key in keys})]
    try:
        with os.scandir(root) as found:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in found]
    except FileNotFoundError:
        return []


def _committed(named: list[tuple[storage.Location, int, bool]], read_manifest: bool) -> list[Entry | None]:
    """For each ``(path, step, whether the listing shows it may be a committed step)`` (see :func:`_listing`): a
    committed step, as :func:`classify` finds it, with the fewest system calls or requests, when it is a
    directory holding a regular ``manifest.json`` (which ``read_manifest`` reads and validates); None for
    anything else, which classify looks at. All the manifests are read first (on an object store, several
    requests at once), then parsed (see ``schema.manifest_bytes``)."""
    if not read_manifest:  # (on an object store, the listing showed the manifest)
        return [Entry(path, Kind.STEP, step, Kind.STEP.value)
                if may_be and (not isinstance(path, Path) or _unless_bad(_manifest_is_regular, path)) else None
                for path, step, may_be in named]
    paths = [path for path, _, may_be in named if may_be]
    read = functools.partial(_unless_bad, schema.manifest_bytes)
    read_all = map if not paths or isinstance(paths[0], Path) else objectstore.each  # (a request each, at once)
    manifests = iter(list(read_all(read, paths)))
    found = [next(manifests) if may_be else None for _, _, may_be in named]
    entries = []
    for (path, step, _), data in zip(named, found):
        manifest = None if data is None else _unless_bad(schema.parse_manifest, path, data)
        entries.append(None if manifest is None else Entry(path, Kind.STEP, step, Kind.STEP.value, manifest))
    return entries


def _manifest_is_regular(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(os.path.join(path, fmt.MANIFEST)).st_mode)


def _unless_bad(read: Callable[..., T], *args: Any) -> T | None:
    """``read(*args)``, or None when what it reads is missing, unreadable or damaged."""
    try:
        return read(*args)
    except (OSError, CheckpointCorruptedError, InvalidLayoutError):
        return None


def classify_temporary(path: storage.Location) -> Entry:
    """What ``path`` (which exists), named like a temporary, is: TEMPORARY when it is a directory that holds
    ckpt's marker or nothing at all, else FOREIGN."""
    if isinstance(path, Path) and _is_dir(path):
        try:
            os.listdir(path)
        except PermissionError as e:  # (another user's, as for a step: see classify)
            return Entry(path, Kind.FOREIGN, None, f"{_UNREADABLE} ({e})")
        except (FileNotFoundError, NotADirectoryError):
            pass  # (removed or replaced since: classified below as it is now)
    owned = storage.is_marked(path) or (isinstance(path, Path) and _is_empty_dir(path))
    if not owned and isinstance(path, Path) and not os.path.lexists(path):  # (removed since it was looked at:
        owned = True  # by a sweep, which unlinks its marker, then the directory; nothing of anyone's is there)
    return Entry(path, Kind.TEMPORARY if owned else Kind.FOREIGN, None, storage.describe(path))


def classify(path: storage.Location, step: int | None, *, read_manifest: bool = True) -> Entry:
    """What ``path`` (which exists) is, named like ``step`` (None: the directory of ``ckpt.save``). A symbolic
    link, a file, a directory without a readable ckpt manifest are FOREIGN; nothing is followed or changed.
    A path named like a temporary is classified as one (:func:`classify_temporary`), whatever it holds.
    On an object store, a step whose deletion is under way is a TEMPORARY, and FileNotFoundError is raised
    once nothing is left of it."""
    if path.name.endswith(fmt.TEMPORARY_SUFFIXES):
        return dataclasses.replace(classify_temporary(path), step=step)
    local = isinstance(path, Path)
    if local and not _is_dir(path):
        return Entry(path, Kind.FOREIGN, step, storage.describe(path))
    try:
        return _classify_dir(path, step, local=local, read_manifest=read_manifest)
    except PermissionError as e:  # (another user's directory of mode 0700: one entry, not the root, unreadable;
        if not local:  # an object store's refusal, which credentials that expired give every entry, is raised)
            raise
        return Entry(path, Kind.FOREIGN, step, f"{_UNREADABLE} ({e})")


_UNREADABLE = "a directory this process may not read"


def is_unreadable(entry: Entry) -> bool:
    """Whether ``entry`` is a local directory this process may not look into (see :func:`classify`): a step of
    ckpt's or Orbax's, or a user's directory, for all it can tell."""
    return entry.kind is Kind.FOREIGN and entry.holds.startswith(_UNREADABLE)


def _classify_dir(path: storage.Location, step: int | None, *, local: bool, read_manifest: bool) -> Entry:
    """:func:`classify` of a directory (locally, not a symbolic link)."""
    if formats.is_orbax(path):
        try:
            return Entry(path, Kind.ORBAX, step, Kind.ORBAX.value, formats.info(path) if read_manifest else None)
        except CheckpointCorruptedError as e:
            return Entry(path, Kind.FOREIGN, step, f"an Orbax checkpoint ({storage.describe(path)}) ckpt cannot read: {e}")
    manifest_path = path / fmt.MANIFEST
    mode = _mode(manifest_path) if local else None
    if mode is not None and not stat.S_ISREG(mode):
        return Entry(path, Kind.FOREIGN, step, f"{storage.describe(path)}, whose {fmt.MANIFEST} is not a regular file")
    if mode is not None or (not local and manifest_path.exists()):
        if not read_manifest:
            return Entry(path, Kind.STEP, step, Kind.STEP.value)
        try:
            return Entry(path, Kind.STEP, step, Kind.STEP.value, loading.read_manifest(path))
        except (CheckpointCorruptedError, InvalidLayoutError) as e:  # (the latter: its files removed since)
            if local or manifest_path.exists():
                return Entry(path, Kind.FOREIGN, step, f"{storage.describe(path)}, which ckpt cannot read: {e}")
            # (an object store) its manifest was deleted since: a deletion under way (see storage.delete_dir)
    marked = storage.is_marked(path)  # (before describe: a deletion on an object store removes the marker last)
    holds = storage.describe(path)
    if marked:
        if not local:  # a save ckpt began in place (object stores have no rename) and never committed, or a deletion
            return Entry(path, Kind.TEMPORARY, step, holds)
        holds = f"{holds}: a step of ckpt's whose {fmt.MANIFEST} is missing (damaged; kept for inspection)"
    elif not storage.exists(path):  # removed since it was listed (an object store's deletion, object by object)
        raise FileNotFoundError(errno.ENOENT, f"{path} was removed", str(path))
    elif orbax.is_step_on_object_store(path):
        holds = f"{holds}: {orbax.ON_OBJECT_STORE}"
    elif local and orbax.is_tree_saved_alone(path):
        holds = f"{holds}: {orbax.ALONE} (ckpt.load({str(path.parent)!r}, checkpointable_name={path.name!r}))"
    return Entry(path, Kind.FOREIGN, step, holds)


def is_temporary(path: storage.Location, suffixes: tuple[str, ...] = fmt.TEMPORARY_SUFFIXES) -> bool:
    """Whether ``path`` (which exists) is a temporary of ckpt's (see :func:`classify_temporary`) named with one
    of ``suffixes``: what ckpt may remove."""
    return path.name.endswith(suffixes) and classify_temporary(path).kind is Kind.TEMPORARY


def check_committed(path: storage.Location) -> None:
    """Checks that ``path``, named directly as a checkpoint (by ``ckpt.load``, ``ckpt show``, ``ckpt verify``),
    is not a temporary of ckpt's, which no reader takes for a checkpoint: a save never committed (its
    files may be incomplete), a step being deleted, or a step a save with ``overwrite=True`` set aside.

    Raises:
      CheckpointNotFoundError: it is one; the message says which, and what to load instead.
    """
    name = path.name
    if not is_temporary(path):
        return  # (on an object store, a save never committed lacks its manifest: loading.read_manifest says so)
    if name.endswith(fmt.TMP_SUFFIX):
        what = (f"a save of {name[:-len(fmt.TMP_SUFFIX)]} that was never committed (in progress, or interrupted "
                "by a crash): its files may be incomplete, and the next save in its directory removes it")
    elif name.endswith(fmt.DELETING_SUFFIX):
        what = ("a checkpoint being deleted (or whose deletion a crash interrupted); the next save in its directory "
                "removes it")
    elif storage.set_aside_step(path) is not None:
        what = (f"{name[:-len(fmt.REPLACED_SUFFIX)]} as it was committed before a save with overwrite=True that a "
                f"crash interrupted: rename it back (a Checkpointer opened on {path.parent} does so), then load that")
    else:
        what = (f"what a save with overwrite=True replaced by {name[:-len(fmt.REPLACED_SUFFIX)]}; the next save in its "
                "directory removes it")
    raise CheckpointNotFoundError(f"no checkpoint at {path}: it is a temporary of ckpt's, {what}")


def _mode(path: Path) -> int | None:
    """The mode of ``path`` itself (a link is not followed), or None when there is nothing (its directory
    included: replaced by a file since it was listed)."""
    try:
        return os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_dir(path: Path) -> bool:
    """A directory itself, not a symbolic link to one."""
    return stat.S_ISDIR(os.lstat(path).st_mode)


def _is_empty_dir(path: Path) -> bool:
    """A directory itself that holds nothing; False once it is gone or replaced by a file (since it was listed), and
    for one this process may not list."""
    try:
        return _is_dir(path) and not os.listdir(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False


def check_outside_temporaries(directory: storage.Location, what: str) -> None:
    """Checks that ``directory`` (``what`` it is to be, for the error) neither is nor lies in a directory named
    like a temporary of ckpt's, which the next writer of its parent removes (with what was saved there) when it
    is one; as written, and locally with its symbolic links followed (a link into a temporary too).

    Raises:
      ValueError: it is or does, named.
    """
    written = (directory, *getattr(directory, "parents", ()))  # (an object store's path: itself)
    real = Path(os.path.realpath(directory)) if isinstance(directory, Path) else None
    followed = (real, *real.parents) if real is not None else ()
    temporary = next((p for p in (*written, *followed) if p.name.endswith(fmt.TEMPORARY_SUFFIXES)), None)
    if temporary is not None:
        where = temporary.name if temporary in written else temporary
        raise ValueError(f"{directory} cannot be {what}: {where} is named like a temporary of ckpt's (a "
                         f"name ending in one of {fmt.TEMPORARY_SUFFIXES}), which the next save in its directory "
                         "removes, with what was saved in it; choose another directory")


def check_outside_steps(directory: storage.Location, what: str) -> None:
    """Checks that ``directory`` (``what`` it is to be, for the error) neither is nor lies in a checkpoint's
    step directory (ckpt's or Orbax's, see :func:`ckpt.formats.has_step_files`), locally with its symbolic
    links followed: a root opened on a step instead of on the directory holding it would write its steps and
    its lock into that step, and a save there would be deleted with the step. On an object store, in one round
    trip: a step of ckpt's (see :func:`ckpt.formats.first_holding_a_step`).

    Raises:
      RootDirectoryError: it is or does, with the step named.
    """
    if isinstance(directory, Path):
        real = Path(os.path.realpath(directory))  # (a link into a step too)
        step = next((p for p in (real, *real.parents) if formats.has_step_files(p)), None)
    else:
        real, named = directory, [directory]
        while named[-1].key:
            named.append(named[-1].parent)
        step = formats.first_holding_a_step(named)
    if step is None:
        return
    where = "is" if step == real else f"lies in {step}, which is"
    if not isinstance(step, Path) and not (step / fmt.MANIFEST).exists():
        raise RootDirectoryError(
            f"{directory} cannot be {what}: it {where} a checkpoint of ckpt's not committed (ckpt's marker, no "
            "manifest: a save in progress, or a save or a deletion that a crash cut short), which would be removed "
            f"with what is saved there. Pass another directory (once no save runs there, ckpt.delete({str(step)!r}) "
            "removes it).", path=directory)
    raise RootDirectoryError(
        f"{directory} cannot be {what}: it {where} a checkpoint (a step directory), and what is saved there "
        f"would be written into that checkpoint. Pass the directory that holds the steps ({step.parent} for "
        "this one), or another one.", path=directory)


def make(directory: storage.Location, *, mode: int | None = None, what: str = "a checkpoint root") -> None:
    """Creates a root directory (with its parents) when it is missing; ``what`` it is, for the error.

    Raises:
      ValueError: the path is, or lies in, a directory named like a temporary of ckpt's (see
        :func:`check_outside_temporaries`).
      RootDirectoryError: the path is, or lies in, a checkpoint's step directory (see
        :func:`check_outside_steps`), is a file, lies under one or under a symbolic link loop, or this
        process may not create it.
    """
    check_outside_temporaries(directory, what)
    check_outside_steps(directory, what)
    try:
        with storage.writing_to(directory):
            storage.make_dir(directory, mode=mode)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTDIR, errno.ELOOP):
            raise
        check_no_file_in_the_way(directory, what)
        raise


def check_no_file_in_the_way(directory: Path, what: str) -> None:
    """Refuses a local path that is, or lies under, something other than a directory (a file, a symbolic
    link loop); a missing one passes (it is created when needed). ``what`` it is to be, for the error.

    Raises:
      RootDirectoryError: naming ``directory`` and what is in the way.
    """
    in_the_way = next((p for p in (directory, *directory.parents) if os.path.lexists(p)), None)
    if in_the_way is not None and not in_the_way.is_dir():
        raise RootDirectoryError(
            f"{directory} cannot be {what}: {in_the_way} is {storage.describe(in_the_way)}, not a "
            "directory. Pass the path of a directory, or of one not made yet.", path=directory) from None


def check_target(final: storage.Location, tmp: storage.Location, *, step: int | None, overwrite: bool) -> bool:
    """Checks, before a save writes anything, that it will destroy nothing ckpt did not write: ``final``
    is absent or a committed ckpt step (replaced only with ``overwrite``; for ``ckpt.save``, ``step`` None,
    also an empty directory, as Orbax's save takes it: the commit takes its name only while it is empty),
    and ``tmp``, the temporary name it is written under, is absent or a temporary of ckpt's.

    Raises:
      ValueError: ``final``'s name ends as a temporary's does, so the next writer in its directory would
        remove the checkpoint as the leftover of a crashed save.
      StepAlreadyExistsError: ``final`` is a committed step (or such a directory) and ``overwrite`` is not set.
      ForeignEntryError: ``final`` or ``tmp`` is something ckpt did not write (named, with what it holds), or
        ``final`` is an empty directory that is a mount point.

    Returns:
      Whether ``final`` is such an empty directory.
    """
    what = "the checkpoint" if step is None else f"step {step}"
    if final.name.endswith(fmt.TEMPORARY_SUFFIXES):
        raise ValueError(f"cannot save {what} to {final}: a name ending in one of {fmt.TEMPORARY_SUFFIXES} is "
                         "that of a temporary of ckpt's, which the next save in its "
                         "directory removes; choose another name")
    empty = False
    if storage.exists(final):
        entry = classify(final, step)
        if entry.kind is Kind.TEMPORARY and final == tmp:  # (an object store) a save of ckpt's never committed
            return False
        empty = step is None and isinstance(final, Path) and _is_empty_dir(final)
        if empty and os.path.ismount(final):
            raise ForeignEntryError(
                f"cannot save {what} to {final}: it is a mount point (a file system mounted there), which a save "
                "cannot replace, even with overwrite=True. Save into a directory in it, such as "
                f"{final / 'checkpoint'}.", path=final)
        if entry.kind is not Kind.STEP and not empty:
            kept = ("; a damaged checkpoint, which ckpt never overwrites, renames or deletes" if _removable(entry) else
                    "; ckpt never overwrites, renames or deletes a checkpoint it cannot read" if _is_damaged(entry) else
                    ", which ckpt did not write, and ckpt never overwrites, renames or deletes such a thing")
            raise ForeignEntryError(
                f"cannot save {what}: {final} holds {entry.holds}{kept}, even with overwrite=True. Move it away, or "
                f"save to another step or path{removal_hint(entry)}.", path=final)
        if not overwrite:
            where = f"step {step} already exists at {final}" if step is not None else (
                f"{final} already exists" + (" (an empty directory)" if empty else ""))
            raise StepAlreadyExistsError(f"{where}; pass overwrite=True to replace it", step=step, path=final)
    elif not overwrite and isinstance(final, Path) and os.path.isdir(final.parent) and storage.set_aside_step(
            aside := final.with_name(final.name + fmt.REPLACED_SUFFIX)) is not None:  # (else below a file or a link loop: the save names it)
        raise StepAlreadyExistsError(  # (a save that took its name would leave it to be removed as replaced)
            f"{what} already exists, set aside as {aside} by a save with overwrite=True that a crash interrupted; "
            f"pass overwrite=True to replace it (or rename it back to {final})", step=step, path=final)
    if tmp != final and storage.exists(tmp):
        try:
            entry = classify_temporary(tmp)
        except FileNotFoundError:  # removed since (a sweep, as in classify_temporary): nothing is there
            return empty
        if entry.kind is Kind.FOREIGN:
            raise ForeignEntryError(
                f"cannot save {what}: {tmp}, the name it is written under until it is complete, holds "
                f"{entry.holds} without ckpt's {fmt.MARKER} marker; ckpt never removes what it did not write. "
                "Move it away, or save to another step or path.", path=tmp)
    return empty


def replaced_elsewhere(existing: storage.Location | None, final: storage.Location, step: int) -> storage.Location | None:
    """The directory of the step a save with ``overwrite=True`` to ``final`` replaces, when it is under
    another name (``existing``, which a composite name format reads but does not write): the caller deletes
    it once the new step is committed, as Orbax deletes the step it overwrites, so that it never comes back
    as the step once the new one is gone (one a crash left then is never listed, and the root's next writer
    deletes it: :func:`replaced_and_left`). None when there is none.

    Raises:
      ForeignEntryError: that directory is a step Orbax wrote, which ckpt never overwrites (nothing is written).
    """
    if existing is None or existing == final:
        return None
    if formats.is_orbax(existing):
        raise ForeignEntryError(
            f"cannot save step {step} with overwrite=True: the step is {existing}, {Kind.ORBAX.value}. Move it "
            "away, or save to another step.", path=existing)
    return existing


def begun_in_place(entries: list[Entry]) -> set[int]:
    """The steps of ``entries`` (from :func:`scan`) whose names hold what ckpt began there and never finished: on
    an object store, which has no rename, a save (or a promotion) written in place and never committed, or a
    deletion cut short (a crash, a failure)."""
    return {e.step for e in entries if e.kind is Kind.TEMPORARY and e.step is not None}


def replaced_and_left(entries: list[Entry]) -> list[Entry]:
    """The steps of ckpt's among ``entries`` (from :func:`scan`) that the same step committed later under
    another name (a composite name format reads several) replaced: a save with ``overwrite=True`` deletes
    the step it replaces under another name once the new one is committed (see :func:`replaced_elsewhere`),
    and a crash (or a failed deletion) between the two left it. Never listed (:func:`scan` puts the step
    committed last first); the root's writer deletes them, as the save would have."""
    by_step: dict[int, list[Entry]] = {}
    for entry in entries:
        if entry.kind is Kind.STEP:
            by_step.setdefault(entry.step, []).append(entry)
    replaced = []
    for same in by_step.values():
        if len(same) < 2:
            continue
        times = [commit_time(e.path, e.manifest) for e in same]
        if None not in times:
            replaced += [e for e, committed in zip(same, times) if committed < max(times)]
    return replaced


def commit_time(step_dir: storage.Location, manifest: dict | None = None) -> int | None:
    """A step's commit time from its ``manifest``, or from its manifest read now where the listing read none
    (:func:`scan` with ``read_manifests=False``, as ``lightweight_initialize`` lists), or None when it cannot be
    read."""
    manifest = manifest or _unless_bad(loading.read_manifest, step_dir)
    return None if manifest is None else manifest.get("commit_timestamp_nsecs")


def check_shared(tmp: storage.Location, index: int) -> None:
    """Checks that process ``index`` (not the primary) sees the temporary directory ``tmp`` that process 0
    made for a step (every process writes its shards there).

    Raises:
      RootDirectoryError: it does not: the root is not one directory every process sees, and the step
        would lack this process's files.
    """
    if not storage.is_marked(tmp):
        raise RootDirectoryError(
            f"process {index} does not see {tmp}, which process 0 made to save the step in: the root must be one "
            "directory that every process sees (a shared file system, or an object store), or the step would "
            "lack this process's shards", path=tmp.parent)


def commit(tmp: storage.Location, final: storage.Location, *, step: int | None, overwrite: bool,
           mode: int | None = None) -> None:
    """Commits a fully written temporary (see :func:`ckpt.storage.commit_dir`) after checking ``final``
    again as :func:`check_target` did before the save began: whatever took its name while the step was
    written (a user's directory, another process's save of the step) is never replaced. An empty directory
    ``ckpt.save`` replaces gives the checkpoint its mode, unless the temporary was made with a ``mode`` of
    its own (``FileOptions.path_permission_mode``).

    Raises:
      StepAlreadyExistsError, ForeignEntryError: as :func:`check_target`; the step is not committed.
    """
    empty = isinstance(final, Path) and check_target(final, final, step=step, overwrite=overwrite)
    # the user's directory keeps its mode (mkdtemp's 0o700 too); one gone or replaced since: the rename says so
    found = _mode(final) if empty and mode is None else None
    if found is not None and stat.S_ISDIR(found):
        os.chmod(tmp, stat.S_IMODE(found))
    storage.commit_dir(tmp, final, replace=overwrite and not empty, over_empty=empty)


@contextlib.contextmanager
def reading(step_dir: storage.Location, step: int | None = None) -> Iterator[Callable[[str], StepNotFoundError | None]]:
    """Reads of one step: an error because the step was deleted meanwhile (by another process's garbage
    collection) is raised as StepNotFoundError saying so, one because it was replaced (saved again with
    ``overwrite=True``) as StepReplacedError, not as damage or a missing file.

    It gives ``gone(why)``, for a reader that reports damage rather than raising it (``ckpt verify``):
    the error to raise instead because the step is gone or replaced since the reads began, or None.

    Example::

        with reading(step_dir, 7):
            trees = formats.load_checkpointables(step_dir, None)
    """
    before = _identity(step_dir)
    what = str(step_dir) if step is None else f"step {step} ({step_dir})"

    def gone(why: str) -> StepNotFoundError | None:
        # A local deletion renames the whole step aside; one on an object store removes its manifest first.
        if not storage.exists(step_dir if isinstance(step_dir, Path) else step_dir / fmt.MANIFEST):
            return StepNotFoundError(f"{what} was deleted while it was being read (by another process's garbage "
                                     f"collection?): it is gone ({why})", step=step, path=step_dir)
        if _identity(step_dir) != before:
            return StepReplacedError(f"{what} was replaced (saved again with overwrite=True) while it was being "
                                     f"read; read it again for the new one ({why})", step=step, path=step_dir)
        return None

    try:
        yield gone
    except (CheckpointCorruptedError, InvalidLayoutError, OSError) as e:
        if isinstance(e, StepNotFoundError) or formats.is_orbax(step_dir):
            raise
        error = gone(f"{type(e).__name__}: {e}")
        if error is not None:
            raise error from e
        raise


def check_still_a_step(step_dir: storage.Location, step: int) -> None:
    """Checks that the local directory of a listed ``step`` is still a directory itself: a read never goes through
    a symbolic link (or reads a file) that took the step's name since it was listed, which a listing skips.

    Raises:
      StepNotFoundError: it is not, with what it holds named.
    """
    mode = _mode(step_dir) if isinstance(step_dir, Path) else None
    if mode is not None and not stat.S_ISDIR(mode):  # (nothing there: the read says it was deleted)
        raise StepNotFoundError(f"step {step} ({step_dir}) is no committed step now: it holds "
                                f"{storage.describe(step_dir)}, put there since it was listed, which ckpt never reads, "
                                "lists or deletes", step=step, path=step_dir)


def _identity(step_dir: storage.Location) -> tuple[int, int] | None:
    """The local step directory's device and inode (a replacement is another directory); None on an object store."""
    if not isinstance(step_dir, Path):
        return None
    try:
        found = os.lstat(step_dir)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def is_damaged_step(entry: Entry) -> bool:
    """Whether a FOREIGN entry named like a step is a step ckpt wrote (a directory, not a link, holding ckpt's
    marker) whose manifest is missing or cannot be read, or a step Orbax committed whose metadata cannot be
    read: damaged and kept for inspection, not a user's directory. Such a step is never listed, overwritten
    or deleted; readers report it as damaged."""
    return entry.step is not None and _is_damaged(entry)


def _is_damaged(entry: Entry) -> bool:
    """:func:`is_damaged_step` for a checkpoint named as a step or not."""
    try:
        return entry.kind is Kind.FOREIGN and (storage.is_marked(entry.path) or formats.is_orbax(entry.path))
    except PermissionError:  # a directory this process may not look into: shown as found, not taken for a step
        return False


def _removable(entry: Entry) -> bool:
    """Whether ``entry`` is a damaged checkpoint whose files no reader reads (see :func:`removal_hint`)."""
    return _is_damaged(entry) and not formats.is_unread_but_whole(entry.path)


def removal_hint(entry: Entry) -> str:
    """For an error that names ``entry``: how to remove it where it is a damaged checkpoint (see
    :func:`is_damaged_step`), which ckpt keeps; else '' (a checkpoint whose files are whole, which this ckpt cannot
    read: a newer ckpt's, or Orbax's where its metadata nests deeper than ckpt reads, is never said to be removed)."""
    if not _removable(entry):
        return ""
    how = f"`rm -r {entry.path}`" if isinstance(entry.path, Path) else "with your object store's own tools"
    return f"; to remove it, delete it yourself ({how}; `ckpt verify` says what is damaged)"


def whole_checkpoints_only(checkpointable_name: str | None) -> None:
    """Raises ValueError for a ``checkpointable_name`` given to a deletion (Orbax deletes one checkpointable of a
    checkpoint; a ckpt checkpoint's trees share its files)."""
    if checkpointable_name is not None:
        raise ValueError(f"ckpt deletes whole checkpoints only, not checkpointable {checkpointable_name!r}: the trees "
                         "of a checkpoint share its files (save the others again without it)")


def delete_step(path: storage.Location, step: int | None) -> None:
    """Deletes a listed step (see :func:`ckpt.storage.delete_dir`) after checking, again, that it is one,
    its manifest (or Orbax's metadata) read and validated. On an object store, what a save (or a promotion) that
    ckpt began at its name and never committed, or a deletion cut short, left there instead is removed: a step
    listed once its overwrite failed so (:meth:`ckpt.Checkpointer.delete`), a path given to ``ckpt.delete``.

    Raises:
      ForeignEntryError: ``path`` is not a committed step (replaced by something else, or listed without
        reading its manifest by ``lightweight_initialize``): nothing is removed.
      RootNotWritableError, RootDirectoryError: this process may not write in its local directory (which became
        read-only), or the file system is read-only: nothing is removed.
    """
    entry = classify(path, step)
    if entry.kind is Kind.TEMPORARY and not isinstance(path, Path):  # (written in place: no rename)
        storage.remove_owned(path)
        return
    if entry.kind not in LISTED:
        raise ForeignEntryError(f"{path} is not a committed ckpt step (it holds {entry.holds}); "
                                f"it was not deleted{removal_hint(entry)}", path=path)
    # (an object store that refuses a deletion may still take saves: its error, naming the object, is raised as it is)
    with storage.writing_to(path.parent) if isinstance(path, Path) else contextlib.nullcontext():
        storage.delete_dir(path)
