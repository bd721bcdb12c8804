"""The benchmark states, built from a seed so that every worker process holds the same bytes.

A workload is described by a JSON-able spec, ``{"kind": "large", "nbytes": ..., "count": 4}``, so
that the parent can hand it to worker processes. Every floating-point value is random bits (or
random normals for model weights), so no compressor can win.

The helpers at the bottom translate one state for each system: the plain nested-dict form that
``torch.save`` gets (``to_torch``), the numpy form Orbax gets for torch tensors (``to_numpy``), and
the raw arrays the floors write (``raw_arrays``).
"""
from __future__ import annotations

import math
import sys
import zlib
from typing import Any, Callable, Iterator

import numpy as np

MiB = 1 << 20


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """An array of ``shape`` filled with random bits (floats may be NaN or inf: the bytes are what count)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    words = rng.integers(0, 1 << 32, size=-(-nbytes // 4), dtype=np.uint32)
    return words.view(np.uint8)[:nbytes].view(dtype).reshape(shape)


def large(nbytes: int, count: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` float32 arrays of shape (rows, 1024) totalling about ``nbytes``."""
    rng = np.random.default_rng(seed)
    rows = max(1, nbytes // count // 4096)
    return {f"layer_{i}": random_array(rng, (rows, 1024)) for i in range(count)}


def many_leaves(count: int, min_bytes: int, max_bytes: int, scalars: int = 100, zero_d: int = 0, seed: int = 0) -> dict:
    """``count`` 1-D arrays (float32 and int32) of log-uniform sizes in [min_bytes, max_bytes] in 10
    groups, plus ``scalars`` Python ints, floats, strs and bools and ``zero_d`` 0-d arrays (float32 and int64)."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(math.log(min_bytes), math.log(max_bytes), count)).astype(np.int64) // 4
    groups: dict[str, dict] = {f"group_{g}": {} for g in range(10)}
    for i, n in enumerate(sizes):
        dtype = np.float32 if i % 4 else np.int32
        groups[f"group_{i % 10}"][f"leaf_{i}"] = random_array(rng, (int(n),), dtype)
    kinds: list[Callable[[int], Any]] = [int, lambda i: i * 0.5, lambda i: f"value-{i}", lambda i: i % 2 == 0]
    groups["scalars"] = {f"s_{i}": kinds[i % 4](i) for i in range(scalars)}
    if zero_d:
        groups["zero_d"] = {f"z_{i}": random_array(rng, (), np.float32 if i % 2 else np.int64) for i in range(zero_d)}
    return groups


def flax_adam(width: int, depth: int, seed: int = 0) -> Any:
    """A flax ``TrainState`` of a ``depth``-layer MLP of ``width`` with ``optax.adam``; every float
    leaf (params and both Adam moments) random."""
    import flax.linen as nn
    import jax
    import optax
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(depth):
                x = nn.relu(nn.Dense(width)(x))
            return x

    model = MLP()
    params = model.init(jax.random.key(seed), np.zeros((1, width), np.float32))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    rng = np.random.default_rng(seed)

    def fill(x: Any) -> Any:
        if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating):
            return jax.device_put(rng.standard_normal(x.shape, np.float32))
        return x

    return jax.tree.map(fill, state)


def lightning(width: int, depth: int, seed: int = 0, workdir: str = "/tmp") -> dict:
    """The full checkpoint dict of a Lightning MLP (Adam + StepLR) after one training step, as
    ``Trainer`` writes it, with OrderedDicts made plain dicts and every float tensor random."""
    import pytorch_lightning as pl
    import torch

    torch.manual_seed(seed)

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(*[m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())])

        def training_step(self, batch, batch_idx):
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 10)}

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=workdir)
    trainer.fit(MLP(), torch.utils.data.DataLoader(torch.randn(4, width), batch_size=4))
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    rng = np.random.default_rng(seed)

    def fill(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim > 0:
            return torch.from_numpy(rng.standard_normal(tuple(x.shape), np.float32))
        return x

    return map_leaves(checkpoint, fill)


_BUILDERS: dict[str, Callable[..., Any]] = {
    "large": large, "many_leaves": many_leaves, "flax_adam": flax_adam, "lightning": lightning}


def build(spec: dict) -> Any:
    """The state a spec describes, e.g. ``build({"kind": "large", "nbytes": 64 << 20})``."""
    args = {k: v for k, v in spec.items() if k not in ("kind", "name", "description", "without")}
    return _BUILDERS[spec["kind"]](**args)


# ------------------------------------------------------------------------------------ translating
def _jax_node(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and x is not None and not isinstance(x, (dict, list, tuple)) and not jax.tree_util.treedef_is_leaf(
        jax.tree_util.tree_structure(x))


def map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``tree`` with plain containers rebuilt (dict subclasses become dicts) and ``fn`` applied to leaves."""
    if isinstance(tree, dict):
        return {k: map_leaves(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [map_leaves(v, fn) for v in tree]
        if hasattr(type(tree), "_fields"):
            return type(tree)(*items)
        return type(tree)(items)
    if _jax_node(tree):
        from flax import serialization

        return map_leaves(serialization.to_state_dict(tree), fn)
    return fn(tree)


def iter_leaves(tree: Any) -> Iterator[Any]:
    """Every leaf of plain containers and jax pytrees (flax TrainState, optax states)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from iter_leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from iter_leaves(v)
    elif _jax_node(tree):
        yield from iter_leaves(sys.modules["jax"].tree_util.tree_leaves(tree))
    else:
        yield tree


def as_numpy(x: Any) -> np.ndarray | None:
    """The bytes of an array leaf (numpy, jax or torch) as a contiguous numpy array; None for scalars."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().contiguous().numpy()
    if isinstance(x, np.ndarray) or type(x).__module__.startswith("jax"):
        return np.ascontiguousarray(x)
    return None


def raw_arrays(tree: Any) -> list[np.ndarray]:
    """The array leaves' bytes, in a stable order: what the floors write and read."""
    return [a for a in map(as_numpy, iter_leaves(tree)) if a is not None and a.size]


def to_numpy(tree: Any) -> Any:
    """``tree`` with torch tensors as numpy arrays (Orbax does not store torch tensors)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return tree
    return map_leaves(tree, lambda x: x.detach().numpy() if isinstance(x, torch.Tensor) else x)


def to_torch(tree: Any) -> Any:
    """The plain dict/list form of ``tree`` with every array a torch tensor (flax objects via
    ``flax.serialization.to_state_dict``): what a PyTorch user would ``torch.save``."""
    import torch

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x
        array = as_numpy(x)
        return x if array is None else torch.from_numpy(np.array(array))

    return map_leaves(tree, convert)


def fingerprint(tree: Any) -> list[tuple[int, int]]:
    """Sorted (nbytes, CRC32) of every array leaf: equal for two trees holding the same arrays,
    whatever their container and array types."""
    return sorted((a.nbytes, zlib.crc32(a.reshape(-1).view(np.uint8))) for a in raw_arrays(tree))


def describe(tree: Any) -> dict:
    """Bytes in array leaves and the number of leaves."""
    leaves = list(iter_leaves(tree))
    return {"nbytes": sum(a.nbytes for a in raw_arrays(tree)), "leaves": len(leaves)}
