"""Wrote the runs in tests/orbax_0_5/ with orbax-checkpoint 0.5.9 (jax 0.4.30), as its users wrote them:

    python tests/orbax_0_5_writer.py tests/orbax_0_5

no_ocdbt/1/model/:  CheckpointManager, the item of PyTreeCheckpointHandler(use_ocdbt=False): one zarr
                    directory per array, and a _METADATA that does not say so (Orbax 0.10 and earlier wrote no use_ocdbt)
aggregate/1/default/: the legacy CheckpointManager(root, PyTreeCheckpointer()) with the save_args of
                    flax.training.orbax_utils.save_args_from_target (flax <= 0.8.5: SaveArgs(aggregate=True) for
                    every leaf of a single process), so every leaf is in the msgpack file ``checkpoint``

The values are :func:`state` of the step, rebuilt by tests/test_orbax_runs.py without Orbax.
"""
import sys
from pathlib import Path

import numpy as np


def state(step: int) -> dict:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * step, "n": np.arange(3, dtype=np.int16) + step,
            "k": step}


def main(directory: Path) -> None:
    import jax
    import orbax.checkpoint as ocp
    assert ocp.__version__ == "0.5.9", ocp.__version__
    handlers = {"model": ocp.PyTreeCheckpointHandler(use_ocdbt=False)}
    with ocp.CheckpointManager(directory / "no_ocdbt", item_names=("model",), item_handlers=handlers) as manager:
        manager.save(1, args=ocp.args.Composite(model=ocp.args.PyTreeSave(state(1))))
    manager = ocp.CheckpointManager(directory / "aggregate", ocp.PyTreeCheckpointer())
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(aggregate=True), state(1))
    manager.save(1, state(1), save_kwargs={"save_args": save_args})
    manager.wait_until_finished()
    manager.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
