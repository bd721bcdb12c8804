"""Train a small Flax NNX MLP with optax on synthetic data, checkpointing with ckpt; run it again to resume.

    python examples/nnx_train.py --directory /tmp/nnx_run --steps 200
    python examples/nnx_train.py --directory /tmp/nnx_run --steps 400   # continues from step 200

The model (with its ``nnx.Rngs`` dropout stream) and the ``nnx.Optimizer`` are checkpointed
together and restored in place. It checkpoints every ``--save-every`` steps and at the last step;
SIGTERM saves the current step and stops. A resumed run ends with exactly the parameters of a run
that was never stopped.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ckpt.integrations.flax import CheckpointHook, restore_train_state
from ckpt.training import Checkpointer, save_decision_policies

FEATURES = 16
BATCH_SIZE = 32


class MLP(nnx.Module):
    """A two-layer regression MLP with dropout."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 64):
        self.hidden = nnx.Linear(FEATURES, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.dropout(nnx.relu(self.hidden(x))))[..., 0]


@nnx.jit
def create() -> tuple[MLP, nnx.Optimizer]:
    """A fresh model (with its dropout stream) and its AdamW optimizer."""
    model = MLP(nnx.Rngs(params=0, dropout=1))
    return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)


@jax.jit
def synthetic_batch(step: int) -> tuple[jax.Array, jax.Array]:
    """The batch of ``step``: a fixed function of the step, so a resumed run sees the same data."""
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1234), step), (BATCH_SIZE, FEATURES))
    return x, jnp.sin(x.sum(axis=-1))


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One AdamW step on the squared error, updating ``model`` and ``optimizer`` in place."""

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(directory: str, steps: int, save_every: int) -> tuple[MLP, nnx.Optimizer]:
    """Trains up to ``steps``, resuming from the latest checkpoint in ``directory`` if there is one."""
    policy = save_decision_policies.FixedIntervalPolicy(save_every)
    with Checkpointer(directory, save_decision_policy=policy) as ckptr:
        model, optimizer = restore_train_state(ckptr, create())
        start = int(optimizer.step[...])
        print(f"resumed from step {start}" if start else "starting from scratch", flush=True)
        hook = CheckpointHook(ckptr, final_step=steps)
        model.train()
        for step in range(start + 1, steps + 1):
            loss = train_step(model, optimizer, *synthetic_batch(step))
            if hook(step, (model, optimizer), {"loss": loss}):
                print(f"stopped at step {step}, loss {float(loss):.5f}", flush=True)
                break
    return model, optimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", required=True, help="checkpoint root directory")
    parser.add_argument("--steps", type=int, default=200, help="train until this step")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps")
    args = parser.parse_args(argv)
    train(args.directory, args.steps, args.save_every)


if __name__ == "__main__":
    main()
