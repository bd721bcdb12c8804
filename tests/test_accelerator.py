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
        for step in (0, 1, 2):  # the later saves are the steady state's: staging buffers and layout reused
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


@pytest.mark.parametrize("device_bytes", [64 << 20, 300])  # how much a device's batched copies may take
@pytest.mark.parametrize("device", torch_devices())
def test_small_torch_tensors_among_other_leaves_are_copied_together_and_saved_exactly(tmp_path, monkeypatch,
                                                                                       device, device_bytes):
    """Adjacent small tensors of one device are copied with one ``torch._foreach_copy_`` (from a GPU, into
    a buffer on it, then in one transfer); leaves of other kinds between them, complex tensors, and on a
    GPU those past the device memory allowed, are copied one by one, and every byte lands in its place."""
    import torch

    from ckpt import transfers

    monkeypatch.setattr(transfers, "TORCH_RUNS_DEVICE_BYTES", device_bytes)
    batches = []
    foreach_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src, **kw: (batches.append(len(src)),
                                                                         foreach_copy(dst, src, **kw)))
    generator = torch.Generator().manual_seed(1)

    def tensor(*shape, dtype=torch.float32):
        return (torch.randn(shape, generator=generator) * 100).to(dtype).to(device)

    state = {"a": tensor(3), "b": tensor(dtype=torch.bfloat16), "c": tensor(2, 3, dtype=torch.int64),
             "d": tensor(0), "e": tensor(dtype=torch.bool), "f": tensor(7, 5).t(), "g": tensor(9).requires_grad_(),
             "h": np.arange(5.0), "i": tensor(4), "j": tensor(2, dtype=torch.complex64).conj(), "k": tensor(6),
             "l": 3, "m": tensor(40, dtype=torch.float64), "n": tensor(1 << 17)}
    with ckpt.Checkpointer(tmp_path) as checkpointer:
        for step in range(3):
            expected = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            pending = checkpointer.save_async(step, state, force=True)
            with torch.no_grad():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dtype != torch.bool:
                        value.add_(1)  # after save_async returns, the loop may change its tensors
            pending.result()
            loaded = checkpointer.load(step)
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(loaded[key].cpu().resolve_conj(), value.resolve_conj()), (step, key)
                else:
                    np.testing.assert_array_equal(loaded[key], value, err_msg=f"{step} {key}")
    # every tensor but the complex one is packed and batched, on a GPU from the second save on (the first
    # plans the tree); with 300 bytes of device memory, some are left to copy one by one
    saves, batched = (3, 11) if device == "cpu" else (2, 11 if device_bytes > 300 else None)
    assert sum(batches) == saves * batched if batched else 0 < sum(batches) < saves * 11, batches


@pytest.mark.parametrize("device", torch_devices())
def test_small_tensors_put_on_a_device_together_keep_their_values_and_take_the_targets_dtypes(device):
    """A load's small tensors go to a device in a few operations (one host buffer, one transfer, one
    batched copy that casts): each comes out with its target's shape, dtype and device, in memory of its own."""
    import torch

    from ckpt import transfers

    generator = torch.Generator().manual_seed(2)
    tensors = [(torch.randn(shape, generator=generator) * 100).to(dtype) for shape, dtype in (
        ((3,), torch.float32), ((), torch.bfloat16), ((2, 3), torch.int64), ((0,), torch.float32), ((), torch.bool),
        ((5, 7), torch.float16), ((1,), torch.uint8), ((4,), torch.float64))]
    likes = [torch.empty(t.shape, dtype=t.dtype if k % 3 else torch.float32, device=device) for k, t in enumerate(tensors)]
    made = transfers._put_together(tensors, likes)
    for tensor, like, out in zip(tensors, likes, made):
        assert (out.shape, out.dtype, out.device) == (like.shape, like.dtype, like.device)
        assert torch.equal(out.cpu(), tensor.to(like.dtype))
    assert len({out.untyped_storage().data_ptr() for out in made if out.numel()}) == 7


@pytest.mark.parametrize("device", torch_devices())
def test_a_loads_transfers_wait_for_run_and_each_lands_in_its_place(tmp_path, monkeypatch, device):
    """The tensors bound for a device (and jax arrays left for one device_put) come back from run() in
    the places their Pending values held, small ones put together, large ones from the transfer
    thread. On the CPU, where tensors bound for it are used as they are, by batching CPU tensors too."""
    import torch

    from ckpt import transfers

    monkeypatch.setattr(transfers, "TORCH_BATCHED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(transfers, "TORCH_ASIDE_BYTES", 64)
    jax = pytest.importorskip("jax")
    to_device = transfers.ToDevice(batched=False)  # every jax array left for run() too
    sources = [torch.arange(3, dtype=torch.float32), np.arange(4, dtype=np.int32), torch.arange(40, dtype=torch.int64),
               torch.tensor(True), "kept", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), np.float32(2.5) * np.ones(2, np.float32),
               torch.arange(100, dtype=torch.float64).reshape(10, 10)]
    likes = {0: torch.empty(3, device=device), 2: torch.empty(40, dtype=torch.int32, device=device),
             3: torch.empty((), dtype=torch.bool, device=device), 5: torch.empty((2, 3), dtype=torch.float32, device=device),
             7: torch.empty((10, 10), dtype=torch.float64, device=device)}
    values = [to_device.torch(x, likes[k]) if k in likes else to_device.jax(x, None) if isinstance(x, np.ndarray) else x
              for k, x in enumerate(sources)]
    assert all(type(v) is transfers.Pending for k, v in enumerate(values) if k != 4)
    made = to_device.run()(values)
    for k, (source, value) in enumerate(zip(sources, made)):
        if k in likes:
            assert (value.shape, value.dtype, value.device) == (likes[k].shape, likes[k].dtype, likes[k].device), k
            assert torch.equal(value.cpu(), source.to(likes[k].dtype)), k
            if source.nbytes < 64:  # put together: in memory of its own, not the gathering buffer's
                assert value.untyped_storage().nbytes() == value.nbytes, k
        elif k == 4:
            assert value == "kept"
        else:
            assert isinstance(value, jax.Array)
            np.testing.assert_array_equal(np.asarray(value), source)
    assert to_device.run()(["nothing left"]) == ["nothing left"]
    state = {"tensors": [source for source in sources if isinstance(source, torch.Tensor)], "step": 3}
    abstract = {"tensors": [likes[k] for k in sorted(likes)], "step": 0}
    with ckpt.Checkpointer(tmp_path) as checkpointer:  # a whole load: its tree is built from run()'s values
        checkpointer.save(0, state)
        loaded = checkpointer.load(0, abstract)
    assert loaded["step"] == 3
    for source, like, value in zip(state["tensors"], abstract["tensors"], loaded["tensors"]):
        assert (value.dtype, value.device) == (like.dtype, like.device)
        assert torch.equal(value.cpu(), source.to(like.dtype))


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
