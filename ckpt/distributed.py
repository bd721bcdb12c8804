"""Which process this is, and how the processes of one job agree: barriers and one shared decision.

A single process needs none of this. Under ``jax.distributed`` (detected when jax is imported and
its distributed client runs with more than one process) the coordination service's key-value store
provides barriers and broadcasts. Other engines (torch.distributed for Lightning DDP) plug in any
object with this interface through ``ckpt.MultiprocessingOptions(processes=...)``.

Example::

    processes = ckpt.distributed.current()       # JaxProcesses under jax.distributed, else SingleProcess
    print(f"process {processes.index} of {processes.count}")
"""
from __future__ import annotations

import json
import sys
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Processes(Protocol):
    """The processes of one job that call the same Checkpointer methods in the same order.

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


class JaxProcesses:
    """Coordination through the JAX distributed service (``jax.distributed.initialize``).

    Example::

        jax.distributed.initialize()                     # in every process of the job
        processes = ckpt.distributed.current()           # a JaxProcesses; Checkpointers find it themselves
        assert (processes.index, processes.count) == (jax.process_index(), jax.process_count())
    """

    def __init__(self, client: Any, index: int, count: int):
        self._client = client
        self.index = index
        self.count = count

    def barrier(self, name: str, timeout_secs: float) -> None:
        self._client.wait_at_barrier(f"ckpt:{name}", int(timeout_secs * 1000))

    def broadcast(self, name: str, value: Any, timeout_secs: float) -> Any:
        key = f"ckpt:{name}"
        if self.index == 0:
            self._client.key_value_set(key, json.dumps(value))
            return value
        return json.loads(self._client.blocking_key_value_get(key, int(timeout_secs * 1000)))


def current() -> Processes:
    """The JAX processes when jax.distributed runs with several processes, else a single process.

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
    return SingleProcess()
