"""Two tiers: frequent checkpoints on fast local storage, periodic durable ones, restored from the freshest.

A :class:`ckpt.Checkpointer` given ``local=LocalCheckpointOptions(...)`` keeps two sequences of steps,
each with its own save-decision and preservation policies (Orbax's emergency checkpointing has the
same split: ``LocalCheckpointOptions`` and ``PersistentCheckpointOptions``):

- the local tier (a local SSD, ``/dev/shm``): a plain Checkpointer over ``LocalCheckpointOptions.directory``;
- the durable tier: the Checkpointer's own root (any root ckpt supports, usually ``s3://`` or ``gs://``)
  and its own policies.

Every save goes to the local tier first: the loop blocks once, for the snapshot of an async save. A
step the durable policy also wants is then *promoted*: its committed local directory is copied to the
durable root on the durable tier's background writer, and committed there (on an object store its
manifest, copied last, is the commit record). The loop never waits for a promotion. One runs at a time
and at most one waits: a newer one replaces the waiting one, whose step stays an ordinary local step
(forced and preemption saves, and overwrites of a step the durable tier holds, which replace its durable
copy too, are never replaced; they replace a waiting one and wait behind the one running). The local
preservation policy keeps a step until its promotion is done, when the policy is applied again (so
``wait()`` leaves each tier holding what its policy keeps).

Restore (``load`` with no step) takes the newest step of either tier; a step in both is read from the
local tier, unless its durable copy was committed later (another writer saved it again there). Loading
checks every checksum, so a damaged or vanished local step falls back to the durable copy of the same
step, then to older steps. A missing local directory is a new machine: it
is created empty. ``checkpoints`` and ``latest`` list both tiers; each entry is a
:class:`TieredCheckpointMetadata` that says where the step lives.

A preemption (SIGTERM, ``ckpt.preemption.notify()``, JAX's preemption sync point) saves the current
step locally at once and promotes it (that step only: a job that goes on saves later steps as its
policies say). ``wait()`` then waits for the promotion for at most
``grace_period_secs`` (counted from the save) and logs how long it took, or that the step is on the
local tier only; past that, ``close()`` (as the interpreter at exit) lets the upload go on until it
ends or the job is killed. An interrupted promotion leaves no listed step: its leftovers are swept by
the next writer of the durable root, which also promotes, at its first save, the newest local step a
crash left unpromoted (see :meth:`LocalTier._recover`).

Multi-process jobs: each process's local tier is its own directory (``<directory>/process_<i>``) and
holds the shards that process owns, plus every replicated leaf. Each save first checks that every process saves
the same tree, as a save of several processes does (before anything is written on either tier: a promotion only
copies files). A promotion copies each process's shards to the durable root, the primary's replicated leaves (as a
save writes the primary's), and the primary process commits after a barrier, so the durable step holds every shard. Restoring from the
local tiers would need every process to hold the same step with the same sharding; nothing in the
Processes protocol gathers that, so multi-process loads read the durable tier only (a replaced host,
whose local tier is empty, restores like the others: a load of the latest waits for the promotions in flight, and
``latest`` lists a step from the moment its promotion is queued, on every process alike), and a Checkpointer opened
there deletes the local steps newer than the durable tier's latest (the job saves them again).

Example::

    from ckpt.training import save_decision_policies as sdp, preservation_policies as pp
    with ckpt.Checkpointer(
            "s3://bucket/runs/exp1",
            save_decision_policy=sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000),
                                                    sdp.PreemptionCheckpointingPolicy()]),
            preservation_policy=pp.LatestN(5),
            local=ckpt.LocalCheckpointOptions("/mnt/ssd/exp1", save_decision_policy=sdp.FixedIntervalPolicy(50),
                                              preservation_policy=pp.LatestN(2))) as ckptr:
        state = init() if ckptr.latest is None else ckptr.load(abstract_state=abstract)
        ...
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import tensorstore as ts

from ckpt import arguments, background, distributed, errors, formats, loading, root, saving, storage
from ckpt import format as fmt
from ckpt.context import Context, MultiprocessingOptions, get_context
from ckpt.metadata import CheckpointMetadata
from ckpt.policies import preservation as preservation_policies
from ckpt.policies import save_decision as save_decision_policies

logger = logging.getLogger("ckpt")

LOCAL, DURABLE = "local", "durable"
_DURABLE_ROOT = "durable_root"  # the key of a local tier's custom metadata naming its durable root
_COPY_INFLIGHT_BYTES = 64 << 20  # file bytes a promotion reads ahead of the writes it waits for


@dataclasses.dataclass(frozen=True)
class LocalCheckpointOptions:
    """The local tier of a two-tier :class:`ckpt.Checkpointer` (its ``local`` argument).

    Args:
      directory: a local directory (a local SSD, ``/dev/shm``); created when missing.
      save_decision_policy: when to save locally; default: the first step, then whenever no local
        save is in flight, and on preemption.
      preservation_policy: what to keep locally; default ``LatestN(2)``. A step waiting for its
        promotion to the durable tier is kept until it is copied.
      grace_period_secs: after a preemption, how long ``wait()`` waits for the current step's
        promotion to the durable tier (counted from its save) before it logs that the step is on the
        local tier only and returns.

    Example::

        local = ckpt.LocalCheckpointOptions("/mnt/ssd/exp1",
                                            save_decision_policy=sdp.FixedIntervalPolicy(50),
                                            preservation_policy=pp.LatestN(2), grace_period_secs=30)
        ckptr = ckpt.Checkpointer("s3://bucket/exp1", save_decision_policy=sdp.FixedIntervalPolicy(1000),
                                  local=local)
    """

    directory: str | os.PathLike
    save_decision_policy: save_decision_policies.SaveDecisionPolicy | None = None
    preservation_policy: preservation_policies.PreservationPolicy | None = None
    grace_period_secs: float = 30.0

    def __post_init__(self):
        try:
            local_directory(self.directory)
        except ValueError as e:
            raise ValueError(f"LocalCheckpointOptions directory: {e}") from None
        arguments.number(self.grace_period_secs, "LocalCheckpointOptions.grace_period_secs")
        if self.grace_period_secs == math.inf:  # (a wait cannot take it: OverflowError at the preemption's wait())
            raise ValueError("LocalCheckpointOptions.grace_period_secs must be a finite number of seconds, got inf (for "
                             "a wait with no practical limit, give a large number, 86400 for a day)")
        if self.save_decision_policy is not None:
            arguments.implements(self.save_decision_policy, save_decision_policies.SaveDecisionPolicy,
                                 "LocalCheckpointOptions.save_decision_policy")
        if self.preservation_policy is not None:
            arguments.implements(self.preservation_policy, preservation_policies.PreservationPolicy,
                                 "LocalCheckpointOptions.preservation_policy")


class TieredCheckpointMetadata(CheckpointMetadata):
    """A step of a two-tier Checkpointer: its metadata (from the copy ``load`` reads first) and
    ``locations``, the step's directory on each tier that holds it (``"local"``, ``"durable"``).

    Example::

        for info in ckptr.checkpoints:
            print(info.step, sorted(info.locations))     # e.g. 1000 ['durable', 'local']
    """

    def __init__(self, info: CheckpointMetadata, locations: dict[str, storage.Location]):
        super().__init__(info.step, info.path, metadata=info.metadata, metrics=info.metrics,
                         init_timestamp_nsecs=info.init_timestamp_nsecs,
                         commit_timestamp_nsecs=info.commit_timestamp_nsecs, custom_metadata=info.custom_metadata)
        self.locations = locations

    def __repr__(self) -> str:
        return f"TieredCheckpointMetadata(step={self.step}, locations={sorted(self.locations)})"


def merge(local: Sequence[CheckpointMetadata], durable: Sequence[CheckpointMetadata]) -> list[TieredCheckpointMetadata]:
    """The steps of both tiers, ascending; a step in both is described by its local copy, unless its durable copy
    was committed later (saved again there by another writer since this machine saved it), as listed (a listing of
    ``lightweight_initialize`` has no times: local)."""
    by_step: dict[int, dict[str, CheckpointMetadata]] = {}
    for tier, infos in ((LOCAL, local), (DURABLE, durable)):
        for info in infos:
            by_step.setdefault(info.step, {})[tier] = info
    return [TieredCheckpointMetadata(where[_described_by(where)], {t: i.path for t, i in where.items()})
            for step, where in sorted(by_step.items())]


def _described_by(copies: dict[str, CheckpointMetadata]) -> str:
    """The tier whose copy describes a step (see :func:`merge`), from the listed commit times only (no manifest read)."""
    if LOCAL not in copies:
        return DURABLE
    durable = copies.get(DURABLE)
    later = durable is not None and _later(durable.commit_timestamp_nsecs, copies[LOCAL].commit_timestamp_nsecs)
    return DURABLE if later else LOCAL


def _read_order(info: TieredCheckpointMetadata) -> tuple[str, str]:
    """The tiers to read ``info``'s step from, in order: its local copy first, unless its durable copy was committed
    later (see :func:`merge`); where the listing has no times (``lightweight_initialize``) both manifests' are read."""
    if info.commit_timestamp_nsecs is None and len(info.locations) == 2:
        durable_first = _saved_after(*(CheckpointMetadata(info.step, info.locations[t]) for t in (DURABLE, LOCAL)))
    else:
        durable_first = info.path == info.locations.get(DURABLE)
    return (DURABLE, LOCAL) if durable_first else (LOCAL, DURABLE)


@dataclasses.dataclass(frozen=True)
class DurableRoot:
    """What a promotion needs of the durable tier's Checkpointer."""

    directory: storage.Location  # its root
    step_dir: Callable[[int], storage.Location]  # where a step goes
    checkpoints: Callable[[], Sequence[CheckpointMetadata]]  # its committed steps, ascending
    save_policy: save_decision_policies.SaveDecisionPolicy  # its save decision policy
    writer: background.BackgroundWriter  # the durable tier's writer: promotions run there, one at a time
    take: Callable[[], None]  # becomes the root's writer (its lock, the first sweep)
    committed: Callable[[int, storage.Location, dict], None]  # lists a committed step, collects garbage
    processes: distributed.Processes
    operation: Callable[[str], str]  # a barrier name, the same on every process
    timeout_secs: Callable[[], float]  # AsyncOptions.timeout_secs of the call (the active Context's, else its own)
    begun: Callable[[], set[int]]  # the steps its listings showed begun in place and never committed (object stores)
    forget_if_gone: Callable[[CheckpointMetadata], bool]  # unlists a step a failed overwrite deleted; whether it may be gone
    queue: Callable[[CheckpointMetadata], None]  # in a job: lists a step whose promotion is queued (see Checkpointer)
    unqueue: Callable[[int], None]  # unlists a step queued so, whose promotion failed


@dataclasses.dataclass(eq=False)
class _Promotion:
    """A promotion handed to the durable tier's writer. A ``replaceable`` one not started yet is
    ``skipped`` when a newer promotion is queued (see :meth:`LocalTier._enqueue`)."""

    step: int
    replaceable: bool
    skipped: bool = False


@dataclasses.dataclass
class _KeepPromoting:
    """The local preservation policy, plus: keep the steps whose promotion has not finished."""

    policy: preservation_policies.PreservationPolicy
    promoting: set[int]

    def should_preserve(self, checkpoints, *, context):
        keep = self.policy.should_preserve(checkpoints, context=context)
        return [kept or info.step in self.promoting for kept, info in zip(keep, checkpoints)]


def process_directory(directory: Path, index: int) -> Path:
    """The local tier of process ``index`` of a multi-process job whose local directory is ``directory``."""
    return directory / f"{_PROCESS}{index}"


def process_directories(directory: Path) -> list[Path]:
    """The local tiers of a multi-process job's processes in its local directory ``directory``, in process order."""
    found = [p for p in directory.iterdir() if p.name.startswith(_PROCESS) and p.name[len(_PROCESS):].isdecimal()
             and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[len(_PROCESS):]))


_PROCESS = "process_"


def local_directory(directory: str | os.PathLike) -> Path:
    """The local tier's directory as an absolute path.

    Raises:
      ValueError: an object store URL (the durable tier is the Checkpointer's own directory), or a path
        :func:`ckpt.storage.location` refuses.
    """
    if storage.is_url(directory):
        raise ValueError(f"the local tier must be a local directory, got {directory!r} (the durable tier "
                         "is the Checkpointer's own directory)")
    return storage.location(directory)


def check_apart(directory: Path, durable: storage.Location, name_format: Any = None) -> None:
    """Refuses a local tier's directory that is the durable root itself (each step would be in both tiers), or,
    given the tiers' step ``name_format``, one of the two directories that lies in the other at the name of a
    step (whose save would find the other tier in its way).

    Raises:
      ValueError: ``directory`` is ``durable``, or lies in it at a step's name, or the other way round (named as
        they were given).
    """
    if not isinstance(durable, Path):
        return
    local, root = Path(os.path.realpath(directory)), Path(os.path.realpath(durable))
    if local == root:
        raise ValueError(f"the local tier's directory is the root itself ({durable}): give it a directory of its own "
                         "(on a local disk), or leave local out")
    parse = getattr(name_format, "parse_name", None)
    for inner, outer in ((local, root), (root, local)):
        name = inner.relative_to(outer).parts[0] if parse is not None and inner.is_relative_to(outer) else None
        step = None if name is None else parse(name)
        if step is not None and not formats.has_step_files(outer / name):  # (a step there: check_outside_steps's)
            raise ValueError(f"the local tier's directory {directory} and the root {durable} lie one in the other at "
                             f"{outer / name}, the name of step {step}: give the local tier a directory apart "
                             "(on a local disk)")


def check_owner(directory: Path, durable: str) -> None:
    """Refuses a local directory that holds the local tier of another durable root than ``durable`` (a run
    before, on the same machine), whose steps are not this run's, or a root of its own (a Checkpointer's, or
    Orbax's: root metadata that names no durable root), whose steps the local tier's preservation policy would
    delete. The first Checkpointer of a local directory records its durable root there (``ckpt-root.json``); a
    local tier written before ckpt recorded it (no root metadata at all) is taken as any root's, and one local
    path of the recorded directory (through a link) as its own.

    Raises:
      ValueError: ``directory`` belongs to another durable root (both named), or is a root of its own (Orbax's
        without root metadata too: it holds Orbax's steps).
      CheckpointCorruptedError: its ``ckpt-root.json`` is damaged.
    """
    if not formats.has_root_metadata(directory):
        orbax_step = next((path for path in _subdirectories(directory) if formats.is_orbax(path)), None)
        if orbax_step is not None:
            raise ValueError(f"{directory} is a checkpoint root of Orbax's, not a local tier (it holds Orbax's step "
                             f"{orbax_step.name}, which a promotion cannot copy): its steps are another run's (which "
                             "the local tier's preservation policy would delete)")
        return
    owner = formats.root_custom_metadata(directory)
    owner = owner.get(_DURABLE_ROOT) if isinstance(owner, dict) else None
    if owner is None:
        raise ValueError(f"{directory} is a checkpoint root of its own, not a local tier (its root metadata names no "
                         "durable root, as a local tier's does): its steps are another run's (which the local tier's "
                         "preservation policy would delete)")
    if not _same_root(owner, durable):
        raise ValueError(f"{directory} holds the local tier of the durable root {owner}, not of {durable}: its "
                         "steps are another run's")


def _subdirectories(directory: Path) -> list[Path]:
    """The directories in ``directory`` (none where it is missing: a new machine's)."""
    try:
        with os.scandir(directory) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _same_root(recorded: Any, durable: str) -> bool:
    """Whether the durable root a local tier recorded is ``durable``: the same name, or two local paths of one
    directory (a symbolic link's and its target's)."""
    if recorded == durable:
        return True
    return (isinstance(recorded, str) and "\0" not in recorded and not storage.is_url(recorded)
            and not storage.is_url(durable) and os.path.realpath(recorded) == os.path.realpath(durable))


class LocalTier:
    """The local tier of a Checkpointer and the promotion of its steps to the durable tier."""

    def __init__(self, options: LocalCheckpointOptions, durable: DurableRoot, checkpointer: Callable[..., Any],
                 save: Callable[..., background.AsyncResponse[bool] | None], collect_garbage: Callable[[Any], None],
                 decide: Callable[..., bool], take: Callable[[Any], None], *, context: Context, step_name_format: Any,
                 lightweight_initialize: bool, cleanup_tmp_directories: bool):
        self._options = options
        self._save = save  # a Checkpointer's save: (checkpointer, step, checkpointables, ..., marks=...) -> response
        self._collect_garbage = collect_garbage  # applies a Checkpointer's preservation policy now
        self._take = take  # makes a Checkpointer its root's writer (its lock; the first time, its sweep)
        self._decide = decide  # a Checkpointer's save decision: (checkpointer, step, replacing=...) -> bool
        self._durable = durable
        self._promoting: set[int] = set()
        self._waiting: _Promotion | None = None  # the replaceable promotion not started yet (at most one)
        self._lock = threading.Lock()
        self._recovered = durable.processes.count > 1  # (see _recover)
        self._again: set[int] = set()  # steps whose overwrite's promotion failed once their durable copy was gone
        # (step, monotonic time, promotion) of a preemption's promotion, which wait() waits for until then
        self._deadline: tuple[int, float, background.AsyncResponse[bool]] | None = None
        self._decided: tuple[int, bool] | None = None  # (step, durable decision) of the last decision
        self._saving: tuple[int, background.AsyncResponse[bool]] | None = None  # (step, response): last local save
        self._context = context
        self._layout: Any = None  # the last plan's layout (see _agree), which the next one reuses
        # in a job: where an async save that stays local meets the other processes once written (see _settled)
        self._settling = background.BackgroundWriter("ckpt-local-settle") if durable.processes.count > 1 else None
        directory = local_directory(options.directory)
        if durable.processes.count > 1:
            directory = process_directory(directory, durable.processes.index)
        self._check_owner(directory, str(durable.directory))
        # A process of its own (read when it is made), with the Checkpointer's very Context afterwards: a
        # Context copies the groups it starts from, and a change of the Checkpointer's options must reach it.
        with Context(context, multiprocessing_options=MultiprocessingOptions(processes=distributed.OwnPart())):
            self.checkpointer = checkpointer(
                directory, context=context, save_decision_policy=options.save_decision_policy,
                preservation_policy=_KeepPromoting(options.preservation_policy or preservation_policies.LatestN(2),
                                                   self._promoting),
                step_name_format=step_name_format, lightweight_initialize=lightweight_initialize,
                cleanup_tmp_directories=cleanup_tmp_directories,
                custom_metadata={_DURABLE_ROOT: str(durable.directory)})

    @staticmethod
    def _check_owner(directory: Path, durable: str) -> None:
        """:func:`check_owner` of the local directory (its steps would be restored as this run's), before its
        Checkpointer is made.

        Raises:
          ValueError: the local directory belongs to another durable root, or is a root of its own (nothing was
            written).
        """
        try:
            check_owner(directory, durable)
        except ValueError as e:
            raise ValueError(f"LocalCheckpointOptions directory {e}, and would be restored as this one's. Use another "
                             "local directory (or delete that one if the run it belongs to is over).") from None

    # ----------------------------------------------------------------------------- listing
    def merged(self, durable: Sequence[CheckpointMetadata]) -> list[TieredCheckpointMetadata]:
        """Both tiers' steps; with several processes only the durable ones (each process's local tier
        differs, and loads read the durable tier), with their local copies named."""
        local = self.checkpointer.checkpoints
        if self._durable.processes.count > 1:
            steps = {info.step for info in durable}
            local = [info for info in local if info.step in steps]
        return merge(local, durable)

    # ---------------------------------------------------------------------------- deciding
    def decide(self, step: int, *, durable: bool, reached: bool, preempted: bool, replacing: bool = False) -> bool:
        """Whether either tier saves ``step``, given the durable tier's decision (remembered for the save) and
        whether it saw a preemption (``reached``: the local tier's policy sees the same, as its processes agreed
        on it, not this process's own signals); a preemption saves the step locally whatever the local policy
        says. With one process, the durable tier's yes to a step at or below the newest local step (committed,
        or being written by the local save in flight) is a no unless ``replacing`` (an overwrite): that step is
        below the latest, as the durable tier alone cannot tell. (With several processes the latest is the
        durable tier's, which each process's local tier does not change.)"""
        newest = self._newest() if self._durable.processes.count == 1 and not replacing else None
        if newest is not None and step <= newest:
            durable = False
        self._decided = (step, durable)
        return self._decide(self.checkpointer, step, replacing=replacing, reached=reached) or durable or preempted

    def held(self, step: int) -> CheckpointMetadata | None:
        """The local tier's committed copy of ``step``, if any."""
        return next((c for c in self.checkpointer.checkpoints if c.step == step), None)

    def drop_leftovers(self) -> None:
        """With several processes, once the durable tier is listed: deletes the local steps newer than its latest,
        which a job stopped before promoting them left (loads read the durable tier only: the job resumes below
        them). Kept, each process would decide alone that a step it saves again is below its own latest, and a
        promotion would copy the old run's copy of a step into the new run's durable step."""
        durable = self._durable.checkpoints()
        latest = durable[-1].step if durable else -1
        for info in [c for c in self.checkpointer.checkpoints if c.step > latest]:
            logger.warning("ckpt: deleting step %d of the local tier %s, newer than the durable tier's latest (%s): a "
                           "multi-process job resumes from the durable tier, and saves that step again", info.step,
                           self.checkpointer.directory, latest if durable else "none")
            self.checkpointer.delete(info.step)

    def _newest(self) -> int | None:
        """The newest step of the local tier: committed, or being written by its save in flight."""
        latest = self.checkpointer.latest
        steps = [] if latest is None else [latest.step]
        if self._saving is not None and not self._saving[1].done():
            steps.append(self._saving[0])
        return max(steps, default=None)

    # ------------------------------------------------------------------------------ saving
    def save(self, step: int, checkpointables: dict[str, Any], *, force: bool, overwrite: bool, blocking: bool,
             preempted: bool, metrics: Any, custom_metadata: Any) -> background.AsyncResponse[bool]:
        """Saves ``step`` locally and promotes it when the durable tier wants it (``force``: both tiers; an
        ``overwrite`` of a step the durable tier holds, or held until an earlier overwrite's promotion failed (its local
        copy marked pending): both, never replaced by a newer promotion).
        Called after a positive decision of either tier (or with ``force``). ``preempted``: ``step`` is the
        step at which the preemption was seen (only that one; later steps follow the policies). A promotion
        that failed since the last save, ``wait`` or ``close`` (in a job, or a local save that failed on any process)
        is raised first, before anything is written, as a failed save is (in a job on every process, where they meet:
        see :meth:`_agree`). The durable tier is not asked here about a promotion the policies chose (an
        object store out of reach for a while must not stop the local saves); one asked for (``force``,
        ``overwrite``) is refused here, before anything is written, where the durable root cannot take it. A step
        to promote is saved only once this process is the durable root's writer (:meth:`_take_durable`). An
        ``overwrite`` of a step whose promotion is queued or running waits for the promotions first.
        """
        if self._durable.processes.count == 1:  # (in a job: see _agree)
            self._durable.writer.raise_failure()
        if not self._recovered:
            self._recover(None if overwrite else step)
        self._promote_failed_again()
        if overwrite and step in self._promoting:  # its promotion would copy the local step while it is replaced
            self._durable.writer.wait(self._durable.timeout_secs())
        if self._durable.processes.count > 1:
            self._agree(step, checkpointables, metrics, custom_metadata)
        # an overwrite replaces the durable copy too: left there, it would be restored once the local copy is gone;
        # or the copy an earlier overwrite's promotion removed and never replaced (the local copy it marked pending)
        replaces_durable = overwrite and (any(c.step == step for c in self._durable.checkpoints())
                                          or self._marked_pending(step))
        promote = force or preempted or replaces_durable or self._decided == (step, True)
        owed = force or preempted or replaces_durable  # (a promotion no newer one replaces)
        # (marked pending as it is committed locally: a crash before its promotion runs, queued behind another, leaves
        # the mark for the next writer, which promotes it again)
        marks = (fmt.PROMOTING,) if owed and self._durable.processes.count == 1 else ()
        if promote:  # kept locally until copied
            self._take_durable()
            if force or overwrite:  # asked for: refused before anything is written (the promotion checks again)
                final = self._durable.step_dir(step)
                root.check_target(final, storage.temporary_for(final), step=step, overwrite=overwrite)
            with self._lock:
                self._promoting.add(step)
        held = None if overwrite else self.held(step)
        try:
            if held is None:
                local = self._save(self.checkpointer, step, checkpointables, force=True, overwrite=overwrite,
                                   metrics=metrics, custom_metadata=custom_metadata, blocking=blocking, marks=marks)
            else:  # a forced save of a step the local tier holds: promote that copy
                if marks:
                    _mark_pending(held.path, step)
                local = background.finished(True)
        except Exception as e:
            if self._durable.processes.count == 1:
                self._finished(step)
                raise
            local = background.failed(e)  # (raised where the processes meet: see _promote, _settled)
        if held is None:
            self._saving = (step, local)
        if not promote:
            return local if self._durable.processes.count == 1 else self._settled(step, local, blocking)
        if self._durable.processes.count > 1:  # (before it is queued: the promotion's commit unlists it there)
            self._durable.queue(CheckpointMetadata(step, self._durable.step_dir(step), metrics=metrics,
                                                   custom_metadata=custom_metadata))
        response = self._submit(step, local, preempted=preempted, overwrite=overwrite,
                                replaceable=not owed and self._durable.processes.count == 1)
        if blocking:
            return background.finished(response.result())
        return response

    def _settled(self, step: int, local: background.AsyncResponse[bool], blocking: bool) -> background.AsyncResponse[bool]:
        """In a job, a save of ``step`` that stays on the local tiers, once every process's local save (``local``
        here) has ended: a failure in one (its local disk full) raises on every process, where they meet (its own
        error where it failed, a RuntimeError naming it elsewhere), as a plain save's does, rather than on that one
        alone while the others go on. A blocking save meets them at once; an async one on a writer of its own (not
        behind the promotions: a process stopped would make each waiting save wait for it until the timeout), whose
        failure its ``result()``, ``wait``, ``close`` or the next save (where the processes meet) raises; it waits for
        the local save without hurrying it (an async save is written in the background at its own pace). A failure
        elsewhere discards the step's local copy on each process that committed it (:meth:`_discard`), so that saving
        the step again just works."""
        barrier, task = self._durable.operation(f"save/{step}/local"), f"the save of step {step} to the local tiers"

        def settled() -> bool:
            try:
                distributed.settle(self._durable.processes, barrier, lambda: _saved(local, hurry=False),
                                   self._durable.timeout_secs(), task, commits=False)
            except Exception:
                if local.exception(hurry=False) is None:  # (where it failed, it committed nothing)
                    self._discard(step)
                raise
            return True

        if blocking:
            return background.finished(settled())
        in_call = contextvars.copy_context()  # (the options of the save: its timeout, in the writer's thread)
        return self._settling.submit(lambda: in_call.run(settled), what=task)

    def _discard(self, step: int) -> None:
        """Deletes this process's local copy of ``step``, a save that stays on the local tiers and failed on some
        process (see :meth:`_settled`): the processes that committed theirs would refuse a retry of the save (the step
        exists there) while the others save it anew. Such a step is on no durable tier (a multi-process job loads the
        durable tier only): nothing loadable is lost. A deletion that fails is logged (a retry then needs
        ``overwrite=True``)."""
        try:
            if self.checkpointer.delete(step, missing_ok=True):
                logger.warning("ckpt: step %d of the local tier %s deleted: its save failed on another process",
                               step, self.checkpointer.directory)
        except Exception as e:
            logger.warning("ckpt: step %d of the local tier %s, whose save failed on another process, could not be "
                           "deleted (%s): saving it again needs overwrite=True", step, self.checkpointer.directory, e)

    def _agree(self, step: int, checkpointables: dict[str, Any], metrics: Any, custom_metadata: Any) -> None:
        """In a job, before anything is written on either tier, checks that every process saves the same tree to
        ``step``, as a save of several processes does (:func:`ckpt.saving.compare`): each process's local tier saves
        its part alone, and a promotion only copies files, so a tree that differs between processes reached the
        durable step unchecked (process 0's leaves only, or copies of a DTensor on slices of one mesh mixed).

        Raises:
          TreeMismatchError: on every process alike, naming each key path that differs.
          TypeError / ValueError: this process's tree cannot be saved (in the others: a RuntimeError naming it).
          Exception: a promotion or a local save that failed since the last save, here or elsewhere (see
            :meth:`_settled`): this process's error, or in the others a RuntimeError naming it.
        """
        planned = []

        def prepare() -> None:
            # the failure of the last local save (here, or another process's: see _settled) or of a promotion since the
            # last save: raised here, on every process at once (the others would wait here for this one)
            self.checkpointer.wait()
            self._settling.wait(self._durable.timeout_secs())
            self._durable.writer.raise_failure()
            plan, _ = saving.plan_checkpointables(checkpointables, get_context(self._context), metrics=metrics,
                                                  custom_metadata=custom_metadata, previous=self._layout)
            self._layout = plan.layout
            planned.append(plan)

        self._meet(step, prepare)
        saving.compare(planned[0], self._durable.step_dir(step), self._durable.processes,
                       self._durable.operation("save/checked"), self._durable.timeout_secs())

    def _meet(self, step: int, part: Callable[[], None]) -> None:
        """Runs ``part``, this process's planning of its save of ``step`` in a job (or its refusal), then meets the
        other processes where each says whether its part failed (:func:`ckpt.distributed.settle`)."""
        distributed.settle(self._durable.processes, self._durable.operation("save/planned"), part,
                           self._durable.timeout_secs(), f"the save of {self._durable.step_dir(step)}")

    def _recover(self, saving: int | None) -> None:
        """Promotes the step a crash left unpromoted: the newest committed local step, newer than the durable
        tier's latest, that the durable policy chose; its promotion was interrupted or never began. Older ones are
        useless once it is durable. Where what the policy chose cannot be asked
        again (see :func:`ckpt.training.save_decision_policies.decides_by_step_numbers`), the newest local step
        newer than the durable latest. Also promotes again each step whose local copy was saved again
        (``overwrite=True``) after its durable copy was made (a later commit time: a promotion copies the
        manifest, times included), whose promotion a crash cut short: its durable copy holds the values the
        overwrite replaced. On an object store, where a promotion writes in place and so deletes the durable copy
        it replaces first, such a step has no durable copy left but what the promotion began at its name: each
        local step committed after every durable step (saved again, or with ``force=True``, after them) whose
        promotion a crash cut short so is promoted again, and so is each local step a promotion owed to the durable
        tier (an overwrite's, a forced or preemption save's) marked pending (:func:`_replaces_in_place`) and never
        committed, whatever its age: it failed at every try while
        later steps were promoted, or a crash cut it short (one the durable tier holds, as it was or newer, is marked
        no more: a crash came between its promotion's commit and the clearing). ``saving``: the step of the first save
        when it is no overwrite, left to that save (a forced save of a step the local tier holds promotes that copy
        itself); the step of an overwrite is promoted here too where it is one of these, and the overwrite waits for
        that promotion (the step is durable as it was saved last, whether the save then succeeds, is refused or
        fails). Called once, at this writer's first save: it then becomes the durable root's writer, and sweeps the
        interrupted promotion's leftovers (a Checkpointer that only reads writes nothing). Not with several processes,
        whose local tiers would have to hold the same step."""
        durable, newer, stale, cut_short, pending = self._unpromoted(saving)
        copies = {c.step for c in durable}
        for c in self.checkpointer.checkpoints:  # durable since it was marked (a crash cut short the clearing of its
            if c.step != saving and c.step in copies and c.step not in stale and _promotion_pending(c.path):  # mark)
                _promoted(c.path)
        if newer or stale or cut_short or pending:
            self._take_durable()  # (raised before anything is written; asked again at the next save)
        self._recovered = True
        for step in stale:
            self._promote_recovered(step, True, "ckpt: step %d was saved again on the local tier (overwrite=True) "
                                    "after its durable copy was made, and a crash left that copy as it was")
        for step in cut_short:
            self._promote_recovered(step, True, "ckpt: step %d, saved on the local tier after every step of the durable "
                                    "tier (with overwrite=True or force=True), is on the local tier only: a crash cut "
                                    "its promotion short (on an object store, after it had deleted the durable copy it "
                                    "replaced)")
        for step in pending:
            self._promote_recovered(step, True, "ckpt: step %d is on the local tier only: its promotion (of a forced or "
                                    "preemption save, or one that replaced its durable copy) never committed (it "
                                    "failed, or a crash cut it short)")
        if newer and newer[-1].step not in pending:
            self._promote_recovered(newer[-1].step, False, "ckpt: step %d, newer than the durable tier's latest (%s), is "
                                    "on the local tier only: a crash left it unpromoted",
                                    durable[-1].step if durable else "none")

    def _promote_recovered(self, step: int, overwrite: bool, why: str, *args: Any) -> None:
        """:meth:`_promote_again` of a step :meth:`_recover` found unpromoted, logging ``why % (step, *args)``, unless
        the durable root holds at its name what ckpt never replaces (a damaged step, an entry ckpt did not write):
        then the step stays on the local tier, and the warning names the entry and what to do, rather than a
        promotion failing the run's next save or ``wait()`` at every restart."""
        final = self._durable.step_dir(step)
        try:
            root.check_target(final, storage.temporary_for(final), step=step, overwrite=overwrite)
        except errors.ForeignEntryError as e:
            logger.warning(why + ", and is not promoted: %s Its local copy stays as the local policy keeps it; once "
                           "that entry is gone, the next writer promotes the step if the durable tier is still owed "
                           "it.", step, *args, e)
            return
        logger.warning(why + ". Promoting it now", step, *args)
        self._promote_again(step, overwrite=overwrite)

    def _unpromoted(self, saving: int | None) -> tuple[list[CheckpointMetadata], list[CheckpointMetadata], list[int],
                                                        list[int], list[int]]:
        """What :meth:`_recover` promotes again, leaving out ``saving``: the durable steps; the local steps newer than
        the durable latest that the durable policy chose; the steps stale, cut short, and marked pending."""
        durable = self._durable.checkpoints()
        latest = durable[-1].step if durable else -1
        local = [c for c in self.checkpointer.checkpoints if c.step != saving]
        newer = [c for c in local if c.step > latest]
        policy = self._durable.save_policy
        if save_decision_policies.decides_by_step_numbers(policy):
            context = save_decision_policies.DecisionContext()
            newer = [c for c in newer if policy.should_save(c, durable, context=context)]
        copies = {c.step: c for c in durable}
        stale = [c.step for c in local if c.step in copies and _saved_after(c, copies[c.step])]
        pending = [c.step for c in local if c.step not in copies and _promotion_pending(c.path)]
        chosen = {c.step for c in newer}  # (the newest of them is promoted below)
        begun = [c for c in local if c.step in self._durable.begun() and c.step not in copies and c.step not in chosen
                 and c.step not in pending]
        last = max(durable, key=lambda c: _committed(c) or 0, default=None) if begun else None
        cut_short = [c.step for c in begun if last is None or _saved_after(c, last)]
        return durable, newer, stale, cut_short, pending

    def before_sweep(self) -> None:
        """Marks pending (:func:`_mark_pending`) each local step whose promotion a crash cut short (see
        :meth:`_recover`) before the durable root's first sweep (when this writer takes the root: at open with
        ``cleanup_tmp_directories``, at a deletion, or at its first save) removes what was begun at its name, which
        alone shows it: a writer after this one (killed before, or closed without a save) promotes it again."""
        if self._recovered:
            return
        cut_short = set(self._unpromoted(None)[3])
        for info in self.checkpointer.checkpoints:
            if info.step in cut_short:
                try:
                    _mark_pending(info.path, info.step)
                except errors.StepNotFoundError:  # (a link or a file at its name since it was listed: no step to promote)
                    pass

    def _marked_pending(self, step: int) -> bool:
        """Whether the local copy of ``step`` is marked as the source of an overwrite's promotion that never committed
        (see :meth:`_replaces_in_place`): the durable copy it replaced is gone, and the durable tier is owed the step."""
        held = self.held(step)
        return held is not None and _promotion_pending(held.path)

    def _left_local_only(self, step: int, final: storage.Location) -> bool:
        """Whether the failed overwrite's promotion of ``step`` to ``final`` left the step on the local tier alone,
        with one process: on an object store, where a promotion writes in place, it deleted the durable copy it
        replaced (still listed: unlisted now), or an earlier failure had; or may have, when the store does not tell."""
        if not self._replaces_in_place(final) or self.held(step) is None:
            return False
        replaced = next((c for c in self._durable.checkpoints() if c.step == step), None)
        if replaced is not None:
            return self._durable.forget_if_gone(replaced)
        try:
            return not storage.exists(final / fmt.MANIFEST)
        except OSError:  # (the promotion's own error is the one raised)
            return True

    def _replaces_in_place(self, final: storage.Location) -> bool:
        """Whether an overwrite's promotion to ``final`` removes the durable copy it replaces before it writes the
        new one (an object store, which has no rename), with one process. Such a promotion, as every one no newer
        promotion replaces (forced and preemption saves), has its local step marked pending
        (:data:`ckpt.format.PROMOTING`: committed with the local step by :meth:`save`, or as the promotion of a step
        :meth:`_recover` found begins) until it commits, so that a writer after this one promotes the step again however
        old it is (see :meth:`_recover`)."""
        return not isinstance(final, Path) and self._durable.processes.count == 1

    def delete(self, step: int) -> bool:
        """Deletes the local copy of ``step`` (see :meth:`ckpt.Checkpointer.delete`), and the promotion a failure left
        for the next save to queue again (:meth:`_promote_failed_again`): the user deleted the step. Whether it held one."""
        held = self.checkpointer.delete(step, missing_ok=True)  # (a failure forgets nothing: the step is kept)
        with self._lock:
            if step in self._again:
                self._again.discard(step)
                self._promoting.discard(step)
        return held

    def _promote_failed_again(self) -> None:
        """Queues again the promotion of each step whose overwrite's promotion failed once it had deleted the
        durable copy it replaced (on an object store, which has no rename), its local copy kept meanwhile: a run
        that goes on after the failure would otherwise lose the step from both tiers once the local policy drops
        it (a later writer promotes it again too, see :meth:`_recover`)."""
        with self._lock:
            again, self._again = sorted(self._again), set()
        if again:
            self._take_durable()
        for step in again:
            self._promote_again(step, overwrite=True)

    def _promote_again(self, step: int, *, overwrite: bool) -> None:
        """Queues the promotion of a committed local step that a crash left unpromoted (see :meth:`_recover`); one
        that replaces a durable copy (``overwrite``) is never replaced by a newer promotion."""
        with self._lock:
            self._promoting.add(step)
        self._submit(step, background.finished(True), preempted=False, overwrite=overwrite, replaceable=not overwrite)

    def _submit(self, step: int, local: background.AsyncResponse[bool], *, preempted: bool, overwrite: bool,
                replaceable: bool) -> background.AsyncResponse[bool]:
        """Queues the promotion of ``step``, which runs once ``local`` (its local save) is committed; the
        caller has taken the durable root (:meth:`_take_durable`) and added ``step`` to the steps kept locally
        until promoted."""
        barrier = self._promotion_barrier(step)  # named here: every process counts its calls alike
        promotion = self._enqueue(step, replaceable=replaceable)
        in_call = contextvars.copy_context()  # (the options of the save: its timeout, in the writer's thread)
        response = self._durable.writer.submit(
            lambda: in_call.run(self._promote, promotion, local, preempted, barrier, overwrite),
            what=f"the promotion of step {step} to the durable tier {self._durable.directory}")
        if preempted:
            self._deadline = (step, time.monotonic() + self._options.grace_period_secs, response)
        return response

    def _promotion_barrier(self, step: int) -> str:
        """The name of the next promotion's barriers, the same on every process (see :func:`_copy_step`)."""
        return self._durable.operation(f"promote/{step}")

    def refuse(self, step: int, error: BaseException) -> None:
        """Raises ``error``, this process's refusal of its part of a save of ``step`` that the other processes make and
        promote (in a job: this process's ``force`` is not the primary's, or it does not overwrite the step, which the
        others replace on both tiers), once it met the other processes where their saves' check does (:meth:`_agree`),
        so that the save fails there at once on every process, naming this process and ``error``, before anything is
        written on either tier, rather than wait for it until the timeout."""
        def refused() -> None:
            raise error

        self._meet(step, refused)

    def _take_durable(self) -> None:
        """Becomes the durable root's writer (its lock; the first time, its sweep) before a step to promote is
        saved locally: a durable root this process cannot write (read-only, another writer's) raises before
        anything is written, not after the local save, which would leave the step kept locally for a
        promotion that never runs.

        The local directory is taken first: a second job on it (the same job started twice on one machine) is
        refused before it sweeps the durable root, which on an object store has no lock to refuse it.

        Raises:
          DirectoryLockedError: another writer holds the local directory or the durable root.
          RootDirectoryError: this process may not write there.
        """
        if self._durable.processes.index == 0:
            self.take_local()
            self._durable.take()

    def take_local(self) -> None:
        """Becomes the local directory's writer (its lock; the first time, its sweep), before this process writes to
        or deletes from the durable root: a second job on the local directory is refused before it touches either.

        Raises:
          DirectoryLockedError: another writer holds the local directory.
        """
        self._take(self.checkpointer)

    def _enqueue(self, step: int, *, replaceable: bool) -> _Promotion:
        """A promotion of ``step``, to queue behind the one running: it replaces the replaceable promotion still
        waiting, if any, whose step becomes an ordinary local step (under the local policy), so that saves
        chosen faster than uploads end neither queue without bound nor keep every step locally. Forced and
        preemption saves are not ``replaceable`` (nor, with several processes, any: each would have to
        replace the same one)."""
        promotion = _Promotion(step, replaceable)
        with self._lock:
            replaced, self._waiting = self._waiting, promotion if replaceable else None
            if replaced is not None:
                replaced.skipped = True
                if replaced.step != step:
                    self._promoting.discard(replaced.step)
        if replaced is not None:
            logger.info("ckpt: step %d is not promoted to the durable tier: step %d, newer, replaced it while it "
                        "waited for the promotion in flight; it stays on the local tier as its policy says",
                        replaced.step, step)
        return promotion

    def _promote(self, promotion: _Promotion, local: background.AsyncResponse[bool], preempted: bool, barrier: str,
                 overwrite: bool) -> bool:
        """Copies the committed local step to the durable root and commits it there (a background job),
        replacing a committed step there only with ``overwrite``; nothing when a newer promotion replaced it."""
        with self._lock:
            if self._waiting is promotion:
                self._waiting = None  # running: no longer replaceable
            if promotion.skipped:
                return _saved(local)
        step, final, kept = promotion.step, self._durable.step_dir(promotion.step), False
        try:
            start = time.monotonic()
            source = self._source(step, local, barrier)
            # (one no newer promotion replaces is owed to the durable tier: a crash before its commit leaves it marked;
            # its local save committed the mark already, but for a step _recover found)
            pending = not promotion.replaceable and self._durable.processes.count == 1
            if pending:
                _mark_pending(source, step)
            nbytes = _copy_step(source, final, step, overwrite, self._durable, barrier)
            self._durable.committed(step, final, loading.read_manifest(final))
            if pending or _promotion_pending(source):  # (or an earlier overwrite's, this promotion of a forced save's)
                _promoted(source)
        except BaseException:
            self._durable.unqueue(step)
            kept = overwrite and self._left_local_only(step, final)
            if kept:
                with self._lock:  # (kept locally, see _promote_failed_again)
                    self._again.add(step)
            raise
        finally:
            if not kept:
                self._finished(step)
        # Kept locally for its promotion only: deleted now, not at the next local commit (there may be none).
        self._collect_garbage(self.checkpointer)
        seconds = time.monotonic() - start
        if preempted:
            logger.warning("ckpt: preemption: step %d promoted to the durable tier %s in %.2f s (%s; grace period "
                           "%g s)", step, final, seconds, _megabytes(nbytes), self._options.grace_period_secs)
        else:
            logger.info("ckpt: step %d promoted to the durable tier %s in %.2f s (%s)", step, final, seconds,
                        _megabytes(nbytes))
        return True

    def _source(self, step: int, local: background.AsyncResponse[bool], barrier: str) -> Path:
        """The committed local step to promote, once ``local`` (its local save) succeeded. In a job, every process
        first meets the others where each says whether its local save succeeded: a local save that failed here (this
        host's disk full), or a step gone, fails the promotion on every process at once (the others would wait for this
        one in :func:`_copy_step` until the timeout), and each process that committed its copy discards it
        (:meth:`_discard`), so that saving the step again just works."""
        name = []

        def saved() -> None:
            _saved(local)
            name.append(self._step_name(step))

        if self._durable.processes.count == 1:
            saved()
        else:
            try:
                distributed.settle(self._durable.processes, f"{barrier}/saved", saved, self._durable.timeout_secs(),
                                   f"the promotion of step {step} to {self._durable.step_dir(step)}")
            except Exception:
                if name:  # (where it failed, it committed nothing)
                    self._discard(step)
                raise
        return self.checkpointer.directory / name[0]

    def _step_name(self, step: int) -> str:
        """The name of ``step``'s directory on the local tier.

        Raises:
          StepNotFoundError: the local tier no longer lists the step (removed since it was saved, found gone by a
            load meanwhile): there is nothing to promote.
        """
        held = self.held(step)
        if held is None:
            raise errors.StepNotFoundError(f"step {step} was removed from the local tier {self.checkpointer.directory} "
                                           "before its promotion to the durable tier began: it is not promoted",
                                           step=step, path=self.checkpointer.directory)
        return held.path.name

    def _finished(self, step: int) -> None:
        with self._lock:
            self._promoting.discard(step)

    # ----------------------------------------------------------------------------- loading
    def load(self, candidates: Sequence[TieredCheckpointMetadata],
             read: Callable[[str, int, storage.Location], Any]) -> Any:
        """Reads the first of ``candidates`` (newest first) that loads, local copy before durable one (unless the
        durable one was committed later: :func:`merge`), with ``read(tier, step, path)``, which raises
        StepNotFoundError for a copy deleted meanwhile; a damaged or vanished copy is logged and the next one tried.
        Raises the first failure if none loads."""
        first: BaseException | None = None
        for info in candidates:
            for tier in _read_order(info):
                path = info.locations.get(tier)
                if path is None or (tier == LOCAL and self._durable.processes.count > 1):
                    continue
                try:
                    return read(tier, info.step, path)
                except (errors.CheckpointCorruptedError, errors.InvalidLayoutError, FileNotFoundError) as e:
                    logger.warning("ckpt: step %d on the %s tier cannot be loaded (%s); trying the next copy",
                                   info.step, tier, e)
                    first = first or e
        if first is None:
            raise errors.StepNotFoundError("no checkpoint that this process can read (multi-process jobs read the "
                                           "durable tier only)", step=None, path=None)
        raise first

    # -------------------------------------------------------------------------- life cycle
    def in_progress(self) -> bool:
        return self.checkpointer.is_saving_in_progress() or (self._settling is not None and self._settling.in_progress())

    def wait(self) -> None:
        """Waits for the local save in flight (in a job, for every process's: see _settled), then for the promotions: while a preemption's promotion is
        unfinished, for at most the grace period (logging that the step is on the local tier only when it
        ran out)."""
        self.checkpointer.wait()
        if self._settling is not None:
            self._settling.wait(self._durable.timeout_secs())
        deadline = self._deadline
        if deadline is None or deadline[2].done():
            self._deadline = None
            self._durable.writer.wait(self._durable.timeout_secs())
            return
        try:
            self._durable.writer.wait(max(0.0, deadline[1] - time.monotonic()))
            self._deadline = None
        except TimeoutError:
            logger.warning("ckpt: preemption: step %d is on the local tier only: its promotion did not finish "
                           "within the grace period of %g s", deadline[0], self._options.grace_period_secs)

    def close(self) -> None:
        self.checkpointer.close()
        if self._settling is not None:
            self._settling.shutdown(wait=False)  # (waited for by the Checkpointer's wait, unless that gave up)


def _saved(local: background.AsyncResponse[bool], *, hurry: bool = True) -> bool:
    """Waits for a local save (``hurry``: at full speed from then on); raises its failure, which the local tier's
    writer raises to the caller too (whichever does first: the failure is raised once, see ckpt.background)."""
    failure = local.exception(hurry=hurry)
    if failure is not None:
        raise failure
    return True


def _promotion_pending(step_dir: storage.Location) -> bool:
    """Whether a local step is marked as the source of a promotion owed to the durable tier (forced, or replacing its
    durable copy) that has not committed (see :meth:`LocalTier._replaces_in_place`)."""
    return os.path.lexists(step_dir / fmt.PROMOTING)


def _mark_pending(step_dir: Path, step: int) -> None:
    """Marks a local step as the source of a promotion owed to the durable tier (see
    :meth:`LocalTier._replaces_in_place`) until it commits: a writer after this one promotes it again.

    Raises:
      StepNotFoundError: ``step_dir`` is no directory now (a symbolic link put at its name since it was listed, whose
        target is never written to; see :func:`ckpt.root.check_still_a_step`).
    """
    root.check_still_a_step(step_dir, step)
    storage.write_file(step_dir / fmt.PROMOTING, b"")


def _promoted(step_dir: Path) -> None:
    """Clears the mark of a local step whose promotion committed; a failure is logged (the next writer promotes the
    step once more)."""
    try:
        os.unlink(step_dir / fmt.PROMOTING)
    except OSError as e:
        logger.warning("ckpt: %s was promoted, but its mark as pending could not be removed: %s", step_dir, e)


def _saved_after(one: CheckpointMetadata, other: CheckpointMetadata) -> bool:
    """Whether ``one`` (a copy of a step) was committed after ``other``, their times read from their manifests where
    the listing has none (a time unknown: no)."""
    return _later(_committed(one), _committed(other))


def _later(one: int | None, other: int | None) -> bool:
    """Whether commit time ``one`` is later than ``other`` (a time unknown, None: no)."""
    return None not in (one, other) and one > other


def _committed(info: CheckpointMetadata) -> int | None:
    """A step's commit time: as listed, else read from its manifest now (a listing of ``lightweight_initialize``
    reads none), or None when it cannot be read."""
    return info.commit_timestamp_nsecs if info.commit_timestamp_nsecs is not None else root.commit_time(info.path)


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _copy_step(source: Path, final: storage.Location, step: int, overwrite: bool, durable: DurableRoot,
               barrier: str) -> int:
    """Copies a committed local step directory to ``final`` (byte for byte: its checksums hold) and commits
    it: on an object store the manifest is written last; locally the temporary directory is renamed.
    ``source`` is checked to be still a directory (StepNotFoundError for a link or a file put at its name
    since it was listed: see :func:`ckpt.root.check_still_a_step`), and ``final`` first and at the commit
    as a save's is (see :func:`ckpt.root.commit`). With
    several processes each copies its shards (the primary the rest too, see :func:`_written_by_primary`) and
    the primary commits once every process's copy succeeded (a failure in one fails the promotion in all,
    see :func:`ckpt.distributed.settle`). A promotion that fails before its commit removes its temporary
    directory, as a save does (on an object store, an overwrite's but its marker: the durable copy it replaced
    is gone, and the next writer promotes the step again). A process that stops once the primary committed (the
    others wait for it at the last meeting until the timeout) fails nothing: the step is durable, which the others
    check (:func:`_holds_copy_of`) and log.
    Returns the bytes this process copied."""
    primary, tmp, markers = durable.processes.index == 0, storage.temporary_for(final), []
    task = f"the promotion of {source} to {final}"

    def prepare() -> None:
        root.check_still_a_step(source, step)  # (never copies what a link put at its name since leads to)
        if primary:
            root.check_target(final, tmp, step=step, overwrite=overwrite)

    def make() -> None:
        if primary:  # (only the primary makes the temporary)
            markers.append(storage.make_temporary(tmp))

    try:
        distributed.settle(durable.processes, _prepared(barrier), prepare, durable.timeout_secs(), task)
        # Only once no process refused (LocalTier.refuse): on an object store the temporary is the step's own name,
        # and making it removes the committed step an overwrite replaces.
        distributed.settle(durable.processes, f"{barrier}/made", make, durable.timeout_secs(), task)
        copied = _copy_files(source, final, tmp, step, overwrite, durable, barrier, task)
    except BaseException:
        if markers:  # (an overwrite has removed the durable copy it replaces: see LocalTier._recover)
            storage.remove_failed_temporary(tmp, keep_marker=overwrite)
        raise
    finally:
        if markers:
            storage.release_temporary(markers[0])
    try:
        _barrier(durable, f"{barrier}/committed")
    except Exception as e:  # (a process stopped once the primary had committed: the step is durable all the same)
        if not _holds_copy_of(final, source):
            raise
        logger.warning("ckpt: step %d is durable at %s (its promotion committed), but not every process reached the "
                       "end of the promotion: %s", step, final, e)
    return copied


def _holds_copy_of(final: storage.Location, source: Path) -> bool:
    """Whether the committed step at ``final`` is the promotion of the local step ``source`` (a promotion copies the
    manifest, the commit record, byte for byte); False where either cannot be read."""
    try:
        return loading.read_manifest(final) == loading.read_manifest(source)
    except Exception:
        return False


def _prepared(barrier: str) -> str:
    """The name of the first place where the processes meet in the promotion named ``barrier``: once each process
    checked its part, before anything is copied."""
    return f"{barrier}/prepared"


def _copy_files(source: Path, final: storage.Location, tmp: storage.Location, step: int, overwrite: bool,
                durable: DurableRoot, barrier: str, task: str) -> int:
    primary = durable.processes.index == 0
    files = _files(source)
    if not primary:  # (the primary's copies of them are the step's, as a save's are)
        written_by_primary = _written_by_primary(source)
        files = [path for path in files if not any(path.is_relative_to(d) for d in written_by_primary)]
    skip = {source / fmt.MANIFEST, source / fmt.PROMOTING} | ({source / fmt.TREE} if not primary else set())
    store = ts.KvStore.open(storage.kvstore(tmp), context=storage.ts_context(background=True)).result()
    copied = 0

    def copy_own() -> None:
        nonlocal copied
        if not primary:
            root.check_shared(tmp, durable.processes.index)
        pending: list[tuple[int, Any]] = []
        inflight = 0
        with storage.io_errors(f"promoting {source} to {final}"):
            try:
                for path in files:
                    if path in skip:
                        continue
                    data = _read(path)
                    pending.append((len(data), store.write(path.relative_to(source).as_posix(), data)))
                    inflight += len(data)
                    while inflight > _COPY_INFLIGHT_BYTES:
                        size, write = pending.pop(0)
                        write.result()
                        inflight -= size
                    copied += len(data)
            finally:  # every write ends, even after a failure: none may land once the temporary is removed
                failures = [write.exception() for _, write in pending]
            failure = next(filter(None, failures), None)
            if failure is not None:
                raise failure

    distributed.settle(durable.processes, f"{barrier}/written", copy_own, durable.timeout_secs(), task)
    if primary:
        with storage.io_errors(f"promoting {source} to {final}"):
            manifest = _read(source / fmt.MANIFEST)
            store.write(fmt.MANIFEST, manifest).result()  # the commit record, last
            copied += len(manifest)
            root.commit(tmp, final, step=step, overwrite=overwrite)
    return copied


def _written_by_primary(step_dir: Path) -> list[Path]:
    """The directories of a process's local step that the primary alone writes into a step of several processes
    (see :meth:`ckpt.saving.StepWriter.write_arrays`): the packed small leaves and each large leaf's array not
    spread over processes (it has chunk checksums). Each process's local step holds its own values of them, which
    need not be the primary's (a per-process RNG state): copied by every process, the durable step would mix
    files of several processes, which its checksums (the primary's) do not match."""
    doc = loading.read_tree(step_dir, loading.read_manifest(step_dir))
    arrays = [step_dir / storage.relative_path(more["array"]) for tree in doc["checkpointables"].values()
              for more in tree["leaves"].more if more and "chunk_crc32" in more]
    return [step_dir / fmt.PACKED, *arrays]


def _files(step_dir: Path) -> list[Path]:
    """The files of a local step (:func:`ckpt.storage.regular_files`).

    Raises:
      CheckpointCorruptedError: the step holds a symbolic link (what it leads to lies outside the step), a
        FIFO (a copy would wait on it), a socket or a device, which ckpt never writes: it is not promoted.
    """
    try:
        return storage.regular_files(step_dir)
    except ValueError as e:
        raise errors.CheckpointCorruptedError(f"{e}, which ckpt never writes into a step: the local step "
                                              f"{step_dir} is not promoted", path=step_dir) from None


def _read(path: Path) -> bytes:
    """The bytes of a regular file, never read through a link (ValueError, as a listing found it otherwise)."""
    fd, _ = storage.open_regular(path)
    with open(fd, "rb") as f:
        return f.read()


def _barrier(durable: DurableRoot, name: str) -> None:
    if durable.processes.count > 1:
        durable.processes.barrier(name, durable.timeout_secs())
