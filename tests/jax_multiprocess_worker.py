"""One process of a 2-process JAX job on 127.0.0.1 (used by tests/test_distributed_jax.py).

usage: jax_multiprocess_worker.py PORT PROCESS_ID DIR MODE   (MODE: save | resume | tiers | preempt | notice | metric)
"""
import faulthandler
import os
import sys

faulthandler.dump_traceback_later(90, exit=True)  # a hang ends with every thread's stack, not a silent timeout
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

port, pid, directory, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60)

import ckpt  # noqa: E402
from ckpt.training import Checkpointer, save_decision_policies as sdp  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("x",))
rows = NamedSharding(mesh, P("x"))
cols = NamedSharding(mesh, P(None, "x"))
SHAPE = (8, 12)


def expected(step: int) -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) * step


def state(step: int) -> dict:
    full = expected(step)
    w = jax.make_array_from_callback(SHAPE, rows, lambda index: full[index])
    return {"w": w, "bias": np.full(3, step, np.int32), "step": step}


policy = sdp.FixedIntervalPolicy(1)


def check_restored(restored: dict, step: int, sharding) -> None:
    assert restored["w"].sharding == sharding
    for shard in restored["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected(step)[shard.index])
    np.testing.assert_array_equal(restored["bias"], np.full(3, step, np.int32))
    assert restored["step"] == step


class PerProcess:
    """A StatefulCheckpointable of which every process writes a file of its own, its directory made at once."""

    def __init__(self, n: int):
        self.n = n

    async def save(self, directory):
        path = await directory.await_creation()
        (path / f"process_{pid}").write_text(str(self.n))

        async def done():
            pass
        return done()

    async def load(self, directory):
        async def read():
            self.n = int((directory / f"process_{pid}").read_text())
        return read()


def save_custom(ckptr: Checkpointer, steps: list[int]) -> None:
    """Saves (sync, then async) and loads back a handler's checkpointable, a stateful one and the state,
    with a storage dtype: the shards of the spread array are cast by the process that writes them."""
    import ckpt
    from tests.test_custom_checkpointables import AbstractVocab, Vocab, VocabHandler

    ctx = ckpt.Context()
    ctx.checkpointables.registry = ckpt.handlers.local_registry().add(VocabHandler)
    ctx.array.saving.storage_options.dtype = jax.numpy.bfloat16
    with ctx:
        for step, save in zip(steps, (ckptr.save_checkpointables, ckptr.save_checkpointables_async)):
            saved = save(step, {"state": state(step), "vocab": Vocab([str(step)]), "counter": PerProcess(10 * step + pid)})
            assert saved is True or saved.result(timeout=60)
        for step in steps:
            counter, abstract = PerProcess(0), jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=cols)
            loaded = ckptr.load_checkpointables(step, {"state": {"w": abstract, "bias": np.zeros(3, np.int32), "step": 0},
                                                       "vocab": AbstractVocab(), "counter": counter})
            assert loaded["vocab"] == Vocab([str(step)]) and counter.n == 10 * step + pid
            assert ckptr.metadata(step).metadata["w"].dtype == jax.numpy.bfloat16
            w = loaded["state"]["w"]
            assert w.sharding == cols and w.dtype == np.float32
            for shard in w.addressable_shards:
                want = expected(step).astype(jax.numpy.bfloat16).astype(np.float32)[shard.index]
                np.testing.assert_array_equal(np.asarray(shard.data), want)


if mode == "preempt":  # a SIGTERM to process 1 alone: every process saves at JAX's preemption sync point
    import signal
    import time

    only_preemption = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000), sdp.PreemptionCheckpointingPolicy()])
    with Checkpointer(directory, save_decision_policy=only_preemption) as ckptr:
        for step in range(1, 60):
            if step == 3 and pid == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            ckptr.save(step, {"v": jax.numpy.arange(4.0) * step})  # on this process's own first device
            if ckptr.reached_preemption(step):
                break
            time.sleep(0.05)
        print(f"process {pid} stopped at {step} steps {[c.step for c in ckptr.checkpoints]}", flush=True)
        loaded = ckptr.load(step)["v"]  # no abstract tree: on this process's default device, as jax puts arrays
        assert loaded.devices() == {jax.local_devices()[0]}, loaded.devices()
        np.testing.assert_array_equal(np.asarray(loaded), np.arange(4.0) * step)
        print(f"process {pid} loaded on its own device", flush=True)
        if pid == 0:  # a save process 1 does not make: a bounded wait, then ckpt's TimeoutError
            try:
                with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=2)):
                    ckptr.save(step + 1, {"v": np.zeros(2)}, force=True)
            except TimeoutError as e:
                print(f"process 0 timed out: {e}", flush=True)
    with Checkpointer(directory) as ckptr:  # opened again in the same job: its barriers are new ones
        if pid == 0:  # should_save on process 0 alone (to log), a step asked again after another
            print(f"process 0 asked {[ckptr.should_save(step) for step in (101, 102, 101)]}", flush=True)
        ckptr.save(100, {"v": np.zeros(2)})  # (decided as the first Checkpointer's first save was)
        print(f"process {pid} reopened and saved {[c.step for c in ckptr.checkpoints][-1]}", flush=True)
    sys.exit(0)

if mode == "notice":  # ckpt.preemption.notify() on process 1 alone: every process saves the same step
    from jax.experimental import multihost_utils

    only_preemption = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000), sdp.PreemptionCheckpointingPolicy()])
    with Checkpointer(directory, save_decision_policy=only_preemption) as ckptr:
        for step in range(1, 60):
            if step == 3 and pid == 1:
                ckpt.preemption.notify()  # a maintenance notice seen on process 1's host alone
            ckptr.save(step, {"v": np.full(2, step)})
            if ckptr.reached_preemption(step):
                break
            multihost_utils.sync_global_devices(f"step {step}")  # (a training step's all-reduce)
        print(f"process {pid} noticed at {step} steps {[c.step for c in ckptr.checkpoints]}", flush=True)
    sys.exit(0)

if mode == "metric":  # the Flax hook, given a metric sharded over both processes, and a replicated one
    from ckpt.integrations.flax import CheckpointHook

    loss = jax.jit(lambda: jax.numpy.float32(0.5), out_shardings=NamedSharding(mesh, P()))()
    with Checkpointer(directory, save_decision_policy=policy) as ckptr:
        hook = CheckpointHook(ckptr, final_step=2)
        try:
            hook(1, state(1), {"loss": loss, "vec": state(1)["w"]})
        except ValueError as e:
            print(f"process {pid} refused: {e} steps {[c.step for c in ckptr.checkpoints]}", flush=True)
        stopped = hook(2, state(2), {"loss": loss})
        print(f"process {pid} stopped {stopped} metrics {[(c.step, c.metrics) for c in ckptr.checkpoints]}", flush=True)
    sys.exit(0)

if mode == "tiers":  # two tiers: each process's local tier, then process 1's host is replaced
    import shutil

    import ckpt

    def tiered() -> Checkpointer:
        return Checkpointer(f"{directory}/durable", save_decision_policy=sdp.FixedIntervalPolicy(2),
                            local=ckpt.LocalCheckpointOptions(f"{directory}/local", save_decision_policy=policy))

    with tiered() as ckptr:
        for step in (1, 2, 3):
            ckptr.save(step, state(step))
        try:  # a leaf one process alone holds (each local tier saved its own tree, and process 0's was promoted)
            ckptr.save(4, {**state(4), f"only{pid}": 1})
        except ckpt.errors.TreeMismatchError as e:
            print(f"process {pid} step 4 refused: {e.differences}", flush=True)
        print(f"process {pid} lists {[(c.step, sorted(c.locations)) for c in ckptr.checkpoints]}", flush=True)
    if pid == 1:
        shutil.rmtree(f"{directory}/local/process_1")
    with tiered() as ckptr:
        abstract = {"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=cols), "bias": np.zeros(3, np.int32), "step": 0}
        check_restored(ckptr.load(abstract_state=abstract), ckptr.latest.step, cols)
        print(f"process {pid} restored {ckptr.latest.step}", flush=True)
    sys.exit(0)

with Checkpointer(directory, save_decision_policy=policy) as ckptr:
    assert jax.process_count() == 2
    if mode == "save":
        ckptr.save(1, state(1))
        ckptr.save_async(2, state(2), metrics={"loss": 0.5}).result(timeout=60)
        print(f"process {pid} saved {[c.step for c in ckptr.checkpoints]}", flush=True)
        s3 = state(3)
        ckptr.save_async(3, s3)
        print(f"process {pid} saving 3", flush=True)
        ckptr.wait()
        print(f"process {pid} idle", flush=True)
        import time
        time.sleep(600)  # the test kills the job here
    else:
        latest = ckptr.latest.step
        for sharding in (rows, cols):
            abstract = {"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding), "bias": np.zeros(3, np.int32),
                        "step": 0}
            check_restored(ckptr.load(abstract_state=abstract), latest, sharding)
        assert ckptr.should_save(latest + 1)
        ckptr.save(latest + 1, state(latest + 1))
        print(f"process {pid} resumed from {latest} steps {[c.step for c in ckptr.checkpoints]}", flush=True)
        save_custom(ckptr, [latest + 2, latest + 3])
        print(f"process {pid} saved custom checkpointables {[c.step for c in ckptr.checkpoints][-2:]}", flush=True)
        # typed PRNG keys split over both processes, and one replicated (a TrainState's rng)
        data = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), 4)))
        keys = jax.random.wrap_key_data(jax.make_array_from_callback(data.shape, rows, lambda index: data[index]))
        rng = jax.jit(lambda: jax.random.key(1), out_shardings=NamedSharding(mesh, P()))()
        ckptr.save(latest + 4, {"keys": keys, "rng": rng}, force=True)
        for sharding in (rows, NamedSharding(mesh, P())):
            restored = ckptr.load(latest + 4, {"keys": jax.ShapeDtypeStruct((4,), keys.dtype, sharding=sharding),
                                               "rng": jax.ShapeDtypeStruct((), rng.dtype, sharding=rng.sharding)})
            assert restored["keys"].sharding.is_equivalent_to(sharding, 1)
            assert restored["rng"].sharding.is_equivalent_to(rng.sharding, 0)
            for shard in restored["keys"].addressable_shards:
                np.testing.assert_array_equal(jax.random.key_data(shard.data), data[shard.index])
        print(f"process {pid} restored sharded keys", flush=True)
        # an array (and keys) on process 0's devices alone: process 1 holds no shard, saving or loading
        on_0 = NamedSharding(Mesh(np.array(jax.local_devices(process_index=0)), ("x",)), P("x"))
        lone = jax.make_array_from_callback(SHAPE, on_0, lambda index: expected(1)[index], dtype=np.float32)
        lone_data = jax.make_array_from_callback(data.shape, on_0, lambda index: data[index], dtype=data.dtype)
        # (beside an array spread over both, "w": process 1 planned the small ones as arrays, not packed as process
        # 0 did, and named "w"'s array otherwise: every save failed, 'Error opening "zarr3" driver: Expected "shape"')
        ckptr.save(latest + 5, {"lone": lone, "keys": jax.random.wrap_key_data(lone_data), "w": state(1)["w"]},
                   force=True)
        abstract = {"lone": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=on_0),
                    "keys": jax.ShapeDtypeStruct((4,), keys.dtype, sharding=on_0),
                    "w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=rows)}
        for restored in (ckptr.load(latest + 5), ckptr.load(latest + 5, abstract)):  # as saved, and into on_0
            assert restored["lone"].sharding == on_0 and restored["keys"].sharding == on_0
            for shard in restored["w"].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), expected(1)[shard.index])
            for shard in restored["lone"].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), expected(1)[shard.index])
        here = len(restored["lone"].addressable_shards)
        print(f"process {pid} restored arrays of process 0 alone, {here} shards here", flush=True)
        import ckpt

        try:  # a key only one process holds: refused on both, before anything is written
            ckptr.save(latest + 6, {**state(latest + 6), f"only_on_{pid}": 1}, force=True)
        except ckpt.errors.TreeMismatchError as e:
            print(f"process {pid} refused {e.differences} steps {[c.step for c in ckptr.checkpoints]}", flush=True)
        # process 1's mesh holds the devices in another order: each would write the chunks of its own sharding
        devices = jax.devices() if pid == 0 else jax.devices()[2:] + jax.devices()[:2]
        reordered = NamedSharding(Mesh(np.array(devices), ("x",)), P("x"))
        try:
            ckptr.save(latest + 6, {"w": jax.make_array_from_callback(SHAPE, reordered, lambda index: expected(1)[index])},
                       force=True)
        except ckpt.errors.TreeMismatchError as e:
            print(f"process {pid} mesh refused: {e.differences} steps {[c.step for c in ckptr.checkpoints]}", flush=True)
        # a dtype zarr3 lacks, stored whole as bytes, spread over both processes: refused, not committed unreadable
        quantized = jax.make_array_from_callback(SHAPE, rows, lambda index: np.ones(SHAPE, jax.numpy.uint4)[index])
        try:
            ckptr.save(latest + 6, {"q": quantized}, force=True)
        except TypeError as e:
            print(f"process {pid} uint4 refused: {e} steps {[c.step for c in ckptr.checkpoints]}", flush=True)
