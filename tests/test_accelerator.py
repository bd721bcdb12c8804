"""Saves and loads of arrays on an accelerator give back the bytes, dtypes and devices they had.

Each test runs on the CPU (as CI runs it) and on every CUDA device torch or jax sees: on a machine with a
GPU, ``python -m pytest tests/test_accelerator.py`` checks the accelerator path (pinned staging buffers,
non-blocking copies on a side stream, transfers started before any is copied) before
``benchmarks/gpu.py`` times it. An async save must have copied every leaf before it returns: the
tests overwrite (torch) or delete (jax) the saved arrays right after.
"""
from __future__ import annotations

import numpy as np
import pytest

import ckpt

SHAPES = {"big": (1 << 18,), "matrix": (64, 33), "small": (5,), "scalar": (), "empty": (0,)}


def torch_devices() -> list[str]:
    torch = pytest.importorskip("torch")
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def jax_devices() -> list:
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend
        gpus = []
    return jax.devices("cpu")[:1] + gpus


@pytest.fixture(params=torch_devices())
def torch_state(request) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    state = {f"{name}_{dtype}": (torch.randn(shape, generator=generator) * 100).to(dtype).to(request.param)
             for name, shape in SHAPES.items() for dtype in (torch.float32, torch.bfloat16, torch.int64)}
    state["flag"] = torch.tensor(True, device=request.param)
    return state


def test_torch_tensors_saved_async_twice_load_onto_their_device(tmp_path, torch_state):
    import torch

    expected = {k: v.cpu().clone() for k, v in torch_state.items()}
    with ckpt.Checkpointer(tmp_path) as checkpointer:
        for step in (0, 1):  # the second save is the steady state's: its staging buffers are reused
            pending = checkpointer.save_async(step, torch_state, force=True)
            for tensor in torch_state.values():
                tensor.fill_(step + 7)  # after save_async returns, the loop may change its tensors
            pending.result()
            abstract = {k: torch.empty_like(v) for k, v in torch_state.items()}
            loaded = checkpointer.load(step, abstract)
            for key, tensor in loaded.items():
                assert (tensor.device, tensor.dtype) == (torch_state[key].device, torch_state[key].dtype), key
                assert torch.equal(tensor.cpu(), expected[key]), key
            expected = {k: v.cpu().clone() for k, v in torch_state.items()}


@pytest.mark.parametrize("device", jax_devices(), ids=str)
def test_jax_arrays_saved_async_twice_load_with_their_sharding(tmp_path, device):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    hosts = {f"{name}_{dtype.__name__}": (rng.standard_normal(shape) * 100).astype(dtype)
             for name, shape in SHAPES.items() for dtype in (np.float32, jnp.bfloat16, np.int32)}
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in hosts.items()}
    with ckpt.Checkpointer(tmp_path) as checkpointer:
        for step in (0, 1):
            state = {k: jax.device_put(v + step, device) for k, v in hosts.items()}
            pending = checkpointer.save_async(step, state, force=True)
            for array in state.values():
                array.delete()  # after save_async returns, the loop may free its arrays
            pending.result()
            loaded = checkpointer.load(step, abstract)
            for key, array in loaded.items():
                assert isinstance(array, jax.Array) and array.sharding == sharding, key
                assert array.dtype == hosts[key].dtype, key
                np.testing.assert_array_equal(np.asarray(array), hosts[key] + step, err_msg=key)
