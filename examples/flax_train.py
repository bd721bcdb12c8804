"""Train a small Linen MLP with optax on synthetic data, checkpointing with ckpt; run it again to resume.

    python examples/flax_train.py --directory /tmp/flax_run --steps 200
    python examples/flax_train.py --directory /tmp/flax_run --steps 400   # continues from step 200

It checkpoints every ``--save-every`` steps and at the last step; SIGTERM saves the current step and
stops. The TrainState carries the dropout PRNG key and the data of a step is a function of the step,
so a resumed run ends with exactly the parameters of a run that was never stopped.
"""
from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from ckpt.integrations.flax import CheckpointHook, restore_train_state
from ckpt.training import Checkpointer, save_decision_policies

FEATURES = 16
BATCH_SIZE = 32


class MLP(nn.Module):
    """A two-layer regression MLP with dropout."""

    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(1)(x)[..., 0]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the dropout key, split at every step."""

    rng: jax.Array


@jax.jit
def create_state() -> TrainState:
    """The initial state: fresh parameters, AdamW state and dropout key."""
    init_key, dropout_key = jax.random.split(jax.random.key(0))
    model = MLP()
    params = model.init(init_key, jnp.zeros((1, FEATURES)), train=False)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-3), rng=dropout_key)


@jax.jit
def synthetic_batch(step: int) -> tuple[jax.Array, jax.Array]:
    """The batch of ``step``: a fixed function of the step, so a resumed run sees the same data.

    The targets are a fixed linear function of the inputs, which the MLP learns: the loss falls from about
    1.5 at the start to about 0.015 at step 2000, so a resumed run visibly continues where it left off.
    """
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1234), step), (BATCH_SIZE, FEATURES))
    weights = jax.random.normal(jax.random.key(7), (FEATURES,)) / jnp.sqrt(FEATURES)
    return x, x @ weights


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
    """One AdamW step on the squared error; the input state's buffers are donated."""
    rng, dropout_key = jax.random.split(state.rng)

    def loss_fn(params):
        prediction = state.apply_fn({"params": params}, x, train=True, rngs={"dropout": dropout_key})
        return jnp.mean((prediction - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads, rng=rng), loss


def train(directory: str, steps: int, save_every: int) -> TrainState:
    """Trains up to ``steps``, resuming from the latest checkpoint in ``directory`` if there is one."""
    policy = save_decision_policies.FixedIntervalPolicy(save_every)
    with Checkpointer(directory, save_decision_policy=policy) as ckptr:
        state = restore_train_state(ckptr, create_state())
        start = int(state.step)
        print(f"resumed from step {start}" if start else "starting from scratch", flush=True)
        hook = CheckpointHook(ckptr, final_step=steps)
        for step in range(start + 1, steps + 1):
            state, loss = train_step(state, *synthetic_batch(step))
            if hook(step, state, {"loss": loss}):
                print(f"stopped at step {step}, loss {float(loss):.5f}", flush=True)
                break
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", required=True, help="checkpoint root directory")
    parser.add_argument("--steps", type=int, default=200, help="train until this step")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps")
    args = parser.parse_args(argv)
    train(args.directory, args.steps, args.save_every)


if __name__ == "__main__":
    main()
