"""One process of a 2-process JAX job on 127.0.0.1 (used by tests/test_distributed_jax.py).

usage: jax_multiprocess_worker.py PORT PROCESS_ID DIR MODE   (MODE: save | resume | tiers)
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

port, pid, directory, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60)

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


if mode == "tiers":  # two tiers: each process's local tier, then process 1's host is replaced
    import shutil

    import ckpt

    def tiered() -> Checkpointer:
        return Checkpointer(f"{directory}/durable", save_decision_policy=sdp.FixedIntervalPolicy(2),
                            local=ckpt.LocalCheckpointOptions(f"{directory}/local", save_decision_policy=policy))

    with tiered() as ckptr:
        for step in (1, 2, 3):
            ckptr.save(step, state(step))
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
