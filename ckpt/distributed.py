"""Which process this is, and how the processes of one job agree: barriers and one shared decision.

A single process needs none of this. Under ``jax.distributed`` (detected when jax is imported and
its distributed client runs with more than one process) the coordination service's key-value store
provides barriers and broadcasts; under ``torch.distributed`` (initialized with more than one rank,
and JAX's not running) the key-value store of its default process group does (a ``TCPStore``: every
launcher's ``env://`` and ``tcp://`` initialization makes one). Barriers and broadcasts are named, so a
background save's barriers never mix with the training loop's decisions, nor with the training's own
collectives. Other engines plug in any object with this interface through
``ckpt.MultiprocessingOptions(processes=...)``.

Example::

    processes = ckpt.distributed.current()       # JaxProcesses, TorchProcesses, or SingleProcess
    print(f"process {processes.index} of {processes.count}")
"""
from __future__ import annotations

import contextlib
import datetime
import json
import socket
import sys
import threading
from typing import Any, Callable, Iterator, Protocol, runtime_checkable


@runtime_checkable
class Processes(Protocol):
    """The processes of one job that call the same Checkpointer methods in the same order.

    An object may also have ``compare(name, key, value, timeout_secs) -> dict[int, Any]`` (ckpt's own
    have it): it compares every process's JSON ``key`` with the primary's and returns, on every process
    alike, ``{index: value}`` of the processes whose key differs, with the primary's own ``value`` at 0,
    or ``{}`` when all agree; and returns only once every process called it, as a barrier. Saves use it
    to refuse trees that differ between processes; without it they are not compared. And it may have
    ``notice(name, here) -> bool`` (see :meth:`TorchProcesses.notice`), through which a preemption seen by
    one process only reaches the primary's save decisions, ``waiting() -> list[str]`` (see :func:`waited_for`),
    and ``broadcast_once(name, value, timeout_secs) -> Any`` (see :func:`broadcast_once`).
    A single process with ``partial = True`` (see
    :class:`OwnPart`) saves its own shards of arrays spread over processes, which others refuse.

    Example::

        processes = ckpt.distributed.current()
        assert isinstance(processes, ckpt.distributed.Processes)   # so is any object with these members
        ctx = ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=processes))
    """

    index: int
    count: int

    def barrier(self, name: str, timeout_secs: float) -> None:
        """Returns once every process reached the barrier ``name``."""

    def broadcast(self, name: str, value: Any, timeout_secs: float) -> Any:
        """Returns the primary process's JSON ``value`` on every process."""



class ProcessesTimeoutError(TimeoutError):
    """A wait for the other processes of a job (a barrier, a broadcast, a save waiting for them) that gave up after
    the timeout: a process stopped, or does not make the same ckpt calls. Meeting the others again would wait for the
    same process: :func:`settle` raises it at once.

    Example::

        def part() -> None:                              # e.g. a save waiting for the one before it, which gave up
            raise ckpt.distributed.ProcessesTimeoutError("rank 0 of 2 waited 600 s for the other ranks at 'save/1'")
        one = ckpt.distributed.SingleProcess()           # in a job: ckpt.distributed.current()
        try:
            ckpt.distributed.settle(one, "save/2", part, 600, "the save of step 2")
        except TimeoutError as e:                        # at once, where a meeting would wait 600 s again
            print(f"a process of the job stopped: {e}")
    """


class SingleProcess:
    """The default: one process, no coordination.

    Example::

        one = ckpt.distributed.SingleProcess()
        assert (one.index, one.count) == (0, 1) and one.broadcast("decision", [True], 60) == [True]
    """

    index = 0
    count = 1

    def barrier(self, name: str, timeout_secs: float) -> None:
        return None

    def broadcast(self, name: str, value: Any, timeout_secs: float) -> Any:
        return value

    def compare(self, name: str, key: Any, value: Any, timeout_secs: float) -> dict[int, Any]:
        return {}


class OwnPart(SingleProcess):
    """One process of a job saving its own part of the job's state alone (its local tier, see
    :mod:`ckpt.tiers`): of an array spread over the job's processes, its steps hold this process's shards
    only, which a step that every process saves puts together. (:class:`SingleProcess` refuses such an
    array: a step that lacks some of its shards cannot be loaded.)

    Example::

        part = ckpt.distributed.OwnPart()             # what a local tier of a multi-process job saves with
        assert (part.index, part.count, part.partial) == (0, 1, True)
    """

    partial = True


class JaxProcesses:
    """Coordination through the JAX distributed service (``jax.distributed.initialize``).

    Example::

        jax.distributed.initialize()                     # in every process of the job
        processes = ckpt.distributed.current()           # a JaxProcesses; Checkpointers find it themselves
        assert (processes.index, processes.count) == (jax.process_index(), jax.process_count())
    """

    def __init__(self, client: Any, index: int, count: int):
        self._client = client
        self._announced: set[str] = set()  # (see notice)
        self._waits = _Waits()
        self.index = index
        self.count = count

    def waiting(self) -> list[str]:
        """What this process's threads wait for now (see :func:`waited_for`)."""
        return self._waits.described()

    def notice(self, name: str, here: bool) -> bool:
        """As :meth:`TorchProcesses.notice`, through the service's key-value directory ``ckpt:notice/<name>``
        (JAX's own preemption service carries a SIGTERM; this carries ``ckpt.preemption.notify()``)."""
        key = f"ckpt:notice/{name}"
        if self.index != 0:
            if _announces(self._announced, name, here):
                self._client.key_value_set(f"{key}/{self.index}", "1", allow_overwrite=True)
            return False
        if not self._client.key_value_dir_get(key):
            return False
        self._client.key_value_delete(key)  # (with the keys under it)
        return True

    def barrier(self, name: str, timeout_secs: float) -> None:
        with self._timeout(f"the other processes at {name!r}", timeout_secs):
            self._client.wait_at_barrier(f"ckpt:{name}", int(timeout_secs * 1000))

    def broadcast(self, name: str, value: Any, timeout_secs: float) -> Any:
        key = f"ckpt:{name}"
        if self.index == 0:
            self._client.key_value_set(key, json.dumps(value))
            return value
        with self._timeout(f"process 0's {name!r}", timeout_secs):
            return json.loads(self._client.blocking_key_value_get(key, int(timeout_secs * 1000)))

    @contextlib.contextmanager
    def _timeout(self, what: str, timeout_secs: float) -> Iterator[None]:
        """Turns the JAX service's timeout (an XlaRuntimeError saying DEADLINE_EXCEEDED) into ckpt's TimeoutError."""
        try:
            with self._waits.on(what):
                yield
        except Exception as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
            raise _timed_out("process", self, what, timeout_secs, e) from None

    def broadcast_once(self, name: str, value: Any, timeout_secs: float) -> Any:
        """As :meth:`broadcast`; where the primary published ``name`` before, that first value (see :func:`broadcast_once`)."""
        if self.index != 0:
            return self.broadcast(name, value, timeout_secs)
        try:
            self._client.key_value_set(f"ckpt:{name}", json.dumps(value))
            return value
        except Exception as e:
            if "ALREADY_EXISTS" not in str(e):
                raise
        with self._timeout(f"process 0's {name!r}", timeout_secs):
            return json.loads(self._client.blocking_key_value_get(f"ckpt:{name}", int(timeout_secs * 1000)))

    def compare(self, name: str, key: Any, value: Any, timeout_secs: float) -> dict[int, Any]:
        if self.broadcast(f"{name}/key", key, timeout_secs) != key:
            self._client.key_value_set(f"ckpt:{name}/differ/{self.index}", json.dumps(value))
        self.barrier(f"{name}/compared", timeout_secs)
        differ = self._client.key_value_dir_get(f"ckpt:{name}/differ/")
        if not differ:
            return {}
        out = {0: self.broadcast(f"{name}/primary", value, timeout_secs)}
        out.update((int(k.rsplit("/", 1)[1]), json.loads(v)) for k, v in differ)
        return out


class TorchProcesses:
    """Coordination through the key-value store of ``torch.distributed``'s default process group.

    Each thread talks to the store through a connection of its own: a store client serves one
    request at a time, so a background save waiting at a barrier would hold up the training
    thread's next decision on a shared one. ``server``: the default group's store object, kept while
    this object lives: where the store runs in this process (rank 0's), a save still in flight at
    ``destroy_process_group()`` (the end of a script) still reaches the other ranks.

    Example::

        torch.distributed.init_process_group("gloo")    # in every rank (torchrun, Lightning, ...)
        processes = ckpt.distributed.current()           # a TorchProcesses; Checkpointers find it themselves
        assert (processes.index, processes.count) == (torch.distributed.get_rank(), torch.distributed.get_world_size())
    """

    def __init__(self, host: str, port: int, index: int, count: int, server: Any = None):
        self._address = (host, port)
        self._server = server
        self._local = threading.local()
        self._announced: set[str] = set()  # (see notice)
        self._waits = _Waits()
        self.index = index
        self.count = count

    def waiting(self) -> list[str]:
        """What this rank's threads wait for now, with the ranks that never arrived (see :func:`waited_for`)."""
        return self._waits.described()

    def _store(self, timeout_secs: float = 300) -> Any:
        """This thread's connection to the store, opened on its first request."""
        store = getattr(self._local, "store", None)
        if store is None:
            import torch.distributed as dist

            # The store was up when the job began: a connection refused (or unanswered) now is its process
            # stopped, which TCPStore's connection would retry for its whole timeout (300 s, whatever timeout_secs).
            try:
                socket.create_connection(self._address, timeout=timeout_secs).close()
            except OSError as e:
                raise dist.DistNetworkError(f"no connection to {self._address[0]}:{self._address[1]}: {e}") from None
            client = dist.TCPStore(*self._address, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=min(timeout_secs, 300)))
            store = self._local.store = dist.PrefixStore("ckpt", client)
        return store

    @contextlib.contextmanager
    def _waiting(self, what: str, timeout_secs: float, absent: Callable[[], str] | None = None) -> Iterator[None]:
        """Turns the store's errors into ckpt's, naming ``what`` this rank waited for: a lost connection (the
        process that keeps the store, rank 0's or the launcher's, stopped) into ConnectionError, at once; a
        timeout (torch's DistStoreError) into TimeoutError, saying which ranks never arrived (``absent``)."""
        import torch.distributed as dist

        try:
            with self._waits.on(what, absent):
                yield
        except dist.DistNetworkError as e:
            raise ConnectionError(
                f"rank {self.index} of {self.count} lost the job's store (kept by rank 0's process, or by the "
                f"launcher's) while it waited for {what}: that process stopped ({e})") from None
        except dist.DistStoreError as e:
            raise _timed_out("rank", self, _with_absent(what, absent), timeout_secs, e) from None

    def barrier(self, name: str, timeout_secs: float) -> None:
        # Each rank adds its own bit to the count of arrivals where the ranks fit in its 63 bits, so that a
        # rank timing out can name the ranks that never arrived.
        named = self.count <= 63
        arrived = f"{name}/arrived"
        with self._waiting(f"the other ranks at {name!r}", timeout_secs, lambda: self._absent(arrived, named)):
            store = self._store(timeout_secs)
            if store.add(arrived, 1 << self.index if named else 1) == ((1 << self.count) - 1 if named else self.count):
                store.set(f"{name}/done", b"1")
                return  # (the last to arrive: rank 0, let go, may end with the store it keeps at once)
            store.wait([f"{name}/done"], datetime.timedelta(seconds=timeout_secs))

    def _absent(self, arrived: str, named: bool) -> str:
        """Which ranks have not added themselves to the count ``arrived`` of a barrier, or how many ('' when the
        store does not answer)."""
        try:
            count = self._store().add(arrived, 0)
        except RuntimeError:  # (torch's store errors)
            return ""
        if not named:
            return f"{self.count - count} of {self.count} ranks never arrived"
        absent = [str(i) for i in range(self.count) if not count >> i & 1]
        return f"rank{'s' if len(absent) > 1 else ''} {', '.join(absent)} never arrived"

    def broadcast(self, name: str, value: Any, timeout_secs: float) -> Any:
        with self._waiting(f"rank 0's {name!r}", timeout_secs):
            store = self._store(timeout_secs)
            if self.index == 0:
                store.set(name, json.dumps(value))
                return value
            store.wait([name], datetime.timedelta(seconds=timeout_secs))
            return json.loads(store.get(name))

    def broadcast_once(self, name: str, value: Any, timeout_secs: float) -> Any:
        """As :meth:`broadcast`; where the primary published ``name`` before, that first value (see :func:`broadcast_once`)."""
        if self.index != 0:
            return self.broadcast(name, value, timeout_secs)
        with self._waiting(f"rank 0's {name!r}", timeout_secs):  # (no value is ever empty: b"" stands for none)
            return json.loads(self._store(timeout_secs).compare_set(name, b"", json.dumps(value)))

    def notice(self, name: str, here: bool) -> bool:
        """Carries a notice one rank may get alone (a SIGTERM to the ranks of one node) to the primary, which
        decides for all. Elsewhere: announces ``here`` once (again after a call without it: a new notice),
        and returns False. On the primary: whether another rank announced one since it last asked (it is
        taken). One store request a call on the primary, whose process holds the store."""
        store = self._store()
        key = f"notice/{name}"
        if self.index != 0:
            if _announces(self._announced, name, here):
                store.set(key, str(self.index))
            return False
        if not store.check([key]):
            return False
        store.delete_key(key)
        return True

    def compare(self, name: str, key: Any, value: Any, timeout_secs: float) -> dict[int, Any]:
        import torch.distributed as dist

        differs = self.broadcast(f"{name}/key", key, timeout_secs) != key  # (opens this thread's connection)
        store = self._store()
        if differs:
            slot = store.add(f"{name}/differ", 1)
            store.set(f"{name}/differ/{slot}", json.dumps([self.index, value]))
        self.barrier(f"{name}/compared", timeout_secs)
        try:
            count = store.add(f"{name}/differ", 0)
        except dist.DistNetworkError:
            if not self.index:
                raise
            # Where the store is rank 0's, rank 0 may end as soon as it passed the barrier when no process differs (the
            # meeting of a save that stays local, or of a deletion, is a job's last request); where one does, it waits
            # for every rank's read below. Its store gone here, none differs (or it was killed: a later request of this
            # rank meets the loss)
            return {}
        if not count:
            return {}
        out = {0: self.broadcast(f"{name}/primary", value, timeout_secs)}
        out.update(json.loads(store.get(f"{name}/differ/{slot}")) for slot in range(1, count + 1))
        # Where the store is rank 0's, rank 0 returns (raises the difference, and may end) once every rank read it; a
        # rank that read it needs the store no more (its wait may end as rank 0's process does)
        with contextlib.suppress(ConnectionError) if self.index else contextlib.nullcontext():
            self.barrier(f"{name}/read", timeout_secs)
        return out


_calls: dict[str, int] = {}  # (see call_number)
_calls_lock = threading.Lock()


def call_number(processes: Processes, what: str) -> int:
    """How many times before this process called ``what`` (a Checkpointer opened on a directory, a free
    save) with several processes: the same in every process, as they make the same calls, so
    that barrier names made with it are new at each call (a barrier's name once passed may not be used
    again) and alike in every process. Calls of one process alone are not counted: a process may make
    them without the others.

    Example::

        one = ckpt.distributed.SingleProcess()
        assert ckpt.distributed.call_number(one, "open runs/exp1") == 0   # one process: never counted
    """
    if processes.count == 1:
        return 0
    with _calls_lock:
        number = _calls[what] = _calls.get(what, -1) + 1
    return number


def settle(processes: Processes, name: str, part: Callable[[], None], timeout_secs: float, task: str, *,
           commits: bool = True) -> None:
    """Runs this process's ``part`` of ``task`` (in words, for the error: "the save of runs/exp1/7"), then
    meets the other processes at the barrier ``name``, where each says whether its part failed. A failure
    anywhere raises on every process at once (its own error where it failed, a RuntimeError naming the
    failed processes and their errors elsewhere, which says that nothing was committed when the task
    ``commits``, as a save does and a deletion does not): none waits for the timeout, and none goes on to
    commit what another failed to write. A part that gave up waiting for the processes
    (:class:`ProcessesTimeoutError`: the save before, waited for, met a process that stopped) raises at once, without
    meeting them: they would be waited for as long again. (A Processes object without ``compare``: a failed process
    raises at once, the others at the timeout.)

    Example::

        copied = []
        one = ckpt.distributed.SingleProcess()          # in a job: ckpt.distributed.current()
        ckpt.distributed.settle(one, "copy/7", lambda: copied.append(7), 600, "the copy of step 7")
        assert copied == [7]                             # (and every process's part succeeded)
    """
    compare = getattr(processes, "compare", None)
    if processes.count == 1 or compare is None:
        part()
        if processes.count > 1:
            processes.barrier(name, timeout_secs)
        return
    try:
        part()
        failure = None
    except ProcessesTimeoutError:
        raise  # (it gave up waiting for a process, for which the meeting would wait as long again)
    except Exception as e:
        failure = e
    said = None if failure is None else f"{type(failure).__name__}: {failure}"
    failed = {i: why for i, why in compare(name, said is not None, said, timeout_secs).items() if why is not None}
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"{task} failed in another process ("
                           + "; ".join(f"process {i}: {why}" for i, why in sorted(failed.items()))
                           + ("); nothing was committed" if commits else ")"))


def broadcast_once(processes: Processes, name: str, value: Any, timeout_secs: float) -> Any:
    """The primary's JSON ``value`` on every process, as ``processes.broadcast``; but where the primary published
    ``name`` before, every process gets the value published first (the primary's ``value`` now is dropped): a
    question asked again under one name gets one answer everywhere. (A round trip to the primary's store where
    ``broadcast`` has none: for names that may have been published only.) A Processes object without
    ``broadcast_once``: its ``broadcast``.

    Example::

        one = ckpt.distributed.SingleProcess()          # in a job: ckpt.distributed.current()
        assert ckpt.distributed.broadcast_once(one, "decision/7", [False], 600) == [False]
    """
    once = getattr(processes, "broadcast_once", None)
    return (processes.broadcast if once is None else once)(name, value, timeout_secs)


def differences(processes: Processes, name: str, key: Any, value: Any, timeout_secs: float) -> dict[int, Any]:
    """``{index: value}`` of the processes whose JSON ``key`` differs from the primary's, with the primary's
    own ``value`` at 0, or ``{}`` when all agree (see :class:`Processes`); a barrier named ``name``. One
    process, or a Processes object without ``compare`` (whose processes are not compared): ``{}``.

    Example::

        one = ckpt.distributed.SingleProcess()          # in a job: ckpt.distributed.current()
        assert ckpt.distributed.differences(one, "root", "runs/exp1", "runs/exp1", 600) == {}
    """
    if processes.count == 1:
        return {}
    compare = getattr(processes, "compare", None)
    if compare is None:
        processes.barrier(name, timeout_secs)
        return {}
    return compare(name, key, value, timeout_secs)


class _Waits:
    """The waits for other processes in progress in this process's threads, to name them where another thread
    gives up on them (:func:`waited_for`)."""

    def __init__(self) -> None:
        self._now: dict[int, tuple[str, Callable[[], str] | None]] = {}

    @contextlib.contextmanager
    def on(self, what: str, absent: Callable[[], str] | None = None) -> Iterator[None]:
        """Records the wait for ``what`` (and how to say who never arrived) while the block runs."""
        thread = threading.get_ident()
        self._now[thread] = (what, absent)
        try:
            yield
        finally:
            self._now.pop(thread, None)

    def described(self) -> list[str]:
        return [_with_absent(what, absent) for what, absent in list(self._now.values())]


def _with_absent(what: str, absent: Callable[[], str] | None) -> str:
    """``what`` a process waits for, with who never arrived (``absent()``, where known)."""
    absentees = "" if absent is None else absent()
    return what + (f" ({absentees})" if absentees else "")


def waited_for(processes: Processes) -> str:
    """What this process's threads wait for now from the others (a barrier, a broadcast), in words, naming the
    processes that never arrived where the engine tells: what a save that runs too long waits for. '' where none
    waits, or ``processes`` cannot tell (it has no ``waiting()``).

    Example::

        one = ckpt.distributed.SingleProcess()          # in a job: ckpt.distributed.current()
        assert ckpt.distributed.waited_for(one) == ""
    """
    waiting = getattr(processes, "waiting", None)
    return "" if waiting is None else "; ".join(waiting())


def _announces(announced: set[str], name: str, here: bool) -> bool:
    """Whether a process other than the primary announces the notice ``name`` now: it has it (``here``) and
    has not announced it since a call without it (``announced``: the names announced, kept up to date)."""
    if not here:
        announced.discard(name)
        return False
    if name in announced:
        return False
    announced.add(name)
    return True


def noticed_elsewhere(processes: Processes, name: str, here: bool) -> bool:
    """Whether, on the primary, another process announced the notice ``name`` (a preemption it saw alone);
    ``here``: whether this process has it (announced, elsewhere). False where ``processes`` cannot carry
    notices (see :class:`Processes`).

    Example::

        one = ckpt.distributed.SingleProcess()
        assert not ckpt.distributed.noticed_elsewhere(one, "preemption", here=True)
    """
    notice = getattr(processes, "notice", None)
    return notice is not None and notice(name, here)


def _timed_out(member: str, processes: Processes, what: str, timeout_secs: float,
               error: BaseException) -> ProcessesTimeoutError:
    """The error of a barrier or broadcast that waited ``timeout_secs`` for ``what`` in vain (``member``:
    what the engine calls a process)."""
    return ProcessesTimeoutError(
        f"{member} {processes.index} of {processes.count} waited {timeout_secs:g} s for {what}; a {member} stopped, "
        f"or does not make the same ckpt calls: every {member} calls a Checkpointer's methods and ckpt.save alike (to "
        f"save from one {member} alone, save inside ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions("
        f"processes=ckpt.distributed.SingleProcess()))) ({error})")


def _torch_store(dist: Any) -> Any:
    """The TCPStore of the default process group; ValueError for any other store."""
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        raise ValueError(
            f"torch.distributed's default process group keeps its keys in a {type(store).__name__}, not a "
            "TCPStore, which ckpt coordinates its ranks through: initialize it with init_method='env://' or "
            "'tcp://...', or pass ckpt.MultiprocessingOptions(processes=...)")
    return store


def current() -> Processes:
    """The JAX processes when jax.distributed runs with several processes, else the torch.distributed
    ranks when its default process group has several, else a single process.

    Example::

        processes = ckpt.distributed.current()
        if processes.index == 0:
            print("the primary process: it commits the steps")
    """
    jax = sys.modules.get("jax")
    if jax is not None:
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
        if client is not None and jax.process_count() > 1:
            return JaxProcesses(client, jax.process_index(), jax.process_count())
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        store = _torch_store(dist)
        return TorchProcesses(store.host, store.port, dist.get_rank(), dist.get_world_size(), server=store)
    return SingleProcess()
