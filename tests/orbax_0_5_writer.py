"""Wrote the runs in tests/orbax_0_5/ with orbax-checkpoint 0.5.9 (jax 0.4.30), as its users wrote them:

    python tests/orbax_0_5_writer.py tests/orbax_0_5

no_ocdbt/1/model/:  CheckpointManager, the item of PyTreeCheckpointHandler(use_ocdbt=False): one zarr
                    directory per array, and a _METADATA that does not say so (Orbax 0.10 and earlier wrote no use_ocdbt)
aggregate/:         the legacy CheckpointManager(root, PyTreeCheckpointer()), :func:`aggregated` of the step:
                    1 with the save_args of flax.training.orbax_utils.save_args_from_target (flax <= 0.8.5:
                    SaveArgs(aggregate=True) for every leaf of a single process), so every leaf is in the msgpack
                    file ``checkpoint``; 2 with the leaves under 4 elements aggregated, as Orbax's docs showed
direct/tree/:       a direct checkpoint, PyTreeCheckpointer().save(path, state(3)): before 0.6, Orbax's Checkpointer
                    wrote no _CHECKPOINT_METADATA

The values are functions of the step, rebuilt by tests/test_orbax_runs.py without Orbax.
"""
import sys
from pathlib import Path

import ml_dtypes
import numpy as np


def state(step: int) -> dict:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * step, "n": np.arange(3, dtype=np.int16) + step,
            "k": step}


def aggregated(step: int) -> dict:
    """Leaves of each kind the msgpack file holds: arrays (bf16 included), in dicts and lists, scalars, a string."""
    return {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * step,
                       "b": np.linspace(-1, 1, 3).astype(ml_dtypes.bfloat16)},
            "layers": [np.arange(2, dtype=np.int64) + step, np.ones(3, np.float16)], "step": step, "lr": 0.5 / step,
            "name": f"run-{step}"}


def main(directory: Path) -> None:
    import jax
    import orbax.checkpoint as ocp
    assert ocp.__version__ == "0.5.9", ocp.__version__
    handlers = {"model": ocp.PyTreeCheckpointHandler(use_ocdbt=False)}
    with ocp.CheckpointManager(directory / "no_ocdbt", item_names=("model",), item_handlers=handlers) as manager:
        manager.save(1, args=ocp.args.Composite(model=ocp.args.PyTreeSave(state(1))))
    manager = ocp.CheckpointManager(directory / "aggregate", ocp.PyTreeCheckpointer())
    for step, aggregate in ((1, lambda _: True), (2, lambda x: np.size(x) < 4)):
        save_args = jax.tree_util.tree_map(lambda x: ocp.SaveArgs(aggregate=aggregate(x)), aggregated(step))
        manager.save(step, aggregated(step), save_kwargs={"save_args": save_args})
    manager.wait_until_finished()
    manager.close()
    ocp.PyTreeCheckpointer().save(directory / "direct" / "tree", state(3))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
