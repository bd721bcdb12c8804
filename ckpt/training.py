"""``Checkpointer``: a sequence of steps in one root directory; decides, saves, loads, collects garbage.

Example::

    from ckpt import training
    policies = training.save_decision_policies
    with training.Checkpointer(
        "runs/exp1",
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(1000), policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=training.preservation_policies.LatestN(3),
    ) as ckptr:
        state = init() if ckptr.latest is None else ckptr.load(abstract_state=abstract)
        start = 0 if ckptr.latest is None else ckptr.latest.step + 1
        for step in range(start, num_steps):
            state = train_step(state)
            ckptr.save_async(step, state, metrics={"loss": float(loss)})
            if ckptr.reached_preemption(step):
                break
"""
from __future__ import annotations

import bisect
import collections
import concurrent.futures
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from ckpt import arguments, background, custom, distributed, dtensor, formats, host_memory, loading, orbax, preemption, root, saving
from ckpt import storage, tiers, transfers
from ckpt import errors
from ckpt import format as fmt
from ckpt.context import Context, get_context
from ckpt.metadata import CheckpointMetadata, RootMetadata, now_nsecs
from ckpt.path import step as step_lib
from ckpt.policies import preservation as preservation_policies
from ckpt.policies import save_decision as save_decision_policies

__all__ = ["Checkpointer", "save_decision_policies", "preservation_policies", "errors",
           "CheckpointMetadata", "RootMetadata"]

logger = logging.getLogger("ckpt")
T = TypeVar("T")


def _step_number(step: int | CheckpointMetadata) -> int:
    return fmt.validate_step(step.step if isinstance(step, CheckpointMetadata) else step)


def _in_save_order(checkpoints: list[CheckpointMetadata]) -> list[CheckpointMetadata]:
    """``checkpoints`` (ascending by step) in the order they were saved, Orbax's order for its preservation
    policy: those found on disk, ascending by step, then those committed in this process, by the
    ``monotonic_nsecs`` of their commit."""
    return sorted(checkpoints, key=lambda c: (c.monotonic_nsecs is not None, c.monotonic_nsecs or 0))


class Checkpointer:
    """Manages a sequence of checkpoints in a training loop (the API of Orbax's ``training.Checkpointer``).

    Not thread safe: call it from one thread (the training loop). In a multi-process job every
    process calls the same methods.

    Args:
      directory: the root; created if missing. Each step is a directory below it. ``s3://bucket/path``
        and ``gs://bucket/path`` roots go through tensorstore's kvstore drivers (see ckpt.objectstore).
      context: options (:class:`ckpt.Context`).
      save_decision_policy: when to save; default: the first step, then whenever no save is in
        flight, and on preemption.
      preservation_policy: what to keep; default ``PreserveAll()``. It sees the steps in the order they
        were saved (see ckpt.policies.preservation). The latest step is always kept, and so is the step
        a save just wrote, until the next commit.
      step_name_format: directory names of steps; default ``standard_name_format()`` (``23``); a format
        written to Orbax's protocol (``build_name``, ``find_all``, ``find_step``) or ``composite_name_format`` too.
      custom_metadata: JSON for the whole sequence, written once (a later Checkpointer keeps it).
      cleanup_tmp_directories: remove the temporary directories crashed saves left behind now, at
        construction (a writer also removes them before its first save; they are never listed). In a
        root this process may not write, they are left, with a warning: its steps are listed and loaded.
      lightweight_initialize: do not read each step's manifest when listing (no metrics; a step's ``time`` is
        its directory's modification time), for roots with thousands of steps. A save decision reads the latest
        step's (its time), garbage collection those of the steps it weighs.
      local: a second, local tier (:class:`ckpt.LocalCheckpointOptions`) with policies of its own: every
        save goes there first, and the steps this Checkpointer's policy wants are then copied to
        ``directory`` in the background; ``load`` takes the newest step of either tier (see ckpt.tiers).

    Example::

        keep_two = ckpt.training.preservation_policies.LatestN(2)
        with ckpt.Checkpointer("runs/exp1", preservation_policy=keep_two) as ckptr:
            for step in range(5):
                ckptr.save(step, {"w": np.full(3, step)})
            assert [c.step for c in ckptr.checkpoints] == [3, 4]
            state = ckptr.load()                       # the latest step
    """

    def __init__(self, directory: str | os.PathLike, *, context: Context | None = None,
                 save_decision_policy: save_decision_policies.SaveDecisionPolicy | None = None,
                 preservation_policy: preservation_policies.PreservationPolicy | None = None,
                 step_name_format: step_lib.NameFormat | None = None, custom_metadata: Any = None,
                 cleanup_tmp_directories: bool = False, lightweight_initialize: bool = False,
                 local: tiers.LocalCheckpointOptions | None = None):
        check_options(context=context, save_decision_policy=save_decision_policy,
                      preservation_policy=preservation_policy, step_name_format=step_name_format, local=local)
        if custom_metadata is not None:
            fmt.stored_json(custom_metadata, "custom_metadata")
        self._directory = storage.location(directory)
        self._place = storage.place(self._directory)  # (the same on every process: barrier names hold it)
        self._name_format = step_name_format or step_lib.standard_name_format()
        if local is not None:
            tiers.check_apart(storage.location(local.directory), self._directory, self._name_format)
        self._context = context or Context()
        self._ctx.check()
        self._save_policy = save_decision_policy or save_decision_policies.default_policy()
        self._preservation_policy = preservation_policy or preservation_policies.PreserveAll()
        self._lightweight = lightweight_initialize
        self._writer = background.BackgroundWriter()
        self._staging = saving.StagingBuffers()
        self._loader: concurrent.futures.ThreadPoolExecutor | None = None
        self._reading: collections.Counter[int] = collections.Counter()
        self._infos_lock = threading.Lock()
        self._gc_lock = threading.Lock()
        self._closed = False
        self._warned_behind = False
        self._processes = self._ctx.multiprocessing_options.processes or distributed.current()
        self._operations = 0
        self._opened = distributed.call_number(self._processes, "open")  # (not by root: the roots are compared)
        self._check_one_root()
        self._preempted_at: int | None = None  # the step at which the last preemption was first seen
        self._reached = False  # whether the last decision saw a preemption (a new one begins after one that did not)
        self._decided_once = False  # (whether it listens for a preemption is known from the first decision)
        self._due: int | None = None  # the step the last should_save said yes to, until a save or reload
        self._agreed: tuple[str, list, bool] | None = None  # in a job: the last decision's message, value, and once
        self._asked: tuple[str, list, bool] | None = None  # in a job: should_save's last message, value and answer
        # in a job: the highest step should_save asked since the last save or deletion (at that count of operations)
        self._highest_asked: tuple[int, int] = (0, -1)
        self._unlike: ValueError | None = None  # the last decision's: this process's force is not the primary's
        self._in_flight: CheckpointMetadata | None = None  # the step of the last save handed to the writer
        self._queued: dict[int, CheckpointMetadata] = {}  # in a job: steps queued, listed until committed (see _queue)
        self._deleting: set[int] = set()  # the steps delete_async is deleting (gone for reload too)
        self._deleted: set[int] = set()  # the steps delete_async deleted, until saved again (for a read's error)
        self._deletion: background.AsyncResponse[bool] | None = None  # the last deletion handed to the writer
        self._begun: set[int] = set()  # the steps an object store's listings showed begun in place, never committed
        mode = self._ctx.file_options.path_permission_mode
        root.make(self._directory, mode=mode)
        self._lock = storage.DirectoryLock(self._directory / fmt.LOCK)
        root_file = self._directory / fmt.ROOT_METADATA
        primary = self._processes.index == 0
        if primary and custom_metadata is not None and not formats.has_root_metadata(self._directory):
            with storage.writing_to(self._directory):
                storage.write_file_atomic(root_file, fmt.root_metadata_bytes(custom_metadata))
        self._local: tiers.LocalTier | None = None  # (made below, once this root is listed)
        self._swept = False
        preemption.install()
        if primary:  # (it puts back a step a crash left set aside: before any other process lists the root)
            self.reload()
        self._barrier("init")
        if not primary:
            self.reload()
        if local is not None:  # (a durable root that cannot be listed, no such bucket, leaves the local one untouched)
            self._local = tiers.LocalTier(
                local, tiers.DurableRoot(self._directory,
                                         lambda step: self._directory / step_lib.checked_name(self._name_format, step),
                                         lambda: self._infos, self._save_policy,
                                         self._writer, self._take_directory, self._committed, self._processes,
                                         self._operation, lambda: self._ctx.async_options.timeout_secs,
                                         lambda: self._begun, self._forget_if_gone, self._queue, self._unqueue),
                Checkpointer, Checkpointer._save, Checkpointer._collect_garbage, Checkpointer._decide,
                Checkpointer._take_directory,
                context=self._context, step_name_format=self._name_format, lightweight_initialize=lightweight_initialize,
                cleanup_tmp_directories=cleanup_tmp_directories)
        if cleanup_tmp_directories and primary:
            try:
                self._take_directory()
            except errors.RootDirectoryError as e:  # (only a lack of write permission: the root is listed)
                logger.warning("ckpt: temporary directories left in place: %s", e)
        if self._local is not None and self._processes.count > 1:
            self._local.drop_leftovers()

    def _check_one_root(self) -> None:
        """Raises RootDirectoryError on every process at once when the processes of a multi-process job open
        Checkpointers on different roots (each would wait for the others at every barrier, then time out)."""
        prefix = self._ctx.multiprocessing_options.barrier_sync_key_prefix or ""
        differ = distributed.differences(self._processes, f"{prefix}open/{self._opened}", self._place,
                                         str(self._directory), self._ctx.async_options.timeout_secs)
        if differ:
            roots = "; ".join(f"process {i}: {d}" for i, d in sorted(differ.items()))
            raise errors.RootDirectoryError(
                f"the processes of this job open Checkpointers on different roots ({roots}): every process opens "
                "the same root, one directory that every process sees (for a process's own checkpoints, open its "
                "Checkpointer inside ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions("
                "processes=ckpt.distributed.SingleProcess())))", path=self._directory)

    # ----------------------------------------------------------------------------------- listing
    @property
    def directory(self) -> storage.Location:
        """The root directory where the step directories are.

        Example::

            ckptr.save(0, {"w": np.ones(3)})
            assert ckptr.latest.path == ckptr.directory / "0"
        """
        return self._directory

    @property
    def checkpoints(self) -> Sequence[CheckpointMetadata]:
        """The committed checkpoints, ascending by step (cached; ``reload()`` rescans the directory).

        Example::

            for step, loss in [(0, 0.9), (1, 0.5)]:
                ckptr.save(step, {"w": np.full(3, step)}, metrics={"loss": loss})
            assert [(c.step, c.metrics["loss"]) for c in ckptr.checkpoints] == [(0, 0.9), (1, 0.5)]
        """
        infos = self._listed()
        return infos if self._local is None else self._local.merged(infos)

    @property
    def latest(self) -> CheckpointMetadata | None:
        """The newest committed checkpoint, or None. In a multi-process job, the step of a save (with two tiers, of a
        promotion) queued counts from the moment it is queued, on every process alike (see ``load``).

        Example::

            start = 0 if ckptr.latest is None else ckptr.latest.step + 1   # where a resumed run goes on
            ckptr.save(start, {"w": np.ones(3)})
            assert ckptr.latest.step == start
        """
        if self._local is not None or self._queued:
            listed = self.checkpoints
            return listed[-1] if listed else None
        with self._infos_lock:
            return self._infos[-1] if self._infos else None

    def _listed(self) -> list[CheckpointMetadata]:
        """This root's committed steps and, in a job, those queued (see :meth:`_queue`), ascending by step."""
        with self._infos_lock:
            if not self._queued:
                return list(self._infos)
            listed = {**self._queued, **{c.step: c for c in self._infos}}
        return [listed[step] for step in sorted(listed)]

    def _queue(self, info: CheckpointMetadata) -> None:
        """In a job, lists ``info``, a step whose async save (or, with two tiers, promotion) is queued, from now until
        its commit replaces it, on every process alike: each process's writer thread commits the step at its own
        moment, so that ``latest`` and ``checkpoints`` read at one point of the program differed between processes
        (as Orbax does, the step in flight is listed as soon as its save is queued). A step whose save fails is
        unlisted as it fails (:meth:`_unqueue`), before its error is raised anywhere. Listed with the primary's
        metrics and custom metadata, sent with its decision of this save (:meth:`_primarys`), as the step's manifest
        holds them: each process's own (a loss each rank computed) made ``best_model_path`` or a BestN decision read
        meanwhile differ."""
        if self._processes.count > 1:
            described = self._agreed[1][5]  # (None where the primary sent none: its save raises where they meet)
            if described is not None:
                info = _step_metadata(info.step, info.path, {**described,
                                                             "init_timestamp_nsecs": info.init_timestamp_nsecs,
                                                             "commit_timestamp_nsecs": info.commit_timestamp_nsecs})
            with self._infos_lock:
                self._queued[info.step] = info

    def _unqueue(self, step: int) -> None:
        """Unlists ``step``, queued (see :meth:`_queue`), whose save or promotion failed."""
        with self._infos_lock:
            self._queued.pop(step, None)

    def reload(self) -> None:
        """Rescans the root directory (after another process added or removed steps). A step :meth:`delete_async`
        is still deleting is not listed (Orbax's reload waits for the deletion).

        Example::

            ckpt.save(ckptr.directory / "7", {"w": np.ones(3)})   # a step written by someone else
            ckptr.reload()
            assert ckptr.latest.step == 7
        """
        infos = []
        entries = root.scan(self._directory, self._name_format, read_manifests=not self._lightweight)
        if self._processes.index == 0 and self._put_back_when_free(entries):
            entries = root.scan(self._directory, self._name_format, read_manifests=not self._lightweight)
        self._begun |= root.begun_in_place(entries)
        for entry in entries:
            if entry.kind in root.LISTED and (not infos or infos[-1].step != entry.step):
                infos.append(CheckpointMetadata(entry.step, entry.path) if entry.manifest is None
                             else _step_metadata(entry.step, entry.path, entry.manifest))
            elif entry.kind is root.Kind.FOREIGN:
                what = "it is" if entry.step is None else f"step {entry.step} is"
                logger.warning("ckpt: skipping %s, which holds %s: %s not a committed step, so ckpt never lists, "
                               "overwrites or deletes it%s", entry.path, entry.holds, what, root.removal_hint(entry))
        if not infos:
            self._warn_of_steps_named_otherwise()
        with self._infos_lock:
            self._infos = [c for c in infos if c.step not in self._deleting]
        self._due = None  # a yes was given against the listing just replaced
        if self._local is not None:
            self._local.checkpointer.reload()

    def _put_back_when_free(self, entries: list[root.Entry]) -> bool:
        """:meth:`_put_back` for a Checkpointer opened after a crash, before it saves: a restarted run must
        list the step a crash left set aside. Only while no writer holds the root (one that does may be
        between the two renames, and puts back what a crash left when it begins to save); the lock is
        taken for the moment it takes."""
        set_aside = [e.path.name for e in entries if e.kind is root.Kind.TEMPORARY and storage.set_aside_step(e.path)]
        if self._lock.held or not set_aside:
            return False
        try:
            self._lock.acquire()
        except errors.DirectoryLockedError:  # (a writer's: it puts them back itself, or is between the two renames)
            return False
        except OSError as e:  # (a read-only root, a reader's: listed as it is)
            logger.warning("ckpt: %s, set aside by a save with overwrite=True that a crash interrupted, is not listed "
                           "(nor taken for the latest step): this process cannot put it back (%s); a Checkpointer that "
                           "may write in the root does", ", ".join(set_aside), e)
            return False
        try:
            return self._put_back(entries)
        finally:
            self._lock.release()

    def _warn_of_steps_named_otherwise(self) -> None:
        """A run written with another step name format (a prefix, zero padding: Orbax's step_0010,
        flax.training.checkpoints' checkpoint_100, ckpt's own) lists nothing under this one: say so, naming
        the format that lists its steps, rather than let a resumed run quietly start from scratch."""
        if not isinstance(self._directory, Path):
            return
        found = step_lib.name_format_of(self._directory)
        others = list(step_lib.find_all(self._directory, found).values()) if found != self._name_format else []
        others = [name for name in others if not _saved_alone(self._directory / name)]
        if others:
            logger.warning("ckpt: %s holds steps (%s) that step_name_format %r does not name, so none is listed; "
                           "pass the step_name_format they were written with: step_name_format=%s", self._directory,
                           ", ".join(others[:3]) + (" ..." if len(others) > 3 else ""), self._name_format,
                           _as_call(found))
            return
        alone = sorted(name for name in storage.list_names(self._directory)
                       if orbax.is_tree_saved_alone(self._directory / name))
        if alone:
            logger.warning("ckpt: %s lists no step; it holds %s (%s), each %s: ckpt.load(%r, checkpointable_name=%r)",
                           self._directory, "trees" if len(alone) > 1 else "a tree", ", ".join(alone[:3])
                           + (" ..." if len(alone) > 3 else ""), orbax.ALONE, str(self._directory), alone[-1])

    def _with_manifests(self, only: int | None = None) -> list[CheckpointMetadata]:
        """The checkpoints with the metrics and times ``lightweight_initialize`` skipped, read now and kept:
        a preservation policy must not take a recent step for an old one, nor a step with metrics for one
        without, and a save decision must not take the latest for a step saved in 1970 (``only``: read that
        step's manifest alone). An entry whose manifest does not validate (a user's directory that holds a file
        named manifest.json) was never a step: it is dropped, as a full listing would have skipped it."""
        infos, dropped = [], set()
        with self._infos_lock:
            listed = list(self._infos)  # this root's steps only (not a local tier's)
        for info in listed:
            if info.commit_timestamp_nsecs is None and only in (None, info.step):
                try:
                    info = _step_metadata(info.step, info.path, formats.info(info.path))
                except (errors.CheckpointCorruptedError, errors.InvalidLayoutError) as e:
                    logger.warning("ckpt: skipping %s: step %d is not a committed step (%s), so ckpt never lists, "
                                   "overwrites or deletes it", info.path, info.step, e)
                    dropped.add(info.step)
                    continue
            infos.append(info)
        with self._infos_lock:
            read = {c.step: c for c in infos}
            self._infos = [read.get(c.step, c) for c in self._infos if c.step not in dropped]
        return infos

    def _find(self, step: int) -> CheckpointMetadata | None:
        with self._infos_lock:  # ascending by step: a declined save must not scan thousands of steps
            infos = self._infos
            i = bisect.bisect_left(infos, step, key=lambda info: info.step)
            return infos[i] if i < len(infos) and infos[i].step == step else None

    def _warn_of_a_step_behind(self, step: int) -> None:
        """Says once that saves of steps up to the latest are skipped (as in Orbax, where a run
        restarted from an older step without loading saved nothing, silently, until it passed it)."""
        latest = self.latest
        if not self._warned_behind and latest is not None and step <= latest.step:
            self._warned_behind = True
            logger.warning("ckpt: step %d is not saved, nor any step up to %d: %s already holds step %d, and a save "
                           "must come after the latest step. Resume from it with load(), or pass force=True to save "
                           "anyway. (Said once.)", step, latest.step, latest.path.parent, latest.step)

    def _durable_step(self, step: int) -> CheckpointMetadata | None:
        """This root's step ``step``: committed or, in a job, queued (see :meth:`_queue`), whose save or (with two
        tiers) promotion will write it."""
        with self._infos_lock:
            queued = self._queued.get(step)
        return queued or self._find(step)

    def _committed_step(self, step: int) -> CheckpointMetadata | None:
        return self._find(step) if self._local is None else next((c for c in self.checkpoints if c.step == step), None)

    def _resolve(self, step: int | CheckpointMetadata | None) -> CheckpointMetadata:
        if self._processes.count > 1 and (step is None or _step_number(step) in self._queued):
            # every process the same step: the save in flight, and with two tiers its promotion (loads in a job read the
            # durable tier only), once committed (each process's writer thread adds it when that process is through)
            self.wait()
        if step is None:
            latest = self.latest
            if latest is None:
                raise errors.StepNotFoundError(f"no checkpoints in {self._directory}", step=None, path=self._directory)
            return latest
        number = _step_number(step)
        found = self._written(number, self._committed_step)
        if found is None:
            raise self._not_found(number)
        return found

    def _not_found(self, step: int) -> errors.StepNotFoundError:
        steps = [c.step for c in self.checkpoints]
        return errors.StepNotFoundError(f"no checkpoint at step {step} in {self._directory} (steps: {steps})"
                                        f"{self._damaged_at(step)}", step=step, path=self._directory)

    def _damaged_at(self, step: int) -> str:
        """For an error saying there is no ``step``: the step ckpt cannot read at its name, if any, and how to remove
        it where it is damaged."""
        path = self._directory / self._name_format.build_name(step)
        try:
            entry = root.classify(path, step) if storage.exists(path) else None
        except FileNotFoundError:  # (removed since)
            return ""
        if entry is None or not root.is_damaged_step(entry):
            return ""
        return f"; {path} holds {entry.holds}{root.removal_hint(entry)}"

    def _written(self, step: int, find: Callable[[int], CheckpointMetadata | None]) -> CheckpointMetadata | None:
        """``find(step)``; when the save in flight is of ``step``, once it is committed (or its failure raised):
        a step being overwritten is found as the save in flight leaves it, not as it was. With two tiers, the
        save in flight is the local tier's (every save goes there first; its promotion is not waited for)."""
        saver = self._saver()
        in_flight = saver._in_flight
        if in_flight is not None and in_flight.step == step:
            saver.wait()
        return find(step)

    def _saver(self) -> Checkpointer:
        """The Checkpointer whose save is in flight: this one, or with two tiers the local tier's."""
        return self if self._local is None else self._local.checkpointer

    # ---------------------------------------------------------------------------------- deciding
    def should_save(self, step: int | CheckpointMetadata) -> bool:
        """Whether the save-decision policy saves ``step``; False for a step <= the latest.

        After a yes, the save of this step that follows saves it without asking the policy again (a caller
        that copied its state to the host on that answer gets the save).
        After a no, the save asks again, as Orbax does: the answer may have changed since (the save in
        flight finished, the policy's minimum interval passed). In a multi-process job the primary process
        decides, and the save takes its decision whatever each process's should_save said: should_save may be
        called on some processes only (``if rank == 0``), the primary among them wherever others ask (they wait
        for its answer); a step asked again before the next save or deletion gets the same answer, after other steps
        too.

        Example::

            assert ckptr.should_save(0)                  # the default policy saves the first step
            ckptr.save(0, {"w": np.ones(3)})
            assert not ckptr.should_save(0)              # not again
        """
        number = _step_number(step)
        asked = self._asked_of(number)
        if asked is not None:  # (in a job: asked again at once, the same answer, which the other processes got)
            due = asked[2]
        else:
            due = self._decide(number, replacing=False)
            if self._processes.count > 1:
                self._asked = (*self._agreed[:2], due)
        self._due = number if due else None
        return due

    def reached_preemption(self, step: int) -> bool:
        """True once a save decision at ``step`` or earlier saw a preemption (SIGTERM,
        ``ckpt.preemption.notify()``, or JAX's preemption sync point): that step was saved, stop now.

        Ask it after ``save``/``save_async`` of the step; a preemption that arrives between the two is
        seen by the next step's decision, so no step is skipped.

        Example::

            for step in range(3):
                ckptr.save(step, {"w": np.full(3, step)})
                if ckptr.reached_preemption(step):      # step is saved: exit before the job is killed
                    break
        """
        self._listen()  # a loop that asks stops on a preemption: a first SIGTERM may wait for it
        return self._preempted_at is not None and step >= self._preempted_at

    def _listen(self) -> None:
        """Defers a first SIGTERM until this Checkpointer's loop has saved for it (see ckpt.preemption), while
        the Checkpointer is open: a closed one saves nothing, so SIGTERM goes on terminating at once."""
        if not self._closed:
            preemption.listen(self)

    def _decide(self, step: int, *, replacing: bool, reached: bool | None = None, force: bool = False,
                in_save: bool = False, answered: bool = False, keeps: bool = False, holds: str | None = None,
                described: tuple[Any, Any] | None = None) -> bool:
        """The save decision of ``step``. ``reached``: whether a preemption was seen, as the Checkpointer whose
        local tier this one is decided it (its processes agreed on it); None: this one asks. ``force``: a forced
        save in a job, which takes the primary's decision too, so that every process passes through the same steps;
        ``keeps``: one that promotes the copy this process's local tier holds (see :meth:`_primarys`).
        ``in_save``: a save's decision, not should_save's (see :meth:`_primarys`); ``answered``: a save the primary's
        should_save said yes to, which takes that answer without asking the policy again; ``holds``: the path of the
        step this save refuses (it exists and ``overwrite`` is not set), which a save's decision publishes with the
        primary's (see :meth:`_declined_refusal`); ``described``: the save's metrics and custom metadata, which the
        primary publishes with its decision (see :meth:`_queue`)."""
        if force:
            decision = self._primarys(step, True, False, force=True, in_save=in_save, keeps=keeps, holds=holds,
                                      described=described)[0]
            if self._local is None or self._unlike is None or decision:
                return decision
            # the primary did not force: its local tier may save the step, where this process's refusal meets the others
            return self._primarys_either(False)
        asked = self._asked_of(step) if answered and self._processes.index == 0 else None
        if asked is not None:
            _, (decision, reached, *_), either = asked
            self._primarys(step, decision, reached, force=False, in_save=True, holds=holds, described=described)
            return either if self._local is None else self._primarys_either(either)
        if not self._decided_once:
            self._decided_once = True
            if self._local is not None or save_decision_policies.saves_on_preemption(self._save_policy):
                self._listen()
        elif self._preempted_at is not None and step > self._preempted_at:
            preemption.end_deferred_sigterm(self.wait)  # the loop went on past the step saved for a SIGTERM
        previous = self._infos  # replaced, never changed in place: no copy on this per-step path
        if previous and previous[-1].commit_timestamp_nsecs is None:  # listed by lightweight_initialize, without
            self._with_manifests(only=previous[-1].step)               # the time ContinuousCheckpointingPolicy reads
            previous = self._infos
        if replacing:
            previous = [c for c in previous if c.step != step]
        saving = self._saving()
        in_flight = self._in_flight
        if saving and in_flight is not None and (not previous or in_flight.step > previous[-1].step):
            previous = [*previous, in_flight]  # the step being written counts, as in Orbax
        below = bool(previous) and step <= previous[-1].step
        if self._queued and not below:  # in a job: a step listed from the moment its save or promotion is queued (see
            with self._infos_lock:     # _queue) counts too: with two tiers, a promotion neither holds
                below = step <= max(self._queued, default=step - 1)
        if below and not replacing:
            # (with two tiers too: below the durable tier's latest, it is below the latest of either; in a job, the
            # primary's answer still, as a process forcing this save waits for it, with a local tier for its either too)
            if self._processes.count == 1:
                return False
            decision = self._primarys(step, False, False, force=False, in_save=in_save, holds=holds,
                                      described=described)[0]
            if in_save and self._local is not None and self._processes.index == 0:
                self._primarys_either(False)
            return decision
        if reached is None:
            reached = preemption.reached(step)
            # a SIGTERM or notify() in another process (not JAX's sync point, which every process sees at once)
            if self._processes.count > 1 and distributed.noticed_elsewhere(self._processes, "preemption",
                                                                           preemption.preempted()):
                preemption.notify()  # (on the primary: latched here as a SIGTERM is)
                reached = True
        context = save_decision_policies.DecisionContext(
            is_saving_in_progress=saving, reached_preemption=reached,
            multiprocessing_options=self._ctx.multiprocessing_options)
        current = CheckpointMetadata(step, None, commit_timestamp_nsecs=now_nsecs(), monotonic_nsecs=time.monotonic_ns())
        decision = bool(self._save_policy.should_save(current, previous, context=context))
        if self._processes.count > 1:  # time and signals differ between processes: the primary decides (for
            # its step: processes saving other steps then meet in the save's check of the paths, not a timeout)
            decision, reached = self._primarys(step, decision, reached, force=False, in_save=in_save, holds=holds,
                                               described=described)
            if self._unlike is not None:  # the primary forced its save: no local decision follows there
                return decision
        if reached and (self._preempted_at is None or not self._reached):
            self._preempted_at = step
        self._reached = reached
        if self._local is None:
            return decision
        either = self._local.decide(step, durable=decision, reached=reached, preempted=step == self._preempted_at,
                                    replacing=replacing)
        if self._processes.count > 1:  # each process's local tier decides alone (its policy, its clock): the primary's
            either = self._primarys_either(either)
        return either

    def _primarys(self, step: int, decision: bool, reached: bool, *, force: bool, in_save: bool,
                  keeps: bool = False, holds: str | None = None,
                  described: tuple[Any, Any] | None = None) -> tuple[bool, bool]:
        """The primary's save decision and preemption, and whether it forced its save; keeps in ``_unlike`` the
        error of a process whose ``force`` is not the primary's, or, in a forced save with a local tier, whose
        ``keeps`` (it promotes the copy its local tier holds, not a new one) is not the primary's, raised by its save
        where every process meets (when the primary saves) or at once (when it does not): the others would wait for
        it there.

        A save's message is named by the calls before it that every process makes (saves and deletions), so that
        processes saving other steps meet in the save's check of the paths; should_save's by that and its step
        (:meth:`_should_save_name`): should_save called on some processes only (``if rank == 0``) shifts no later name,
        and the save that follows takes the primary's save decision whatever each process's should_save said. A step
        should_save asked before since the last save or deletion gets the answer published then (:meth:`_asked_before`).
        A save that may queue its step (see :meth:`_queue`) publishes the primary's ``described``, its metrics and
        custom metadata, with it: no message more."""
        name = self._operation("decide") if in_save else self._should_save_name(step)
        once = not in_save and self._asked_before(step)
        stored = None
        if described is not None and self._processes.index == 0 and (decision or self._local is not None):
            try:
                stored = saving.stored_metadata(*described)
            except ValueError:
                pass  # (not JSON: the save raises it where the processes meet)
        try:
            value = self._broadcast(name, [decision, reached, force, keeps, holds, stored], once)
        except TimeoutError as e:
            if in_save:
                raise
            raise distributed.ProcessesTimeoutError(
                f"should_save({step}) on process {self._processes.index} waited for process 0's answer, which decides "
                f"for every process: call should_save({step}) on process 0 too wherever another process calls it ({e})"
            ) from None
        self._agreed = (name, value, once)
        decision, reached, forced, kept, *_ = value
        self._unlike = None
        if forced != force:
            self._unlike = ValueError(
                f"process {self._processes.index} saves step {step} {'with' if force else 'without'} force=True, "
                f"process 0 {'with' if forced else 'without'} it: every process passes the same force (a forced save "
                f"skips the save-decision policy) to the save of one step of {self._directory}; nothing was written")
        elif kept != keeps:
            def saves(copy: bool) -> str:
                return "promoting the copy its local tier holds" if copy else "anew"

            self._unlike = errors.StepAlreadyExistsError(
                f"process {self._processes.index} saves step {step} with force=True {saves(keeps)}, process 0 "
                f"{saves(kept)}: the step would mix the parts of two saves in {self._directory}. A forced save of a "
                "step the local tiers hold promotes their copies, where every process holds one and none passes "
                "overwrite=True (a local save that failed on some processes leaves it on the others): pass "
                "overwrite=True on every process to save it anew; nothing was written",
                step=step, path=self._directory / self._name_format.build_name(step))
        return decision, reached

    def _declined_refusal(self, step: int, refused: errors.StepAlreadyExistsError | None
                          ) -> errors.StepAlreadyExistsError | None:
        """What a save of ``step`` that the primary declined raises, given ``refused``, this process's refusal of a step
        it holds without ``overwrite``: in a job, the primary's answer, published with its decision (:meth:`_primarys`),
        so that every process raises or none does. A step only some processes' local tiers hold (a local policy that
        keeps other steps on each process) was refused by those alone, while the others went on."""
        if self._processes.count == 1:
            return refused
        held = self._agreed[1][4]  # (the path of the step the primary holds, or None)
        if held is None:
            return None  # (a copy of this process alone: declined, as on the others, it is left as it is)
        return refused or errors.StepAlreadyExistsError(
            f"step {step} already exists at {held} (process 0's copy); pass overwrite=True on every process to "
            "replace it", step=step, path=storage.location(held))

    def _primarys_either(self, either: bool) -> bool:
        """The primary's decision with its local tier (``either`` here), after the decision :meth:`_primarys` took."""
        name, _, once = self._agreed
        return self._broadcast(f"{name}/local", either, once)

    def _broadcast(self, name: str, value: Any, once: bool) -> Any:
        """The primary's ``value`` under ``name`` on every process; ``once``: the value published first under it."""
        timeout = self._ctx.async_options.timeout_secs
        if once:
            return distributed.broadcast_once(self._processes, name, value, timeout)
        return self._processes.broadcast(name, value, timeout)

    @property
    def _ctx(self) -> Context:
        """The options of this call: the active ``with ctx:`` block's, else the constructor's."""
        return get_context(self._context)

    def _should_save_name(self, step: int) -> str:
        """The name of should_save's decision of ``step`` (see :meth:`_primarys`)."""
        prefix = self._ctx.multiprocessing_options.barrier_sync_key_prefix or ""
        return f"{prefix}{self._place}/{self._opened}/{self._operations}/should_save/{step}"

    def _asked_of(self, step: int) -> tuple[str, list, bool] | None:
        """In a job, should_save's answer of ``step`` when it was the last step asked, since the last save or deletion
        (its message, value, answer): a step asked again at once, or saved after a yes, needs no message."""
        asked = self._asked
        return asked if asked is not None and asked[0] == self._should_save_name(step) else None

    def _asked_before(self, step: int) -> bool:
        """Whether should_save may have asked ``step`` before since the last save or deletion (it asked a step as high),
        and records it: asked again, even after other steps, a step gets the answer published first on every process
        (:func:`ckpt.distributed.broadcast_once`, a round trip more on the primary), so that no process reads the first
        of two answers under one name. Nothing is kept per step asked: a loop that asks every step and never saves
        (a policy that saves on preemption only) holds no more memory at its millionth step than at its first."""
        operations, highest = self._highest_asked
        before = operations == self._operations and step <= highest
        if not before:
            self._highest_asked = (self._operations, step)
        return before

    def _operation(self, what: str) -> str:
        """A name unique to this call, the same on every process (they call the same methods in order)."""
        self._operations += 1
        prefix = self._ctx.multiprocessing_options.barrier_sync_key_prefix or ""
        return f"{prefix}{self._place}/{self._opened}/{self._operations}/{what}"

    def _barrier(self, what: str) -> None:
        if self._processes.count > 1:
            self._processes.barrier(self._operation(what), self._ctx.async_options.timeout_secs)

    # ------------------------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, *, checkpointable_name: str = fmt.DEFAULT_CHECKPOINTABLE,
             force: bool = False, overwrite: bool = False, metrics: Any = None, custom_metadata: Any = None) -> bool:
        """Saves ``state`` at ``step`` if the policy says so (or ``force``), durably; returns whether it saved.

        A step below the latest is skipped (False); an existing step raises unless ``overwrite`` is set.
        A step ``save_async`` is still writing exists: the save waits for it to be committed, then
        replaces it (``overwrite``) or raises.
        ``step`` is an int or a 0-d integer array of numpy, jax or torch (``state.step`` of a Flax
        ``TrainState`` will do), here and wherever a Checkpointer takes a step.

        Raises:
          StepAlreadyExistsError: ``step`` exists (or is being written) and ``overwrite`` is not set (before
            anything is written).
          TypeError / ValueError: an unsupported leaf, a bad name, metrics that are not JSON.

        Example::

            assert ckptr.save(0, {"w": np.ones(3), "step": 0}, metrics={"loss": 0.5})
            ckptr.save(0, {"w": np.zeros(3), "step": 0}, overwrite=True)   # replaced
        """
        return self.save_checkpointables(step, {checkpointable_name: state}, force=force, overwrite=overwrite,
                                         metrics=metrics, custom_metadata=custom_metadata)

    def save_checkpointables(self, step: int, checkpointables: dict[str, Any], *, force: bool = False,
                             overwrite: bool = False, metrics: Any = None, custom_metadata: Any = None) -> bool:
        """Saves several named trees at ``step`` (``{"model": ..., "optimizer": ...}``); see :meth:`save`.

        Example::

            ckptr.save_checkpointables(0, {"model": {"w": np.ones(3)}, "optimizer": {"m": np.zeros(3)}})
            model = ckptr.load(checkpointable_name="model")
        """
        response = self._save(step, checkpointables, force=force, overwrite=overwrite, metrics=metrics,
                              custom_metadata=custom_metadata, blocking=True)
        return response is not None and response.result()

    def save_async(self, step: int, state: Any, *, checkpointable_name: str = fmt.DEFAULT_CHECKPOINTABLE,
                   force: bool = False, overwrite: bool = False, metrics: Any = None,
                   custom_metadata: Any = None) -> background.AsyncResponse[bool] | None:
        """Like :meth:`save`, but returns once the state is copied; writing continues in the background.

        Returns None when the policy skips the step. After it returns, the caller may change the state
        in place (or donate jax buffers): the checkpoint holds the values at the call.

        Example::

            state = {"w": np.ones(3)}
            response = ckptr.save_async(0, state)
            state["w"] += 1                              # training goes on while step 0 is written
            assert response.result() and ckptr.load(0)["w"][0] == 1
        """
        return self.save_checkpointables_async(step, {checkpointable_name: state}, force=force, overwrite=overwrite,
                                               metrics=metrics, custom_metadata=custom_metadata)

    def save_checkpointables_async(self, step: int, checkpointables: dict[str, Any], *, force: bool = False,
                                   overwrite: bool = False, metrics: Any = None,
                                   custom_metadata: Any = None) -> background.AsyncResponse[bool] | None:
        """Async :meth:`save_checkpointables`; see :meth:`save_async`.

        Example::

            response = ckptr.save_checkpointables_async(0, {"model": {"w": np.ones(3)}, "data": {"epoch": 2}})
            ckptr.wait()                                 # or response.result()
            assert ckptr.load(checkpointable_name="data") == {"epoch": 2}
        """
        return self._save(step, checkpointables, force=force, overwrite=overwrite, metrics=metrics,
                          custom_metadata=custom_metadata, blocking=False)

    def prepare_async_save(self, checkpointables: dict[str, Any]) -> background.AsyncResponse[None]:
        """Makes, in the background, the host memory that async saves of ``checkpointables`` (or of
        trees whose leaves have the same sizes) copy into, and touches its pages: fresh memory faults in
        page by page on its first copy, which made a first async save several times as long as the
        next ones. Call it before training starts; a save made meanwhile simply takes fresh memory.

        Example::

            state = {"w": np.ones(1_000_000)}
            ckptr.prepare_async_save({"state": state}).result()   # or let it run while training starts
            ckptr.save_async(0, state)                            # copies into memory already touched
        """
        self._check_open()
        if self._local is not None:  # saves go to the local tier first
            return self._local.checkpointer.prepare_async_save(checkpointables)
        if dtensor.holds_dtensors(checkpointables):  # planning gathers small DTensors: not from another thread
            return background.finished(None)
        options, budget = self._ctx, self._inflight_budget()
        trees, _ = custom.split(checkpointables, options.checkpointables_options.registry)  # handlers bring their memory
        storage = options.array_options.saving
        return self._in_background(  # only the leaves' sizes are read: planning can wait for the thread
            lambda: self._staging.reserve(saving.staging_sizes(saving.plan(trees, storage=storage), budget)))

    def _save(self, step: int, checkpointables: dict[str, Any], *, force: bool, overwrite: bool, metrics: Any,
              custom_metadata: Any, blocking: bool, marks: tuple[str, ...] = ()) -> background.AsyncResponse[bool] | None:
        """A save (see :meth:`save_checkpointables`); its response, or None where the policy skips the step. ``marks``:
        names of empty files written into the step before its commit (a local tier's save of a step owed to the durable
        tier marks it so, see :meth:`ckpt.tiers.LocalTier.save`)."""
        self._check_open()
        step = _step_number(step)
        # A step still being written exists: overwritten or refused. With two tiers a step either holds counts,
        # except for a forced save, which promotes the copy the local tier holds (see LocalTier.save) unless a promotion
        # of it is queued already.
        existing = self._written(step, self._durable_step if force else self._committed_step)
        # In a job `checkpoints` lists the durable tier's steps only: a step this process's local tier holds exists too
        # (refused without overwrite, as the others' parts of it would be mixed with a new one), and a forced save that
        # promotes that copy must do so on every process (see _primarys).
        held = self._local.held(step) if self._local is not None and self._processes.count > 1 else None
        keeps = force and not overwrite and existing is None and held is not None
        if existing is None and not force:
            existing = held
        refused = None
        if existing is not None and not overwrite:
            advice = ("it is a step Orbax wrote, which no save replaces, even with overwrite=True: delete it first "
                      "(delete(step)), or save another step") if formats.is_orbax(existing.path) else (
                "pass overwrite=True to replace it")
            refused = errors.StepAlreadyExistsError(f"step {step} already exists at {existing.path}; {advice}",
                                                    step=step, path=existing.path)
            if self._processes.count == 1:
                raise refused
            # (in a job, raised where every process meets (prepare, or with a local tier the promotion): a process told
            # to overwrite would wait there)
        answered_yes, self._due = self._due == step and existing is None, None
        if self._processes.count == 1:
            due = answered_yes or force or self._decide(step, replacing=existing is not None)
        else:  # every process takes the primary's decision of its save, which may not be its should_save's answer
            due = self._decide(step, replacing=existing is not None, force=force, in_save=True, answered=answered_yes,
                               keeps=keeps, holds=None if refused is None else str(existing.path),
                               described=(metrics, custom_metadata))
        unlike, self._unlike = self._unlike, None
        if not due:
            refused = unlike or self._declined_refusal(step, refused)
            if refused is not None:
                raise refused
            self._warn_of_a_step_behind(step)
            return None  # a step below the latest, or one the policy skips
        refused = unlike or refused
        preemption.serve()  # (a SIGTERM held back for a save no save served ends the process at close)
        self._ctx.check()  # (a ``with ctx:`` block around this call: its options, not checked when this was opened)
        if self._local is not None:
            if refused is not None:  # (this process's force or overwrite is not the others', which save and promote)
                self._local.refuse(step, refused)
            return self._local.save(step, checkpointables, force=force, overwrite=overwrite, blocking=blocking,
                                    preempted=step == self._preempted_at, metrics=metrics,
                                    custom_metadata=custom_metadata)
        options = self._ctx
        final = self._directory / step_lib.checked_name(self._name_format, step)
        elsewhere = root.replaced_elsewhere(existing and existing.path, final, step) if overwrite else None
        prepared: list[tuple[saving.Plan, dict]] = []

        def prepare() -> None:  # a failure in any process raises in all, before any writes
            if refused is not None:
                raise refused
            plan, handled = saving.plan_checkpointables(checkpointables, options, metrics=metrics,
                                                        custom_metadata=custom_metadata, previous=self._staging.layout)
            self._staging.layout = plan.layout
            self.wait()
            root.check_target(final, storage.temporary_for(final), step=step, overwrite=overwrite)
            if self._processes.index == 0:
                self._take_directory()
            prepared.append((plan, handled))

        timeout = options.async_options.timeout_secs
        distributed.settle(self._processes, self._operation("save/planned"), prepare, timeout, f"the save of {final}")
        (plan, handled), = prepared
        # every process saves the same tree to the same step (named without it, so that processes saving
        # other steps are told so), before any makes its temporary
        saving.agree(plan, final, self._processes, self._operation("save/checked"), timeout)
        writer = saving.StepWriter(plan, storage.temporary_for(final), final, overwrite=overwrite,
                                   dir_mode=self._ctx.file_options.path_permission_mode,
                                   processes=self._processes, operation=self._operation(f"save/{step}"),
                                   timeout_secs=self._ctx.async_options.timeout_secs, marks=marks)
        writer.start_custom(handled)

        self._in_flight = CheckpointMetadata(step, final, init_timestamp_nsecs=plan.init_timestamp_nsecs,
                                             commit_timestamp_nsecs=plan.init_timestamp_nsecs, metrics=metrics,
                                             custom_metadata=custom_metadata)

        callback = self._ctx.async_options.post_finalization_callback

        def job() -> bool:
            try:
                manifest = writer.run(step)
            except BaseException:
                self._unqueue(step)
                if existing is not None:
                    self._forget_if_gone(existing)
                raise
            finally:
                if plan.staging:
                    self._staging.give(plan.staging)
            self._committed(step, writer.final_dir, manifest, callback)
            if elsewhere is not None and self._processes.index == 0:
                self._delete_replaced(elsewhere, step)  # the step as it was, under another name the format reads
            return True

        if blocking:
            return background.finished(job())
        try:
            writer.hand_off(self._inflight_budget(), self._staging)
        except BaseException:
            writer.discard()
            raise
        self._queue(self._in_flight)
        return self._writer.submit(job, hurry=writer.hurry, what=f"the save of step {step} ({final})")

    def _inflight_budget(self) -> int | None:
        """How many bytes an async save copies before it writes the rest itself (with several processes
        every leaf is copied)."""
        return self._ctx.memory_options.max_inflight_bytes if self._processes.count == 1 else None

    def _take_directory(self) -> None:
        """Becomes the root's one writer; the first time, removes what crashed saves and deletions of ckpt's
        left (temporary and half-deleted directories, and uncommitted steps on an object store). One that
        cannot be removed is logged and left: it is never listed, and no save but one of its step needs it gone."""
        self._lock.acquire()
        if self._swept:
            return
        entries = root.scan(self._directory, self._name_format, read_manifests=False)
        self._begun |= root.begun_in_place(entries)  # (a local tier's recovery asks, after this sweep: see tiers)
        if self._local is not None:  # (the local steps whose promotion what the sweep removes shows cut short)
            self._local.before_sweep()
        put_back = self._put_back(entries)
        for entry in entries:
            if entry.kind in root.REMOVABLE and not storage.in_use(entry.path):  # (another process's free save)
                try:
                    storage.remove_owned(entry.path)
                except OSError as e:
                    logger.warning("ckpt: could not remove %s, left by a crashed save or deletion: %s", entry.path, e)
        replaced = root.replaced_and_left(entries)
        for entry in replaced:
            logger.warning("ckpt: deleting %s, step %d as it was before a save with overwrite=True replaced it under "
                           "another name (a crash or an error stopped that save before it deleted it)",
                           entry.path, entry.step)
            self._delete_replaced(entry.path, entry.step)
        self._swept = True
        if put_back or replaced:
            self.reload()

    def _delete_replaced(self, path: storage.Location, step: int) -> None:
        """Deletes step ``step`` as it was under another name before a save with ``overwrite=True`` replaced it
        (see :func:`ckpt.root.replaced_elsewhere`), after that save's commit or after a crash between the two. A
        failure does not fail the save, which is committed: it is logged, as for a step replaced under its own name
        (``storage.commit_dir``), and what is left is never listed; the root's next writer tries again."""
        try:
            root.delete_step(path, step)
        except OSError as e:
            logger.warning("ckpt: step %d was committed, but %s, the step it replaced under another name, could not "
                           "be deleted: %s", step, path, e)

    def _put_back(self, entries: list[root.Entry]) -> bool:
        """Puts back every step of ``entries`` that a commit with ``overwrite=True`` set aside and a crash
        left there (see :func:`ckpt.storage.set_aside_step`); whether there was one. The caller holds the lock."""
        found = False
        for entry in entries:
            final = storage.set_aside_step(entry.path) if entry.kind is root.Kind.TEMPORARY else None
            if final is not None:
                try:
                    storage.put_back(entry.path, final)
                    found = True
                except OSError as e:
                    logger.warning("ckpt: could not put back %s as %s: %s", entry.path, final, e)
        return found

    def _committed(self, step: int, path: storage.Location, manifest: dict, callback: Any = None) -> None:
        info = _step_metadata(step, path, manifest, time.monotonic_ns())
        self._deleted.discard(step)
        with self._infos_lock:
            self._infos = sorted([c for c in self._infos if c.step != step] + [info], key=lambda c: c.step)
            self._queued.pop(step, None)
        self._collect_garbage()
        if callback is not None:
            callback()

    def _collect_garbage(self) -> None:
        """Deletes the steps the preservation policy does not keep, except the latest, the one saved last
        and those being read. The policy sees the steps in the order they were saved (_in_save_order)."""
        with self._gc_lock:  # a local tier's promotions collect garbage too, from their own thread
            checkpoints = _in_save_order(self._with_manifests())
            keep = list(self._preservation_policy.should_preserve(
                checkpoints, context=preservation_policies.PreservationContext()))
            if len(keep) != len(checkpoints):
                raise ValueError(f"{self._preservation_policy!r} returned {len(keep)} decisions for {len(checkpoints)} checkpoints")
            latest = max((c.step for c in checkpoints), default=None)
            failures = []
            for info, kept in zip(checkpoints[:-1], keep[:-1]):
                if kept or info.step == latest or self._reading[info.step]:
                    continue
                if self._processes.index != 0:  # every process decides alike; the primary deletes
                    self._forget(info.step)
                    continue
                try:
                    self._delete(info)
                except OSError as e:
                    failures.append(f"step {info.step} ({info.path}): {e}")
            if failures:
                raise OSError(f"the checkpoint was committed, but garbage collection could not delete: {'; '.join(failures)}")

    def _delete(self, info: CheckpointMetadata) -> None:
        """Deletes a step garbage collection does not keep; one already gone (removed by hand or by another
        tool since it was listed) is only forgotten."""
        try:
            root.delete_step(info.path, info.step)
        except FileNotFoundError:
            if storage.exists(info.path):
                raise
        self._forget(info.step)

    def _forget_if_gone(self, info: CheckpointMetadata) -> bool:
        """Forgets the step a failed save (or promotion) with overwrite=True was to replace when it is gone: on an
        object store, where a step is written in place, the save deleted it before writing. Returns whether it may
        be gone: it is (forgotten), or the store did not tell (kept listed; the save's own error is the one raised)."""
        try:
            gone = not storage.exists(info.path / fmt.MANIFEST)
        except OSError:
            return True
        if gone:
            self._forget(info.step)
        return gone

    def _forget(self, step: int) -> None:
        with self._infos_lock:
            self._infos = [c for c in self._infos if c.step != step]

    # ----------------------------------------------------------------------------------- loading
    def load(self, step: int | CheckpointMetadata | None = None, abstract_state: Any = None, *,
             checkpointable_name: str = fmt.DEFAULT_CHECKPOINTABLE) -> Any:
        """Loads one tree from ``step`` (the latest when None).

        With ``abstract_state`` the result has exactly its structure and leaf types:
        ``jax.ShapeDtypeStruct`` (placed with its sharding), arrays and tensors (their dtype and device;
        a tensor on the meta device gives a CPU tensor), Python types, ``None`` (as saved),
        ``ckpt.PLACEHOLDER``, which is ``...`` (skipped). Without it, the tree comes back as
        saved (dicts, lists, tuples; numpy, jax and torch arrays; Python scalars).

        A step that ``save_async`` is still writing is waited for (its failure raised); ``step=None``
        is the latest committed step (in a multi-process job, once the save in flight, and with two tiers its
        promotion, is committed: every process loads the same step). A load lets go of the host buffers an async
        save keeps for the next one, so that the loaded arrays can take their memory: a load after async saves holds
        no third copy of the state, and the next async save makes its buffers anew.

        Raises:
          StepNotFoundError: no such step (or no checkpoint at all).
          ValueError: the abstract tree differs from the saved one (every differing key path listed).
          CheckpointCorruptedError: damaged data (the step and key path named).

        Example::

            ckptr.save(0, {"w": np.ones(3, np.float32), "step": 0})
            state = ckptr.load()                         # the latest step, as saved
            state = ckptr.load(0, abstract_state={"w": np.zeros(3, np.float16), "step": 0})
            assert state["w"].dtype == np.float16
        """
        return self.load_checkpointables(step, {checkpointable_name: abstract_state})[checkpointable_name]

    def load_checkpointables(self, step: int | CheckpointMetadata | None = None,
                             abstract_checkpointables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Loads named trees from ``step``: all of them, or the keys of ``abstract_checkpointables``.

        Example::

            ckptr.save_checkpointables(0, {"model": {"w": np.ones(3)}, "optimizer": {"m": np.zeros(3)}})
            assert sorted(ckptr.load_checkpointables()) == ["model", "optimizer"]
            only_model = ckptr.load_checkpointables(0, {"model": None})   # None: as saved
        """
        return self._load(self._candidates(step), abstract_checkpointables)

    def _candidates(self, step: int | CheckpointMetadata | None) -> list[CheckpointMetadata]:
        """What a load of ``step`` reads (see :meth:`_read`): the step; with two tiers and ``step`` None, every
        step, newest first. Raises StepNotFoundError when there is none."""
        info = self._resolve(step)
        return self.checkpoints[::-1] if step is None and self._local is not None else [info]

    def _load(self, candidates: list[CheckpointMetadata],
              abstract_checkpointables: dict[str, Any] | None) -> dict[str, Any]:
        spare = self._staging.clear()  # the last async save's staging buffers: read into them
        options = self._ctx

        def read(path: storage.Location) -> dict[str, Any]:
            with host_memory.reusing(spare):
                return formats.load_checkpointables(path, abstract_checkpointables,
                                                    partial_load=options.pytree_options.loading.partial_load,
                                                    registry=options.checkpointables_options.registry)

        return self._read(candidates, read)

    def _read(self, candidates: Sequence[CheckpointMetadata], read: Callable[[storage.Location], T]) -> T:
        """``read(path)`` of the first candidate; with two tiers, of the first of ``candidates`` (newest first)
        that loads, from either tier (see :meth:`ckpt.tiers.LocalTier.load`). Each copy is read as
        :meth:`_read_step` reads it, by the Checkpointer of its tier."""
        if self._local is None:
            return self._read_step(candidates[0].step, candidates[0].path, read)
        readers = {tiers.LOCAL: self._local.checkpointer, tiers.DURABLE: self}
        return self._local.load(candidates, lambda tier, step, path: readers[tier]._read_step(step, path, read))

    def _read_step(self, step: int, path: storage.Location, read: Callable[[storage.Location], T]) -> T:
        """``read(path)`` of this root's ``step``, which garbage collection keeps meanwhile. A step deleted
        meanwhile raises StepNotFoundError (and is no longer listed); one replaced (``overwrite=True``) is
        read again, once; one replaced by something else (a symbolic link) raises StepNotFoundError."""
        self._reading[step] += 1
        try:
            try:
                root.check_still_a_step(path, step)
                with root.reading(path, step):
                    return read(path)
            except errors.StepReplacedError:  # saved again meanwhile: the new one is the step now
                with root.reading(path, step):
                    return read(path)
        except errors.StepReplacedError:
            raise
        except errors.StepNotFoundError as e:
            self._forget(step)
            if step in self._deleting or step in self._deleted:
                raise errors.StepNotFoundError(f"step {step} ({path}) was deleted while it was being read, by this "
                                               "Checkpointer's delete() or delete_async()", step=step, path=path) from e
            raise
        finally:
            self._reading[step] -= 1

    def load_async(self, step: int | CheckpointMetadata | None = None, abstract_state: Any = None, *,
                   checkpointable_name: str = fmt.DEFAULT_CHECKPOINTABLE) -> background.AsyncResponse[Any]:
        """:meth:`load` in a background thread; ``result()`` returns what ``load`` would.

        Example::

            ckptr.save(0, {"w": np.ones(3)})
            response = ckptr.load_async()                # the latest step
            state = response.result(timeout=60)
        """
        candidates = self._candidates(step)  # the latest now (with two tiers, and what a load falls back to)
        return self._in_background(
            lambda: self._load(candidates, {checkpointable_name: abstract_state})[checkpointable_name])

    def load_checkpointables_async(self, step: int | CheckpointMetadata | None = None,
                                   abstract_checkpointables: dict[str, Any] | None = None) -> background.AsyncResponse[dict[str, Any]]:
        """:meth:`load_checkpointables` in a background thread.

        Example::

            ckptr.save_checkpointables(0, {"model": {"w": np.ones(3)}, "optimizer": {"m": np.zeros(3)}})
            trees = ckptr.load_checkpointables_async(0).result(timeout=60)
            assert sorted(trees) == ["model", "optimizer"]
        """
        candidates = self._candidates(step)
        return self._in_background(lambda: self._load(candidates, abstract_checkpointables))

    def _in_background(self, fn) -> background.AsyncResponse:
        if self._loader is None:
            self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-loader")
        return background.AsyncResponse(self._loader.submit(transfers.with_callers_placement(fn)))

    # ---------------------------------------------------------------------------------- deleting
    def delete(self, step: int | CheckpointMetadata, *, checkpointable_name: str | None = None,
               missing_ok: bool = False) -> bool:
        """Deletes ``step`` now, whatever the preservation policy says (the latest step too), as Orbax's
        ``delete`` does; returns True, or False when there is no such step and ``missing_ok`` is set.

        The save in flight is waited for first; a step not listed is looked for again on disk (one committed
        since the root was listed, as Orbax's delete deletes what is at the step's name). The step is renamed
        aside before its files are removed, as garbage collection deletes, so an interrupted deletion never
        leaves half a step listed. With a local tier, the step goes from both tiers. ``checkpointable_name``
        (Orbax deletes one checkpointable of a step) raises ValueError: a step's trees share its files. In a
        multi-process job every process calls it, as it saves: process 0 deletes the step, and every process
        returns once it is gone (a save of the same step may follow at once).

        Raises:
          StepNotFoundError: no such step, and ``missing_ok`` is not set.
          ValueError: in a multi-process job, the processes delete different steps, one of which some do not hold
            (on every process; nothing is deleted).
          DirectoryLockedError, RootNotWritableError: another Checkpointer writes the root, or this process may
            not write there; the step is kept, and still listed.
          RuntimeError: the Checkpointer is closed (Orbax's deletes again).

        Example::

            ckptr.save(0, {"w": np.ones(3)})
            assert ckptr.delete(0) and ckptr.latest is None
            assert ckptr.delete(0, missing_ok=True) is False
        """
        return self.delete_async(step, checkpointable_name=checkpointable_name, missing_ok=missing_ok).result()

    def delete_async(self, step: int | CheckpointMetadata, *, checkpointable_name: str | None = None,
                     missing_ok: bool = False) -> background.AsyncResponse[bool]:
        """:meth:`delete` in the background. The step leaves ``checkpoints`` at once; a later save, ``wait`` and
        ``close`` wait for the deletion and raise its failure, after which the step is listed again.

        Example::

            ckptr.save(0, {"w": np.ones(3)})
            response = ckptr.delete_async(0)
            assert not ckptr.checkpoints and response.result(timeout=60)
        """
        self._check_open()
        root.whole_checkpoints_only(checkpointable_name)
        self._ctx.check()
        number = _step_number(step)
        self.wait()  # (the save in flight may be of this step)
        self._in_flight = None  # (committed: while the deletion runs, no step being written counts for a decision)
        info = self._find(number)
        if info is None:  # a step committed since the root was listed (Orbax's delete deletes what is at its name)
            self.reload()
            info = self._find(number)
        if info is not None and self._processes.index == 0:
            if self._local is not None:
                self._local.take_local()  # (first: a second job on it is refused before the durable root's sweep)
            self._take_directory()  # (before anything is deleted or forgotten: another writer may hold the root)
        operation, timeout = self._operation("delete"), self._ctx.async_options.timeout_secs
        compared = self._local is not None  # (in a job, before any process deletes its local copy)
        if compared:
            self._same_step_everywhere(operation, number, timeout)
        held_locally = self._local is not None and self._local.delete(number)
        if info is None:
            if self._processes.count > 1:  # (the others compare their steps with this one's, then delete: here too,
                # so that a rank deleting another step is named on every rank, and none waits for this one)
                self._delete_everywhere(operation, number, lambda: None, timeout, f"the deletion of step {number}",
                                        compared=compared)
            if held_locally or missing_ok:
                return background.finished(held_locally)
            raise self._not_found(number)
        self._forget(number)
        self._deleting.add(number)
        primary = self._processes.index == 0

        def delete_here() -> None:  # every process forgets it; the primary deletes
            if primary:
                with self._gc_lock:
                    self._delete(info)

        def job() -> bool:  # every process returns (or raises) once the step is deleted
            try:
                self._delete_everywhere(operation, number, delete_here, timeout,
                                        f"the deletion of step {number} ({info.path})", compared=compared)
                self._deleted.add(number)
            except BaseException:
                if storage.exists(info.path):  # still there: listed again
                    with self._infos_lock:
                        self._infos = sorted([*self._infos, info], key=lambda c: c.step)
                raise
            finally:
                self._deleting.discard(number)
            return True

        self._deletion = self._writer.submit(job, what=f"the deletion of step {number} ({info.path})")
        return self._deletion

    def _delete_everywhere(self, operation: str, number: int, delete_here: Callable[[], None], timeout: float,
                           task: str, *, compared: bool = False) -> None:
        """Compares this process's step ``number`` with the others' (unless ``compared`` already), then runs
        ``delete_here`` where each process meets the others (see :func:`ckpt.distributed.settle`)."""
        if not compared:
            self._same_step_everywhere(operation, number, timeout)
        distributed.settle(self._processes, operation, delete_here, timeout, task, commits=False)

    def _same_step_everywhere(self, operation: str, number: int, timeout: float) -> None:
        """Compares this process's step ``number`` with the others' (a barrier): a ValueError on every process when
        their steps differ, before anything is deleted."""
        differ = distributed.differences(self._processes, f"{operation}/step", number, number, timeout)
        if differ:
            steps = "; ".join(f"process {i}: {step}" for i, step in sorted(differ.items()))
            raise ValueError(f"the processes of this job delete different steps ({steps}) of "
                             f"{self._directory}: every process deletes the same one; nothing was deleted")

    # ---------------------------------------------------------------------------------- metadata
    def metadata(self, step: int | CheckpointMetadata | None = None) -> CheckpointMetadata:
        """The step's metadata; ``.metadata`` is the saved ``state`` tree with :class:`ckpt.LeafMetadata` leaves.

        Example::

            ckptr.save(0, {"w": np.ones((2, 3), np.float32)})
            leaf = ckptr.metadata().metadata["w"]        # no array is read
            assert leaf.shape == (2, 3) and leaf.dtype == np.float32
        """
        return self._metadata(step, fmt.DEFAULT_CHECKPOINTABLE)

    def checkpointables_metadata(self, step: int | CheckpointMetadata | None = None) -> CheckpointMetadata:
        """The step's metadata; ``.metadata`` maps each checkpointable name to its tree of ``LeafMetadata``.

        Example::

            ckptr.save_checkpointables(0, {"model": {"w": np.ones(3)}, "data": {"epoch": 2}})
            trees = ckptr.checkpointables_metadata(0).metadata
            assert trees["model"]["w"].shape == (3,) and trees["data"]["epoch"].type == "int"
        """
        return self._metadata(step, None)

    def _metadata(self, step: int | CheckpointMetadata | None, name: str | None) -> CheckpointMetadata:
        info = self._resolve(step)
        registry = self._ctx.checkpointables_options.registry
        return self._read([info], lambda path: checkpoint_metadata(path, name, step=info.step, registry=registry))

    def root_metadata(self) -> RootMetadata:
        """The directory and the custom metadata written by the first Checkpointer given one (``{}`` if none was).

        Example::

            with ckpt.Checkpointer("runs/exp2", custom_metadata={"model": "mlp"}) as first:
                pass
            with ckpt.Checkpointer("runs/exp2", custom_metadata={"model": "cnn"}) as again:
                assert again.root_metadata().custom_metadata == {"model": "mlp"}   # the first one's
        """
        return RootMetadata(directory=self._directory,
                            custom_metadata=fmt.reported_custom_metadata(formats.root_custom_metadata(self._directory)))

    # ------------------------------------------------------------------------------- life cycle
    def is_saving_in_progress(self) -> bool:
        """True while an async save is being written (not while :meth:`delete_async` deletes a step, as in Orbax).

        Example::

            ckptr.save_async(0, {"w": np.ones(3)})
            busy = ckptr.is_saving_in_progress()         # True until step 0 is committed
            ckptr.wait()
            assert not ckptr.is_saving_in_progress()
        """
        return self._saving() or (self._local is not None and self._local.in_progress())

    def _saving(self) -> bool:
        """Whether the writer writes a save (or promotes one). A deletion it runs is no save, as in Orbax, whose
        deletions run beside its saves: a policy that waits for the save in flight saves the next step."""
        return self._writer.in_progress() and (self._deletion is None or self._deletion.done())

    def wait(self) -> None:
        """Waits for the save in flight, which goes on at full speed (not on one core) from then on;
        raises its error if it failed (once). So do ``close``, a new save, and ``result()`` of the
        save's response; a preemption notice switches it to full speed as well.

        Example::

            ckptr.save_async(0, {"w": np.ones(3)})
            ckptr.wait()                                 # step 0 is committed, or its error raised here
            assert ckptr.latest.step == 0
        """
        try:
            if self._local is not None:
                self._local.wait()  # the local save, then the promotions (after a preemption: the grace period)
            else:
                self._writer.wait(self._ctx.async_options.timeout_secs)
        except TimeoutError as e:
            waits = distributed.waited_for(self._processes)  # (a save waiting for a process that stopped)
            if not waits:
                raise
            raise distributed.ProcessesTimeoutError(
                f"{e}; it waits for {waits}: a process stopped, or does not make the same ckpt calls") from None

    def close(self) -> None:
        """Waits for the save in flight, then releases the directory (raises a background failure). A save
        still running after ``AsyncOptions.timeout_secs`` raises TimeoutError here and goes on in the
        background, holding the directory until it ends.

        Example::

            ckptr.save_async(0, {"w": np.ones(3)})
            ckptr.close()                                # what leaving a ``with`` block does
        """
        if self._closed:
            return
        gave_up = False
        try:
            self.wait()
        except TimeoutError:
            gave_up = True
            raise
        finally:
            self._closed = True
            preemption.unlisten(self)
            if self._local is not None:
                self._local.close()
            self._writer.shutdown(wait=not gave_up)  # (after a wait, what runs still: a promotion to the durable tier)
            self._staging.clear()
            if self._loader is not None:
                self._loader.shutdown(wait=True)
                self._loader = None  # (a load_async after close starts another: loading goes on working)
            self._writer.when_idle(self._lock.release)
        if sys.exc_info()[0] is None:  # (an exception ends it, with its traceback)
            preemption.end_unserved_sigterm()  # (after the last save decision: the save it was held back for never came)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this Checkpointer of {self._directory} is closed")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self._directory)!r}, steps={[c.step for c in self.checkpoints]})"

    # ---------------------------------------------------------------------- deprecated aliases
    def save_pytree(self, *args: Any, **kwargs: Any) -> bool:
        """Deprecated: use :meth:`save`.

        Example::

            ckptr.save(0, {"w": np.ones(3)})             # not ckptr.save_pytree(0, {"w": np.ones(3)})
        """
        warnings.warn("Use `save` instead.", DeprecationWarning, stacklevel=2)
        return self.save(*args, **kwargs)

    def save_pytree_async(self, *args: Any, **kwargs: Any):
        """Deprecated: use :meth:`save_async`.

        Example::

            ckptr.save_async(0, {"w": np.ones(3)})       # not ckptr.save_pytree_async(...)
        """
        warnings.warn("Use `save_async` instead.", DeprecationWarning, stacklevel=2)
        return self.save_async(*args, **kwargs)

    def load_pytree(self, *args: Any, **kwargs: Any) -> Any:
        """Deprecated: use :meth:`load`.

        Example::

            ckptr.save(0, {"w": np.ones(3)})
            state = ckptr.load(0)                        # not ckptr.load_pytree(0)
        """
        warnings.warn("Use `load` instead.", DeprecationWarning, stacklevel=2)
        return self.load(*args, **kwargs)

    def load_pytree_async(self, *args: Any, **kwargs: Any):
        """Deprecated: use :meth:`load_async`.

        Example::

            ckptr.save(0, {"w": np.ones(3)})
            state = ckptr.load_async(0).result()         # not ckptr.load_pytree_async(0)
        """
        warnings.warn("Use `load_async` instead.", DeprecationWarning, stacklevel=2)
        return self.load_async(*args, **kwargs)

    def pytree_metadata(self, *args: Any, **kwargs: Any) -> CheckpointMetadata:
        """Deprecated: use :meth:`metadata`.

        Example::

            ckptr.save(0, {"w": np.ones(3)})
            tree = ckptr.metadata(0).metadata            # not ckptr.pytree_metadata(0)
        """
        warnings.warn("Use `metadata` instead.", DeprecationWarning, stacklevel=2)
        return self.metadata(*args, **kwargs)


def check_options(*, context: Context | None = None,
                  save_decision_policy: save_decision_policies.SaveDecisionPolicy | None = None,
                  preservation_policy: preservation_policies.PreservationPolicy | None = None,
                  step_name_format: step_lib.NameFormat | None = None,
                  local: tiers.LocalCheckpointOptions | None = None) -> None:
    """Raises TypeError naming the first of these :class:`Checkpointer` arguments that is not of its kind
    (a dict where a policy belongs, a policy's class instead of an instance); None stands for the default.

    Example::

        try:
            check_options(save_decision_policy=save_decision_policies.FixedIntervalPolicy)   # the class
        except TypeError as e:
            assert "save_decision_policy" in str(e)
    """
    for name, value, kind in (("save_decision_policy", save_decision_policy, save_decision_policies.SaveDecisionPolicy),
                              ("preservation_policy", preservation_policy, preservation_policies.PreservationPolicy),
                              ("step_name_format", step_name_format, step_lib.NameFormat)):
        if value is not None and not (kind is step_lib.NameFormat and not isinstance(value, type)
                                      and isinstance(value, step_lib.OrbaxNameFormat)):
            arguments.implements(value, kind, name)
    for name, value, cls in (("context", context, Context), ("local", local, tiers.LocalCheckpointOptions)):
        if value is not None:
            arguments.instance_of(value, cls, name)


def checkpoint_metadata(step_dir: storage.Location, name: str | None, *, step: int | None = None,
                        registry: Any = None) -> CheckpointMetadata:
    """Metadata of one step directory: one checkpointable's tree (``name``) or all of them (None); a
    checkpointable saved by a handler is what its handler's ``metadata`` says (``registry``: the handlers)."""
    manifest = formats.info(step_dir)
    handled = formats.handled(step_dir)
    if name == fmt.AUTO and fmt.DEFAULT_CHECKPOINTABLE in handled:  # (a tree named state: loading.only_tree)
        name = fmt.DEFAULT_CHECKPOINTABLE
    if name is None:
        tree = {**formats.metadata_trees(step_dir), **custom.metadata(step_dir, handled, registry)}
    elif name in handled:
        tree = custom.metadata(step_dir, {name: handled[name]}, registry)[name]
    else:
        try:
            doc = formats.trees(step_dir, [name])[name]
        except KeyError:
            only = loading.only_tree(formats.trees(step_dir), handled, [name])
            if only is None:
                raise
            doc = formats.trees(step_dir, [only])[only]
        tree = loading.tree_metadata(doc)
    return _step_metadata(step if step is not None else formats.step_of(step_dir, manifest), step_dir, manifest, metadata=tree)


def _step_metadata(step: int, path: storage.Location, manifest: dict, monotonic_nsecs: int | None = None,
                   metadata: Any = None) -> CheckpointMetadata:
    """The CheckpointMetadata of a step from its manifest (see :func:`ckpt.formats.info`)."""
    return CheckpointMetadata(step, path, metadata=metadata, metrics=fmt.decode_json(manifest, "metrics"),
                              monotonic_nsecs=monotonic_nsecs, init_timestamp_nsecs=manifest.get("init_timestamp_nsecs"),
                              commit_timestamp_nsecs=manifest.get("commit_timestamp_nsecs"),
                              custom_metadata=fmt.reported_custom_metadata(fmt.decode_json(manifest, "custom_metadata")))


def _saved_alone(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of ``ckpt.save`` (its manifest names no step: ``best_10``), which no
    Checkpointer wrote as a step."""
    try:
        manifest = formats.info(path)
    except (errors.CheckpointCorruptedError, OSError):
        return False
    return manifest.get("format") == "ckpt" and manifest.get("step") is None


def _as_call(name_format: step_lib.StandardNameFormat) -> str:
    """``standard_name_format(step_prefix='step', step_format_fixed_length=4)``: the call that makes ``name_format``."""
    given = {"step_prefix": name_format.step_prefix, "step_format_fixed_length": name_format.step_format_fixed_length}
    return "standard_name_format(" + ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None) + ")"
