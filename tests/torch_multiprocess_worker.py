"""torch.distributed (gloo) jobs on 127.0.0.1 with an FSDP2 model, for tests/test_distributed_torch.py.

usage: torch_multiprocess_worker.py DIR REFERENCE MODE:WORLD...   (e.g. ``train:2 load:4 load:1``)

Each MODE:WORLD is one job, run after the one before: this process (torch imported once) forks WORLD
ranks, which join a new process group; a rank that fails fails the job and ends this process with 1.
Every rank prints ``rank R pid P`` first. MODE ``train`` (2 ranks): trains 3 steps, saving the model
and optimizer state dicts (DTensors) at each through one Checkpointer (sync, async, async); rank 0 writes the full values of step 3 to REFERENCE
(``np.savez``); then every rank loads step 3 into the DTensor templates of a fresh model and checks
them. ``load``: loads the latest step of DIR into the templates of a model sharded over WORLD ranks and
checks it against REFERENCE. ``crash``: saves steps forever (the test SIGKILLs a rank, this process
the others, and goes on with the next job); ``resume``:
continues after the latest committed step with one more save. ``free``: every rank saves DTensors with
``ckpt.save`` (one coordinated save) and loads them back, whole and into templates on the meta device.
``differ``: the ranks save trees with other keys,
through the Checkpointer and ``ckpt.save``, and to other paths and steps, a full state dict (rank 1's empty), and open
Checkpointers on other roots;
every one is refused, nothing is written.
``dtensors`` (4 ranks): DTensors of unusual layouts, saved and loaded through the Checkpointer.
``fail``: saves that fail on rank 1. ``alone``: should_save and reload on rank 0 alone, then 1000 steps asked on every rank, none saved. ``policies``: two tiers whose local policies differ between ranks. ``overwritten``: two tiers on the durable root
$CKPT_TEST_DURABLE (an s3:// root), a step rank 0 alone overwrites. ``delete``: steps every rank deletes and saves again at once; checkpoints every rank deletes with ``ckpt.delete``; a deletion that fails on rank 0. ``stopped``: rank 0 stops in the middle of a save. ``gone``: rank 1 runs out of device memory in the gathering of a small DTensor, and stops. ``vanish``: rank 1 stops in an async save. ``committed``: rank 1 stops once rank 0 committed an async save. ``queued``: what each rank lists and loads while a save or promotion is queued. ``exit``: the ranks end without closing (one and two tiers). ``list``: prints the steps each rank lists. ``unshared``: rank 1 sees another directory at DIR. ``linked``: rank 1 names the root through a symbolic link. ``sigterm``: a
SIGTERM to rank 1 alone, in a loop saving on preemption.
Each rank prints what it did.
"""
import math
import os
import signal
import shutil
import socket
import sys
import threading
import time
import tracemalloc
import traceback
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpt
from ckpt.training import Checkpointer, save_decision_policies as sdp

rank, world = 0, 1  # this rank's, set in each forked rank
directory = reference = ""


def sharded_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small MLP: its 517x512 layer (1.06 MB) is written shard by shard, rows split unevenly at 2 and
    4 ranks; the rest is gathered and packed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 517), torch.nn.ReLU(), torch.nn.Linear(517, 3))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    torch.manual_seed(100 * step + rank)
    model(torch.randn(8, 512)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model's and optimizer's state dicts, by ``model/<key>`` and ``optim/<param>/<key>``."""
    model_state, optim_state = get_state_dict(model, optimizer)
    flat = {f"model/{k}": v for k, v in model_state.items()}
    flat.update({f"optim/{p}/{k}": v for p, state in optim_state["state"].items() for k, v in state.items()})
    return flat


def full_values(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """Every tensor of the model's and optimizer's state dicts, whole (a collective)."""
    flat = state_tensors(model, optimizer)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().numpy() for k, v in flat.items()}


def check(model: torch.nn.Module, optimizer: torch.optim.Optimizer, what: str) -> None:
    expected = np.load(reference)
    found = full_values(model, optimizer)
    assert sorted(found) == sorted(expected.files), (sorted(found), expected.files)
    for key in expected.files:
        assert found[key].dtype == expected[key].dtype and np.array_equal(found[key], expected[key]), key
    say(f"rank {rank} of {world} {what}: {len(found)} tensors bit-exact")


def load_into_fresh_model(ckptr: Checkpointer, step: int | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = sharded_model()
    model_template, optim_template = get_state_dict(model, optimizer)
    loaded = ckptr.load_checkpointables(step, {"model": model_template, "optim": optim_template})
    assert all(isinstance(v, DTensor) for v in loaded["model"].values())
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return model, optimizer


def save(ckptr: Checkpointer, step: int, model, optimizer, blocking: bool) -> None:
    """Saves the state dicts at ``step``; rank 0 prints ``committed <step>`` once it is committed."""
    model_state, optim_state = get_state_dict(model, optimizer)
    items = {"model": model_state, "optim": optim_state}
    if blocking:
        ckptr.save_checkpointables(step, items, force=True)
        done(step)
    else:
        ckptr.save_checkpointables_async(step, items, force=True).on_complete(lambda _: done(step))


def done(step: int) -> None:
    if rank == 0:
        say(f"committed {step}")


def say(line: str) -> None:
    """Prints ``line`` in one write: ranks, their writer threads and this process share the output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(this_rank: int, this_world: int, port: int, mode: str) -> None:
    """One rank of a job."""
    global rank, world
    rank, world = this_rank, this_world
    say(f"rank {rank} pid {os.getpid()}")
    if mode == "unshared" and rank == 1 and not sees_another_root():
        say("rank 1 cannot make a mount namespace")
        os._exit(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if mode == "exit":
        ends_without_closing(port)
    with Checkpointer(directory, save_decision_policy=sdp.FixedIntervalPolicy(1)) as ckptr:
        assert isinstance(ckpt.distributed.current(), ckpt.distributed.TorchProcesses if world > 1 else ckpt.distributed.SingleProcess)
        if mode == "train":
            model, optimizer = sharded_model()
            for step in (1, 2, 3):
                train_step(model, optimizer, step)
                save(ckptr, step, model, optimizer, blocking=step == 1)
            values = full_values(model, optimizer)  # while step 3 is written
            ckptr.wait()
            if rank == 0:
                np.savez(reference, **values)
            say(f"rank {rank} saved {[c.step for c in ckptr.checkpoints]}")
            dist.barrier()
            fresh, fresh_optimizer = load_into_fresh_model(ckptr)
            check(fresh, fresh_optimizer, "reloaded step 3")
            try:
                from torch.distributed._shard.sharded_tensor import empty
                from torch.distributed._shard.sharding_spec import ChunkShardingSpec

                spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
                ckpt.save(f"{directory}-fsdp1-{rank}", {"w": empty(spec, 4, 2)})
            except TypeError as e:
                say(f"rank {rank} refused: {e}")
            dist.barrier()  # rank 0's process keeps the store the refusal's agreement reads last: it waits for rank 1
        elif mode == "load":
            model, optimizer = load_into_fresh_model(ckptr)
            check(model, optimizer, f"loaded step {ckptr.latest.step}")
        elif mode == "crash":
            model, optimizer = sharded_model()
            step = 0 if ckptr.latest is None else ckptr.latest.step + 1
            say(f"rank {rank} ready")
            while True:
                say(f"rank {rank} begin {step}")
                save(ckptr, step, model, optimizer, blocking=step % 2 == 0)
                step += 1
        elif mode == "free":
            free_save()
        elif mode == "differ":
            differing_trees(ckptr)
        elif mode == "dtensors":
            unusual_dtensors(ckptr)
        elif mode == "fail":
            failing_saves(ckptr)
        elif mode == "delete":
            deleted_and_saved_again(ckptr)
        elif mode == "alone":
            with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=10)):
                asked_on_rank_0_alone()
        elif mode == "policies":
            local_policies_differ()
            mismatched_with_two_tiers()
        elif mode == "overwritten":
            overwritten_on_rank_0_alone()
        elif mode == "sigterm":
            preempted_rank()
        elif mode == "stopped":
            rank_0_stops(ckptr)
        elif mode == "linked":
            through_a_link()
        elif mode == "gone":
            rank_1_stops_in_a_gathering(ckptr)
        elif mode == "vanish":
            rank_1_stops_in_an_async_save(ckptr)
        elif mode == "promoted":
            rank_1_stops_once_promoted()
        elif mode == "committed":
            rank_1_stops_once_committed()
        elif mode == "queued":
            listed_once_queued(ckptr)
        elif mode == "list":
            say(f"rank {rank} lists {[c.step for c in ckptr.checkpoints]}")
        elif mode == "unshared":  # rank 1 sees another directory at DIR
            try:
                ckptr.save(1, {"w": torch.ones(2)}, force=True)
            except (RuntimeError, OSError) as e:
                say(f"rank {rank} refused: {type(e).__name__}: {e}")
            say(f"rank {rank} steps {[c.step for c in ckptr.checkpoints]}")
            local = ckpt.LocalCheckpointOptions(f"{directory}-local", save_decision_policy=sdp.FixedIntervalPolicy(1))
            durable = f"{directory}/durable"
            with Checkpointer(durable, save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as tiers:
                try:
                    tiers.save(2, {"w": torch.ones(2)})
                    tiers.wait()  # (the promotion runs in the background)
                except (RuntimeError, OSError) as e:
                    say(f"rank {rank} promotion refused: {type(e).__name__}: {e}")
            say(f"rank {rank} durable steps {sorted(os.listdir(durable))}")
        else:  # resume after a crash
            latest = ckptr.latest.step
            model, optimizer = load_into_fresh_model(ckptr)
            train_step(model, optimizer, latest + 1)
            save(ckptr, latest + 1, model, optimizer, blocking=True)
            say(f"rank {rank} resumed from {latest} steps {[c.step for c in ckptr.checkpoints]}")
    dist.destroy_process_group()


def free_save() -> None:
    """Every rank calls ``ckpt.save`` with its shards of a small and a large DTensor: one checkpoint (after a
    save rank 0 made alone, which the ranks' saves together do not count). A rank saving either alone is
    refused (it would write its shards only, or wait in the gathering of the small one for the others); a large
    replicated one, which it holds whole, it saves alone (cast to a storage dtype too)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    alone = ckpt.MultiprocessingOptions(processes=ckpt.distributed.SingleProcess())
    if rank == 0:
        with ckpt.Context(multiprocessing_options=alone):
            ckpt.save(f"{directory}-rank0", {"x": torch.ones(2)})
    mesh = init_device_mesh("cpu", (world,))
    whole = {"small": torch.arange(8.0), "big": torch.arange(600 * 600.0).reshape(600, 600)}
    path = f"{directory}-free"
    copies, to_numpy = {}, ckpt.leaves.torch_to_numpy  # each tensor's bytes a save reads (a copy off an accelerator)

    def counted(where, t):
        copies[where[0][1]] = copies.get(where[0][1], 0) + (t.numel() > 0)
        return to_numpy(where, t)
    ckpt.leaves.torch_to_numpy = counted
    try:
        with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=30)):
            ckpt.save(path, {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in whole.items()})
    finally:
        ckpt.leaves.torch_to_numpy = to_numpy
    say(f"rank {rank} free save copies: {sorted(copies.items())}")
    loaded = ckpt.load(path)
    assert all(torch.equal(loaded[k], v) for k, v in whole.items()), loaded
    say(f"rank {rank} free save: whole")
    # a DTensor on the slices of one mesh (root["dp"] of a (1, world) mesh: each rank's slice holds a copy), saved
    # through a Processes object without compare: the copy of rank 0's slice is written (every slice wrote its own)
    uncompared = types.SimpleNamespace(index=rank, count=world, barrier=ckpt.distributed.current().barrier,
                                       broadcast=ckpt.distributed.current().broadcast)
    sliced = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))["dp"]
    copies.clear()
    ckpt.leaves.torch_to_numpy = counted
    try:
        with ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=uncompared)):
            ckpt.save(f"{path}-uncompared", {"copy": distribute_tensor(whole["big"], sliced, [Shard(0)])})
    finally:
        ckpt.leaves.torch_to_numpy = to_numpy
    say(f"rank {rank} uncompared copies: {sorted(copies.items())}, "
        f"{torch.equal(ckpt.load(f'{path}-uncompared')['copy'], whole['big'])}")
    for key in ("big", "small"):  # (a small one was gathered: a collective, which waited for a rank that saved not)
        with ckpt.Context(multiprocessing_options=alone):
            try:
                split = distribute_tensor(whole[key], mesh, [Shard(0)], src_data_rank=None)
                ckpt.save(f"{directory}-alone{rank}", {key: split})
            except ValueError as e:
                say(f"rank {rank} alone refused: {e}")
    rank0 = DeviceMesh("cpu", torch.tensor([0]))  # (every rank makes it; rank 1 holds empty local tensors on it)
    for key in ("big", "small"):  # (rank 1 wrote its empty tensor as the whole: OSError 'Error aligning dimensions')
        with ckpt.Context(multiprocessing_options=alone):
            try:
                ckpt.save(f"{directory}-outside{rank}", {key: distribute_tensor(whole[key], rank0, [Replicate()])})
                assert torch.equal(ckpt.load(f"{directory}-outside{rank}")[key], whole[key])
                shutil.rmtree(f"{directory}-outside{rank}")
                say(f"rank {rank} in rank 0's mesh: whole")
            except ValueError as e:
                say(f"rank {rank} outside rank 0's mesh refused: {e}")
    with ckpt.Context(multiprocessing_options=alone):  # a large replicated one: whole here, written whole (async)
        ckpt.save_async(f"{directory}-replicated{rank}",
                        {"big": distribute_tensor(whole["big"], mesh, [Replicate()], src_data_rank=None)}).result()
    assert torch.equal(ckpt.load(f"{directory}-replicated{rank}")["big"], whole["big"])
    say(f"rank {rank} alone replicated: whole")
    as_float16 = ckpt.Context(multiprocessing_options=alone)  # (it wrote the whole uncast: numpy's TypeError)
    as_float16.array.saving.storage_options.dtype = np.float16
    scaled = whole["big"] / 8  # (float16 holds them)
    with as_float16:
        ckpt.save(f"{directory}-float16{rank}", {"big": distribute_tensor(scaled, mesh, [Replicate()])})
    say(f"rank {rank} alone replicated float16: {ckpt.load(f'{directory}-float16{rank}')['big'].dtype}, "
        f"{torch.equal(ckpt.load(f'{directory}-float16{rank}')['big'], scaled.half())}")
    with torch.device("meta"):  # a model made on the meta device, then sharded: shapes, dtypes and layouts only
        templates = {k: distribute_tensor(torch.empty(v.shape, dtype=v.dtype), mesh, [Shard(0)], src_data_rank=None)
                     for k, v in whole.items()}
    loaded = ckpt.load(path, templates)
    devices = sorted({loaded[k].to_local().device.type for k in whole})
    assert all(torch.equal(ckpt.dtensor.gather(loaded[k]), v) for k, v in whole.items()), devices
    say(f"rank {rank} meta templates: {devices}")
    # a template holding one DTensor at two keys, saved apart: its 1 row split over the ranks (rank 1 holds none,
    # and tied the keys its empty shards told alike, where rank 0 did not) comes back untied on every rank; a
    # replicated one, which every rank holds whole, tied where the values saved are alike
    row = torch.arange(600.0).reshape(1, 600)
    split, held = (distribute_tensor(torch.zeros_like(row), mesh, [p], src_data_rank=None)
                   for p in (Shard(0), Replicate()))
    ckpt.save(f"{path}-tied", {"a": row, "b": row + 1, "c": row, "d": row.clone()})
    loaded = ckpt.load(f"{path}-tied", {"a": split, "b": split, "c": held, "d": held})
    exact = all(torch.equal(loaded[k].full_tensor(), row + (k == "b")) for k in "abcd")
    say(f"rank {rank} tied templates: split {loaded['a'] is loaded['b']}, "
        f"replicated {loaded['c'] is loaded['d']}, {exact}")


def differing_trees(ckptr: Checkpointer) -> None:
    """Each rank saves a tree of its own (a pipeline stage's keys, a small DTensor more, or of another
    layout or over a mesh of other ranks, a tensor of another shape or dtype, a value of another type), or another step: refused on every
    rank (within seconds, not after a timeout, nor ended by gloo in the gathering of small DTensors), nothing
    written."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    own = [DeviceMesh("cpu", [r]) for r in range(world)][rank]  # (every rank makes every mesh's group)
    small = lambda dim: distribute_tensor(torch.arange(24.0).reshape(4, 6), mesh, [Shard(dim)], src_data_rank=None)
    stage = {f"stage{rank}.weight": torch.ones(2, 2)}
    dtypes = (torch.int64, torch.float32)
    saves = {"checkpointer": lambda: ckptr.save(1, stage, force=True),
             "free": lambda: ckpt.save(f"{directory}-differ", stage),
             "path": lambda: ckpt.save(f"{directory}-rank{rank}", {"w": torch.ones(2)}),
             "step": lambda: ckptr.save(5 + rank, {"w": torch.ones(2)}),
             "dtensor": lambda: ckptr.save(1, {"a": small(0), **({"b": small(0)} if rank == 0 else {})}, force=True),
             "layout": lambda: ckpt.save(f"{directory}-differ", {"a": small(rank)}),
             "mesh": lambda: ckpt.save(f"{directory}-differ", {"a": distribute_tensor(torch.ones(2), own, [Shard(0)])}),
             "shape": lambda: ckptr.save(1, {"buf": torch.ones(3 + rank), "n": rank}, force=True),
             "dtype": lambda: ckpt.save(f"{directory}-differ", {"buf": torch.ones(2, dtype=dtypes[rank])}),
             "inline": lambda: ckptr.save(1, {"n": 1 if rank == 0 else "one", "m": rank}, force=True)}
    for what, save in saves.items():
        try:
            with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=30)):
                save()
        except ckpt.errors.TreeMismatchError as e:
            say(f"rank {rank} {what} refused: {e.differences}")
    # two tiers: each rank's local tier saves its part alone, and a promotion copies files (were saved, rank 0's tree
    # alone promoted; the others' leaves lost): compared as a save is, before anything is written on either tier
    tiers = Path(directory).parent / "tiers"
    local = ckpt.LocalCheckpointOptions(f"{tiers}-local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=30)), Checkpointer(
            tiers, save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as two:
        for step, tree in ((1, stage), (2, {"buf": torch.ones(3 + rank), "n": 1 if rank == 0 else "one"})):
            try:
                two.save(step, tree)
            except ckpt.errors.TreeMismatchError as e:
                say(f"rank {rank} two tiers step {step} refused: {e.differences}")
        for step in (3, 4):  # (trees alike: saved, and step 4 promoted)
            two.save(step, {"w": torch.full((2,), float(step))})
        two.wait()
        say(f"rank {rank} two tiers steps {[(c.step, sorted(c.locations)) for c in two.checkpoints]}, locally "
            f"{sorted(os.listdir(f'{tiers}-local/process_{rank}'))}, durable {sorted(os.listdir(tiers))}")
    tiny = torch.nn.Linear(2, 2)
    fully_shard(tiny)
    optimizer = torch.optim.Adam(tiny.parameters())
    tiny(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    # a full state dict: the whole state on rank 0, empty dicts on rank 1 (was: every key listed, and a hint at
    # pipeline stages)
    full = get_state_dict(tiny, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    try:
        with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=30)):
            ckpt.save(f"{directory}-full", dict(zip(("model", "optim"), full)))
    except ckpt.errors.TreeMismatchError as e:
        say(f"rank {rank} full state dict refused: {e}")
    try:  # Checkpointers on roots of their own (they waited at every barrier, then timed out)
        with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=30)):
            Checkpointer(f"{directory}-root{rank}")
    except ckpt.errors.RootDirectoryError as e:
        say(f"rank {rank} roots refused: {e}")
    dist.barrier()
    ckptr.reload()
    written = sorted(p.name for p in Path(directory).parent.iterdir() if p.name.startswith(Path(directory).name))
    say(f"rank {rank} steps {[c.step for c in ckptr.checkpoints]} entries {written}")


def through_a_link() -> None:
    """Rank 1 names the root DIR-real through the symbolic link DIR-link to it: one root all the same, saved
    to, listed and deleted from, by a Checkpointer and by ckpt.save and ckpt.delete."""
    root = f"{directory}-real" if rank == 0 else f"{directory}-link"
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=30)):
        with Checkpointer(root) as ckptr:
            ckptr.save(1, {"w": torch.ones(2)}, force=True)
            ckptr.save_async(2, {"w": torch.ones(2)}, force=True)
            ckptr.delete(1)
            say(f"rank {rank} linked steps {[c.step for c in ckptr.checkpoints]}")
        ckpt.save(f"{root}/free", {"w": torch.arange(3.0)})
        say(f"rank {rank} linked free {ckpt.load(f'{root}/free')['w'].tolist()}")
        ckpt.delete(f"{root}/free")


def preempted_rank() -> None:
    """Rank 1 alone gets a SIGTERM at step 3, once rank 0 has decided that step (its node is preempted): every
    rank saves step 4 and stops; then again with two tiers (each rank's local tier saving every other step)."""
    policy = sdp.AnySavePolicy([sdp.FixedIntervalPolicy(1000), sdp.PreemptionCheckpointingPolicy()])
    for tiers, local in (("", None), (" with two tiers", ckpt.LocalCheckpointOptions(
            f"{directory}-local", save_decision_policy=sdp.FixedIntervalPolicy(2)))):
        with Checkpointer(f"{directory}-sigterm{tiers}", save_decision_policy=policy, local=local) as ckptr:
            for step in range(40):
                if step == 3 and rank == 1:  # once rank 0 decided step 3 without it: every rank saves step 4
                    dist.barrier()
                    os.kill(os.getpid(), signal.SIGTERM)
                ckptr.save(step, {"w": torch.full((2,), float(step))})
                if step == 3 and rank == 0:
                    dist.barrier()
                if ckptr.reached_preemption(step):
                    break
                dist.barrier()  # (a training step's all-reduce)
            say(f"rank {rank}{tiers} stopped at {step}, steps {[c.step for c in ckptr.checkpoints]}")
            ckpt.preemption.reset()  # (the job goes on: rank 1 is not terminated at the close)


def sees_another_root() -> bool:
    """Puts this process in a mount namespace of its own where DIR is another, empty directory (a root
    that the other ranks do not see); False where it may not (not root, no mount namespaces)."""
    import ctypes
    import subprocess

    own = f"{directory}-rank1-own"
    os.makedirs(directory, exist_ok=True)
    os.makedirs(own, exist_ok=True)
    if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS
        return False
    mount = [["mount", "--make-rprivate", "/"], ["mount", "--bind", own, directory]]
    return all(subprocess.run(m, capture_output=True).returncode == 0 for m in mount)


class FailsOnRank1:
    """A checkpointable whose save fails on rank 1 (its disk is full; or ``at_start``, in the part of the
    save its caller waits for) and writes a file on the others."""

    odd_rank = 1

    def __init__(self, at_start: bool = False):
        self.at_start = at_start

    def odd_write(self) -> None:
        raise OSError(f"disk full on rank {rank}")

    async def save(self, directory):
        if self.at_start and rank == self.odd_rank:
            raise ValueError(f"no snapshot on rank {rank}")
        path = await directory.await_creation()

        async def write():
            if rank == self.odd_rank:
                self.odd_write()
            (path / f"rank_{rank}").write_text("written")
        return write()

    async def load(self, directory):
        async def read():
            pass
        return read()


def failing_saves(ckptr: Checkpointer) -> None:
    """A save that fails on rank 1 (sync, async, in the part of the save its caller waits for, and in its
    plan, through the Checkpointer and ``ckpt.save``; an overwrite only rank 0 asks for): every rank raises
    within seconds, not after the timeout, and nothing is committed; the next save is whole. So do a small DTensor
    whose local shard on rank 1 is not the one its layout says, and an async save whose copies find no memory on rank
    1, and a value a storage dtype cannot hold in rank 1's shard alone. Then saves forced on one rank alone."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=20)):
        for step, how in ((1, "sync"), (2, "async"), (3, "start"), (4, "plan"), (None, "free")):
            items = {"state": {"w": torch.ones(2)}, "extra": FailsOnRank1(at_start=how == "start")}
            if how in ("plan", "free"):  # a leaf ckpt cannot store, on rank 1 alone
                items = {"state": {"w": torch.ones(2) if rank == 0 else object()}}
            try:
                if how == "async":
                    ckptr.save_checkpointables_async(step, items, force=True).result()
                elif how == "free":
                    ckpt.save_checkpointables(f"{directory}-free", items)
                else:
                    ckptr.save_checkpointables(step, items, force=True)
            except (OSError, ValueError, TypeError) if rank == 1 else RuntimeError as e:
                say(f"rank {rank} {how} failed: {type(e).__name__}: {e}")
        local = torch.ones(2 if rank == 0 else 1, 6)  # rank 1's shard of a small DTensor is not torch.chunk's split
        misshapen = DTensor.from_local(local, init_device_mesh("cpu", (world,)), [Shard(0)], run_check=False,
                                       shape=torch.Size((4, 6)), stride=(6, 1))
        try:  # (rank 1 raised in the gathering, naming no key path, and rank 0 waited there until rank 1's process ended)
            ckptr.save(4, {"w": misshapen}, force=True)
        except ValueError if rank == 1 else RuntimeError as e:
            say(f"rank {rank} misshapen failed: {type(e).__name__}: {e}")
        snapshot = ckpt.saving.snapshot
        if rank == 1:  # no host memory for an async save's copies, on rank 1 alone
            def out_of_memory(*args):
                raise MemoryError("no memory for the copies on rank 1")
            ckpt.saving.snapshot = out_of_memory
        try:  # (rank 0 waited for rank 1 in the background until the timeout, and their next save failed)
            ckptr.save_async(4, {"w": torch.ones(2)}, force=True).result()
        except MemoryError if rank == 1 else RuntimeError as e:
            say(f"rank {rank} copy failed: {type(e).__name__}: {e}")
        ckpt.saving.snapshot = snapshot
        # a value that the storage dtype cannot hold in rank 1's shard alone (an async save's snapshot refused it
        # there, and rank 0 waited at the commit until the timeout)
        rows = torch.zeros(600, 520)
        rows[-1, 0] = 1e10
        items = {"x": distribute_tensor(rows, init_device_mesh("cpu", (world,)), [Shard(0)], src_data_rank=None)}
        stored = ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=20))
        stored.array.saving.storage_options.dtype = np.float16
        for step, how in ((7, "sync"), (8, "async")):
            try:
                with stored:
                    if how == "async":
                        ckptr.save_async(step, items, force=True).result()
                    else:
                        ckptr.save(step, items, force=True)
            except (OSError, ValueError) if rank == 1 else RuntimeError as e:
                say(f"rank {rank} stored {how} failed: {type(e).__name__}: {e}")
        ckptr.save(5, {"w": torch.ones(2)}, force=True)
        try:  # an overwrite rank 1 is not told of: it refuses, at the step every rank meets (rank 0 waited there)
            ckptr.save(5, {"w": torch.zeros(2)}, force=True, overwrite=rank == 0)
        except ckpt.errors.StepAlreadyExistsError if rank == 1 else RuntimeError as e:
            say(f"rank {rank} overwrite failed: {type(e).__name__}: {e}")
        try:  # a save rank 0 alone forces (rank 1 asks its policy): every rank raises where every rank meets
            ckptr.save(6, {"w": torch.ones(2)}, force=rank == 0)
        except ValueError if rank == 1 else RuntimeError as e:
            say(f"rank {rank} force failed: {type(e).__name__}: {e}")
        try:  # a step below the latest that rank 1 alone forces: rank 0 declines it, rank 1 raises
            say(f"rank {rank} behind forced: {ckptr.save(3, {'w': torch.ones(2)}, force=rank == 1)}")
        except ValueError as e:
            say(f"rank {rank} behind forced failed: {e}")
    say(f"rank {rank} steps {[c.step for c in ckptr.checkpoints]}, step 5 holds {ckptr.load(5)['w'].tolist()}")
    # two tiers: a local save that fails on rank 1 alone (its local disk full) at a step to promote, saved again
    local = ckpt.LocalCheckpointOptions(f"{directory}-local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=10)), Checkpointer(
            f"{directory}-tiers", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as tiers:
        for step, how in ((2, "sync"), (4, "async")):
            items = {"state": {"w": torch.ones(2)}, "extra": FailsOnRank1()}
            try:
                if how == "async":
                    tiers.save_checkpointables_async(step, items).result()
                else:
                    tiers.save_checkpointables(step, items)
            except OSError if rank == 1 else RuntimeError as e:
                say(f"rank {rank} two tiers {how} failed: {type(e).__name__}: {e}")
            say(f"rank {rank} two tiers {how} saved again: {tiers.save(step, {'w': torch.ones(2)})}")
        tiers.save(6, {"w": torch.ones(2)})
        # steps that stay on the local tiers (the durable policy skips them): rank 0's save went on
        for step, how in ((7, "local sync"), (9, "local async"), (11, "local async, not waited for")):
            items = {"state": {"w": torch.ones(2)}, "extra": FailsOnRank1()}
            try:
                if how == "local sync":
                    tiers.save_checkpointables(step, items)
                else:
                    response = tiers.save_checkpointables_async(step, items)
                    if how == "local async":
                        response.result()
                    else:  # (its failure raised by the next save, where the ranks meet)
                        tiers.save(12, {"w": torch.ones(2)})
            except OSError if rank == 1 else RuntimeError as e:
                say(f"rank {rank} two tiers {how} failed: {type(e).__name__}: {e}")
            if step != 11:  # (a failed save's local copies are discarded on every rank: saved again, no overwrite)
                say(f"rank {rank} two tiers {how} saved again: {tiers.save(step, {'w': torch.ones(2)})}")
        tiers.save(14, {"w": torch.ones(2)})
        tiers.wait()
        say(f"rank {rank} two tiers steps {[(c.step, sorted(c.locations)) for c in tiers.checkpoints]}")


def asked_on_rank_0_alone() -> None:
    """should_save and reload called on rank 0 alone (a user's ``if rank == 0:``, to log a step due), before saves
    every rank makes: every rank saves the same steps, as the policy says. Then should_save on rank 1 alone."""
    said = []
    with Checkpointer(f"{directory}-alone", save_decision_policy=sdp.FixedIntervalPolicy(2)) as ckptr:
        for step in range(6):
            if rank == 0 and step % 3 == 1:  # a no (1), then a yes (4)
                ckptr.should_save(step)
            said.append(bool(ckptr.save(step, {"w": torch.full((2,), step)})))
        for step in range(6, 10):  # every rank asks, rank 0 alone lists the root again before the save
            due = ckptr.should_save(step)
            if rank == 0:
                ckptr.reload()
            said.append(bool(due and ckptr.save(step, {"w": torch.full((2,), step)})))
        say(f"rank {rank} alone saved {said}, steps {[c.step for c in ckptr.checkpoints]}")
        if rank == 1:  # without rank 0, which decides: an error that says so (at the timeout)
            try:
                with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=1)):
                    ckptr.should_save(10)
            except TimeoutError as e:
                say(f"rank 1 alone asked: {e}")
        dist.barrier()  # (rank 0's process keeps the store rank 1 waits on)
    policy = Changing()
    with Checkpointer(f"{directory}-again", save_decision_policy=policy) as ckptr:
        said = [ckptr.should_save(2), ckptr.should_save(3)]
        policy.yes = True  # (as the save in flight ends: a policy that saves when idle says yes now)
        if rank == 1:  # step 2 again, before rank 0 asks it again
            said.append(ckptr.should_save(2))
            dist.barrier()
        else:
            dist.barrier()
            said.append(ckptr.should_save(2))
        said.append(bool(said[-1] and ckptr.save(2, {"w": torch.ones(2)})))
        said.append(bool(ckptr.should_save(4) and ckptr.save(4, {"w": torch.ones(2)})))
        say(f"rank {rank} asked again {said}, steps {[c.step for c in ckptr.checkpoints]}")
        policy.yes = False  # a loop asking every step, saving none (a policy that saves on preemption only)
        tracemalloc.start()
        for step in range(5, 1005):
            ckptr.should_save(step)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        policy.yes = True
        say(f"rank {rank} asked 1000 steps, holding {held // 1000} bytes a step; step 5 again: {ckptr.should_save(5)}")
        dist.barrier()  # (rank 0's process keeps the store rank 1 reads the answers from)


class Changing:
    """A save-decision policy whose answer the test changes (``yes``)."""

    yes = False

    def should_save(self, step, previous_steps, *, context) -> bool:
        return self.yes


def local_policies_differ() -> None:
    """Two tiers whose local tiers' policies differ between ranks (or decide by each one's clock): every rank
    gets rank 0's answer, and saves the same steps. Each rank's state holds values of its own (an RNG state, small
    and large) besides its shards of a large DTensor: the durable steps hold rank 0's, as a save's do."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rows = distribute_tensor(torch.arange(600 * 520.0).reshape(600, 520), init_device_mesh("cpu", (world,)), [Shard(0)],
                             src_data_rank=None)
    state = {"w": torch.ones(2), "rng": torch.full((3,), rank), "big_rng": torch.full((300_000,), rank), "rows": rows}
    local = ckpt.LocalCheckpointOptions(f"{directory}-local", save_decision_policy=sdp.FixedIntervalPolicy(2 + rank))
    with Checkpointer(f"{directory}/durable", save_decision_policy=sdp.FixedIntervalPolicy(4), local=local) as ckptr:
        said = [ckptr.should_save(step) and ckptr.save(step, state) for step in range(7)]
    say(f"rank {rank} saved {said}, locally {sorted(os.listdir(f'{directory}-local/process_{rank}'))}")
    # local preservation policies that differ: one rank keeps step 2, the other does not; a save of step 2 that rank 0
    # declines (its local policy now saves nothing)
    class Until:
        """Saves every step until turned off."""
        on = True

        def should_save(self, step, previous, *, context):
            return self.on

    for holder in (1, 0):
        policy = Until()
        local = ckpt.LocalCheckpointOptions(f"{directory}-kept{holder}", save_decision_policy=policy,
                                            preservation_policy=ckpt.training.preservation_policies.LatestN(
                                                3 if rank == holder else 2))
        with Checkpointer(f"{directory}/kept{holder}", save_decision_policy=sdp.FixedIntervalPolicy(100),
                          local=local) as ckptr:
            for step in range(5):
                ckptr.save(step, {"w": torch.ones(2)})
            policy.on = False
            try:
                said = ckptr.save(2, {"w": torch.ones(2)})
            except ckpt.errors.StepAlreadyExistsError as e:
                said = f"{type(e).__name__}: {e}"
        say(f"rank {rank} saved step 2, which rank {holder} alone holds, again: {said}")


def mismatched_with_two_tiers() -> None:
    """Two tiers: steps each rank deletes differently, a save rank 0 alone forces (rank 1 asks its policy), and a step
    rank 1 alone overwrites: every rank raises at once where every rank meets, nothing is deleted on either tier nor
    replaced on the durable tier, and the next save is made."""
    local = ckpt.LocalCheckpointOptions(f"{directory}-local2", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=5)), Checkpointer(
            f"{directory}/durable2", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        for step in (2, 3):
            ckptr.save(step, {"w": torch.ones(2)})
        try:
            ckptr.delete(2 + rank)
        except (ValueError, TimeoutError) as e:
            say(f"rank {rank} tiers deletes refused: {type(e).__name__}: {e}")
        say(f"rank {rank} tiers steps after the deletions {[(c.step, sorted(c.locations)) for c in ckptr.checkpoints]}, "
            f"locally {sorted(os.listdir(f'{directory}-local2/process_{rank}'))}")
        try:
            ckptr.save(5, {"w": torch.ones(2)}, force=rank == 0)
        except (RuntimeError, ValueError, TimeoutError) as e:
            say(f"rank {rank} tiers force failed: {type(e).__name__}: {e}")
        ckptr.save(6, {"w": torch.ones(2)})  # (the ranks still make the same calls)
        try:  # step 6 again, which rank 1 alone overwrites
            ckptr.save(6, {"w": torch.zeros(2)}, overwrite=rank == 1)
        except (RuntimeError, ckpt.errors.StepAlreadyExistsError) as e:
            say(f"rank {rank} tiers overwrite failed: {type(e).__name__}: {e}")
        try:  # step 7, which rank 1 alone forces, and rank 0's local tier alone saves (its durable tier does not)
            ckptr.save(7, {"w": torch.ones(2)}, force=rank == 1)
        except (RuntimeError, ValueError) as e:
            say(f"rank {rank} tiers local force failed: {type(e).__name__}: {e}")
        ckptr.save(8, {"w": torch.ones(2)})
        say(f"rank {rank} tiers steps {[(c.step, sorted(c.locations)) for c in ckptr.checkpoints]}, step 6 holds "
            f"{ckpt.load(f'{directory}/durable2/6')['w'].tolist()}")
        # step 9, which the local tiers alone hold (the durable policy skips it), saved again with overwrite=True on
        # rank 0 alone, and so with force=True too (promoted); step 11, whose local save failed on rank 1, forced again
        ckptr.save(9, {"w": torch.ones(2)})
        for label, force in (("local overwrite", False), ("forced overwrite", True)):
            try:
                ckptr.save(9, {"w": torch.zeros(2)}, overwrite=rank == 0, force=force)
            except (RuntimeError, ckpt.errors.StepAlreadyExistsError) as e:
                say(f"rank {rank} tiers {label} failed: {type(e).__name__}: {e}")
        try:
            ckptr.save_checkpointables(11, {"state": {"w": torch.ones(2)}, "extra": FailsOnRank1()})
        except (OSError, RuntimeError) as e:  # (on every rank; rank 0 discards its local copy)
            say(f"rank {rank} tiers local save failed: {e}")
        say(f"rank {rank} tiers forced again: {ckptr.save(11, {'w': torch.zeros(2)}, force=True)}")
        ckptr.save(11, {"w": torch.full((2,), 2.0)}, force=True, overwrite=True)
        ckptr.wait()
        say(f"rank {rank} tiers step 9 holds {ckpt.load(f'{directory}-local2/process_{rank}/9')['w'].tolist()} locally, "
            f"durable steps {sorted(c.step for c in ckptr.checkpoints)}, step 11 holds "
            f"{ckpt.load(f'{directory}/durable2/11')['w'].tolist()}")


def overwritten_on_rank_0_alone() -> None:
    """Two tiers on the durable root $CKPT_TEST_DURABLE: step 6 again, which rank 0 alone overwrites: every rank raises,
    the durable step 6 untouched."""
    durable = os.environ["CKPT_TEST_DURABLE"]
    local = ckpt.LocalCheckpointOptions(f"{directory}-local3", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=20)), Checkpointer(
            durable, save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as ckptr:
        ckptr.save(6, {"w": torch.ones(2)})
        try:
            ckptr.save(6, {"w": torch.zeros(2)}, overwrite=rank == 0)
        except (RuntimeError, ckpt.errors.StepAlreadyExistsError) as e:
            say(f"rank {rank} overwrite on rank 0 alone failed: {type(e).__name__}")
        ckptr.save(8, {"w": torch.ones(2)})  # (the ranks still make the same calls)
    say(f"rank {rank} durable step 6 holds {ckpt.load(f'{durable}/6')['w'].tolist()}")


def deleted_and_saved_again(ckptr: Checkpointer) -> None:
    """Every rank deletes step 2 (``delete``, or ``delete_async`` not waited for) and saves it again at once:
    no save finds the step still there (rank 1 returned from the deletion before rank 0 had deleted it). Then
    every rank saves, loads and deletes a checkpoint with the free functions, and deletes other paths (refused), and
    other steps (refused), one of which rank 1 does not hold. Then a deletion of step 1 that fails on rank 0, where it is
    deleted. Last, a load of the latest step while an async save is in flight: the same step on every rank."""
    for step in range(3):
        ckptr.save(step, {"w": torch.full((2,), float(step))}, force=True)
    for trial in range(6):
        ckptr.delete(2) if trial % 2 else ckptr.delete_async(2)
        ckptr.save(2, {"w": torch.full((2,), 20.0 + trial)}, force=True)
    say(f"rank {rank} steps {[c.step for c in ckptr.checkpoints]}, step 2 holds {ckptr.load(2)['w'].tolist()}")
    for trial in range(3):  # the free functions: each rank saves, loads and deletes one checkpoint
        ckpt.save(f"{directory}-free", {"w": torch.full((2,), float(trial))})
        assert ckpt.load(f"{directory}-free")["w"].tolist() == [trial] * 2
        assert ckpt.delete(f"{directory}-free") and not os.path.exists(f"{directory}-free")
    try:
        ckpt.delete(directory + ("/0" if rank == 0 else "/1"))
    except ValueError as e:
        say(f"rank {rank} free deletes refused: {e}")
    say(f"rank {rank} free deletes: steps {[c.step for c in ckptr.checkpoints]}")
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=20)):
        try:  # other steps (rank 0 deleted its own, then both waited at barriers of other names)
            ckptr.delete(rank)
        except ValueError as e:
            say(f"rank {rank} deletes refused: {e}")
        try:  # a step rank 1 does not hold (rank 1 returned at once, rank 0 waited, and the job's later calls too)
            ckptr.delete(2 if rank == 0 else 7, missing_ok=rank == 1)
        except ValueError as e:
            say(f"rank {rank} missing deletes refused: {e}")
    say(f"rank {rank} deletes: steps {[c.step for c in ckptr.checkpoints]}")
    delete_step = ckpt.root.delete_step
    if rank == 0:  # a deletion that fails where the step is deleted
        def refused(path, step):
            raise PermissionError(f"cannot delete {path}")
        ckpt.root.delete_step = refused
    try:
        ckptr.delete(1)
    except (PermissionError, RuntimeError) as e:
        say(f"rank {rank} deletion failed: {type(e).__name__}: {e}")
    ckpt.root.delete_step = delete_step
    say(f"rank {rank} after the failed deletion: steps {[c.step for c in ckptr.checkpoints]}")
    ckptr.save_async(3, {"w": torch.full((2,), 3.0)}, force=True)
    if rank == 1:  # (a rank whose writer thread is through with the save: it had step 3, rank 0 step 2)
        ckptr.wait()
    say(f"rank {rank} loads the latest while step 3 is written: {ckptr.load()['w'].tolist()}")


class WrittenAtTheEnd(FailsOnRank1):
    """A checkpointable whose files every rank writes once the script has ended: its save is in flight then."""

    ended = threading.Event()

    @property
    def odd_rank(self) -> int:  # (every rank)
        return rank

    def odd_write(self) -> None:
        self.ended.wait()


def ends_without_closing(port: int) -> None:
    """Every rank ends as many scripts do: an async save, ``destroy_process_group()`` and the end of the script,
    without ``wait()`` or ``close()``: the interpreter's exit finishes the save (rank 0's process kept the
    job's store until then). Rank 1 lingers (as a rank descheduled a moment does) until rank 0's process has ended,
    where its last requests to the store come once rank 0 may end: after the meeting of an async save with two tiers
    that stays local, and after it arrived last at the plain save's last barrier."""
    if rank == 1:
        linger_after_rank_0(port)
    local = ckpt.LocalCheckpointOptions(f"{directory}-tiers-local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    tiers = Checkpointer(f"{directory}-tiers", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local)
    tiers.save(0, {"w": torch.zeros(2)})
    tiers.save_async(1, {"w": torch.ones(2)})  # (local only)
    ckptr = Checkpointer(directory)
    ckptr.save(0, {"w": torch.zeros(2)}, force=True)
    ckptr.save_checkpointables_async(1, {"state": {"w": torch.ones(2)}, "extra": WrittenAtTheEnd()}, force=True)
    dist.destroy_process_group()
    say(f"rank {rank} ends")
    WrittenAtTheEnd.ended.set()
    sys.exit(0)


def linger_after_rank_0(port: int) -> None:
    """Makes this rank wait, where rank 0 may end (see ends_without_closing), until rank 0's process (its store) has
    ended; and arrive last at the last barrier of step 1's save of ``directory``."""
    def until_rank_0_ended() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return
            time.sleep(0.05)

    class Lingering:
        def __init__(self, store):
            self.store = store

        def __getattr__(self, name: str):
            return getattr(self.store, name)

        def add(self, key: str, amount: int) -> int:
            if key.startswith(directory) and key.endswith("/save/1/committed/arrived"):
                while not self.store.add(key, 0) & 1:  # (until rank 0 arrived)
                    time.sleep(0.05)
            return self.store.add(key, amount)

        def set(self, key: str, value: bytes) -> None:
            self.store.set(key, value)
            if key.startswith(directory) and key.endswith("/save/1/committed/done"):
                until_rank_0_ended()

    barrier, store = ckpt.distributed.TorchProcesses.barrier, ckpt.distributed.TorchProcesses._store

    def lingering(self, name: str, timeout_secs: float) -> None:
        barrier(self, name, timeout_secs)
        if name.endswith("/local/compared"):
            until_rank_0_ended()

    ckpt.distributed.TorchProcesses.barrier = lingering
    ckpt.distributed.TorchProcesses._store = lambda self, *args: Lingering(store(self, *args))


class StopsRank0(FailsOnRank1):
    """A checkpointable whose write ends rank 0's process at once (as a SIGKILL would; exit status 0, so
    that the job lets the other rank go on) and writes a file on the others."""

    odd_rank = 0

    def odd_write(self) -> None:
        os._exit(0)


def rank_0_stops(ckptr: Checkpointer) -> None:
    """Rank 0, whose process keeps the job's store, stops in the middle of a save: the other rank raises at
    once, saying so (it said it had waited the whole timeout); and so does its deletion of a step then, whose
    writer thread opens its first connection to the store (retried for 300 s, whatever the timeout)."""
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=60)):
        ckptr.save(0, {"w": torch.ones(2)}, force=True)  # (sync: in this thread, as the next)
        for what, call in (("raised", lambda: ckptr.save_checkpointables(
                1, {"state": {"w": torch.ones(2)}, "extra": StopsRank0()}, force=True)),
                           ("deletion raised", lambda: ckptr.delete(0))):
            start = time.monotonic()
            try:
                call()
            except ConnectionError as e:
                say(f"rank {rank} {what} {'at once' if time.monotonic() - start < 30 else 'after the timeout'}: {e}")
    os._exit(0)  # (the job's store is gone)


class StopsRank1(StopsRank0):
    """A checkpointable whose write ends rank 1's process at once, as a SIGKILL would."""

    odd_rank = 1


def rank_1_stops_in_an_async_save(ckptr: Checkpointer) -> None:
    """Rank 1 stops while its async save is written: rank 0's wait raises at the timeout, naming what the save waits
    for there and rank 1, which never arrived (it said only that the save was still running); nothing is committed.
    Rank 0's next save raises the save's own timeout at once (it met the others first, waiting the timeout again)."""
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=2)):
        ckptr.save_checkpointables_async(1, {"state": {"w": torch.ones(2)}, "extra": StopsRank1()}, force=True)
        try:
            ckptr.wait()
        except TimeoutError as e:
            say(f"rank {rank} wait raised: {e}")
        try:
            ckptr.save(2, {"w": torch.ones(2)}, force=True)
        except ckpt.distributed.ProcessesTimeoutError as e:
            say(f"rank {rank} next save raised: {e}")
    say(f"rank {rank} steps {[c.step for c in ckptr.checkpoints]}")
    os._exit(0)  # (rank 1 is gone: no closing barrier)


def rank_1_stops_once_committed() -> None:
    """Rank 1 stops once rank 0 committed step 1 of an async save, before the ranks' last meeting in it: rank 0's
    wait returns, and lists the step, which is committed (it raised TimeoutError and unlisted the step)."""
    root = f"{directory}-committed"
    if rank == 1:
        barrier = ckpt.saving.StepWriter._barrier

        def stops_once_committed(self, phase):
            if phase == "committed":  # (rank 0 commits before it meets the others there)
                while not os.path.exists(f"{root}/1/manifest.json"):
                    time.sleep(0.001)
                os._exit(0)  # (as a SIGKILL would: no closing)
            barrier(self, phase)

        ckpt.saving.StepWriter._barrier = stops_once_committed
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=2)):
        ckptr = Checkpointer(root, save_decision_policy=sdp.FixedIntervalPolicy(1))
        ckptr.save_async(1, {"w": torch.ones(2)})
        try:
            with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=60)):  # (the save's own meeting: 2 s)
                ckptr.wait()
            said = "returned"
        except TimeoutError as e:
            said = f"raised TimeoutError: {e}"
        say(f"rank {rank} wait for the committed step {said}, steps {[c.step for c in ckptr.checkpoints]}")
    os._exit(0)  # (rank 1 is gone: no closing barrier)


def rank_1_stops_once_promoted() -> None:
    """Two tiers: rank 1 stops once rank 0 committed the promotion of step 1, before the ranks' last meeting in it:
    rank 0's save returns, and lists the step, which is durable (it raised TimeoutError and did not list it)."""
    durable = f"{directory}-promoted"
    if rank == 1:
        settle = ckpt.distributed.settle

        def stops_once_committed(processes, name, part, timeout_secs, task, **kwargs):
            settle(processes, name, part, timeout_secs, task, **kwargs)
            if name.endswith("promote/1/written"):  # (rank 0 commits next)
                while not os.path.exists(f"{durable}/1/manifest.json"):
                    time.sleep(0.001)
                os._exit(0)  # (as a SIGKILL would: no closing)

        ckpt.distributed.settle = stops_once_committed
    local = ckpt.LocalCheckpointOptions(f"{directory}-promoted-local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with ckpt.Context(async_options=ckpt.AsyncOptions(timeout_secs=2)):
        ckptr = Checkpointer(durable, save_decision_policy=sdp.FixedIntervalPolicy(1), local=local)
        try:
            said = ckptr.save(1, {"w": torch.ones(2)})
        except TimeoutError as e:
            said = f"TimeoutError: {e}"
        say(f"rank {rank} saved the promoted step: {said}, steps {[(c.step, sorted(c.locations)) for c in ckptr.checkpoints]}")
    os._exit(0)  # (rank 1 is gone: no closing barrier)


def listed_once_queued(ckptr: Checkpointer) -> None:
    """An async save, then with two tiers an async save promoted, each held in the background until this rank read
    ``latest`` and ``checkpoints``: every rank lists the step from the moment its save returned (each listed it once
    its own writer thread had committed it), and ``load()`` loads it on every rank (with two tiers it raised
    StepNotFoundError: the promotion in flight was not waited for); ``should_save`` of the step says no (with two tiers
    it said yes, and the save that followed raised StepAlreadyExistsError). A forced save of a step whose promotion is
    queued is refused on every rank before anything is written (it queued a second promotion, which raised
    StepAlreadyExistsError on rank 0 and a RuntimeError on rank 1). Every rank lists a queued step with rank 0's metrics
    and custom metadata, as it lists the step once committed (each rank listed its own: ``{"loss": 11.0}`` on rank 1)."""
    inf = float("inf")  # (stored in the manifest as a string: every rank lists the float)
    read = threading.Event()
    run_step, copy_step = ckpt.saving.StepWriter.run, ckpt.tiers._copy_step

    def held_run(self, *args, **kwargs):
        read.wait()
        return run_step(self, *args, **kwargs)

    def held_copy(*args, **kwargs):
        read.wait()
        return copy_step(*args, **kwargs)

    def saved(what: str, checkpointer: Checkpointer, step: int, forced: bool = False) -> None:
        checkpointer.save_async(step, {"w": torch.full((2,), float(step))}, metrics={"loss": 1.0 + 10 * rank, "top": inf},
                                custom_metadata={"rank": rank})
        try:
            latest = checkpointer.latest
            listed = (None if latest is None else latest.step, [c.step for c in checkpointer.checkpoints],
                      checkpointer.should_save(step),  # (a step listed is no longer due)
                      [(c.metrics, c.custom_metadata) for c in checkpointer.checkpoints if c.step == step])
            if forced:
                try:
                    checkpointer.save_async(step, {"w": torch.full((2,), -1.0)}, force=True)
                    say(f"rank {rank} forced save of step {step} queued")
                except ckpt.errors.StepAlreadyExistsError as e:
                    say(f"rank {rank} forced save raised {type(e).__name__}: {e}")
        finally:
            read.set()
        try:
            loaded = checkpointer.load()["w"].tolist()
        except ckpt.errors.StepNotFoundError as e:
            loaded = type(e).__name__
        say(f"rank {rank} {what}: latest {listed[0]}, steps {listed[1]}, should_save {listed[2]}, loaded {loaded}, "
            f"metrics {listed[3]}")
        read.clear()

    ckptr.save(0, {"w": torch.zeros(2)})
    ckpt.saving.StepWriter.run = held_run
    saved("queued", ckptr, 1)
    ckpt.saving.StepWriter.run = run_step
    local = ckpt.LocalCheckpointOptions(f"{directory}-queued-local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with Checkpointer(f"{directory}-queued", save_decision_policy=sdp.FixedIntervalPolicy(2), local=local) as tiers:
        ckpt.tiers._copy_step = held_copy
        saved("promotion queued", tiers, 0)
        tiers.save(1, {"w": torch.ones(2)})  # (local only)
        saved("promotion queued", tiers, 2, forced=True)
        ckpt.tiers._copy_step = copy_step


def rank_1_stops_in_a_gathering(ckptr: Checkpointer) -> None:
    """Rank 1 runs out of device memory in the gathering of a small DTensor (a collective, after the ranks agreed
    on the tree), and stops: it raises torch's error (it was a ConnectionError saying another rank stopped); rank 0
    raises at once, naming the save (it raised gloo's error, 'Connection reset by peer', naming nothing)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    small = distribute_tensor(torch.ones(4, 2), init_device_mesh("cpu", (world,)), [Shard(0)], src_data_rank=None)
    if rank == 1:
        ckpt.dtensor._gather_rows = out_of_memory
    try:
        ckptr.save(1, {"w": small}, force=True)
    except (ConnectionError, torch.OutOfMemoryError) as e:
        say(f"rank {rank} raised {type(e).__name__}: {e}")
    os._exit(0)  # (rank 1 is gone: no closing barrier)


def unusual_dtensors(ckptr: Checkpointer) -> None:
    """At 4 ranks: a ``_StridedShard`` alone (each rank holds rows apart: refused), FSDP2 over tensor
    parallelism (``_StridedShard`` then ``Shard`` on a 2-D mesh: each rank's rows are one block), small
    DTensors of the dtypes gloo does not gather and conjugated ones, ``Partial`` ones (refused), one of 33
    dimensions (refused), a 0-d one, small ones on meshes of half the ranks."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    line, grid = init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (2, world // 2))
    rows = torch.arange(600 * 520.0).reshape(600, 520)  # 1.2 MB: written shard by shard
    try:
        ckptr.save(1, {"x": distribute_tensor(rows, line, [_StridedShard(0, split_factor=2)], src_data_rank=None)},
                   force=True)
    except TypeError as e:
        say(f"rank {rank} strided refused: {e}")
    fsdp_tp = [_StridedShard(0, split_factor=world // 2), Shard(0)]
    ckptr.save(2, {"x": distribute_tensor(rows, grid, fsdp_tp, src_data_rank=None)}, force=True)
    loaded = ckptr.load(2, {"x": distribute_tensor(torch.zeros_like(rows), grid, fsdp_tp, src_data_rank=None)})
    assert torch.equal(loaded["x"].full_tensor(), rows) and torch.equal(ckptr.load(2)["x"], rows)
    chunks = sum(1 for f in (Path(directory) / "2" / "arrays").rglob("*") if f.is_file() and f.name != "zarr.json")
    say(f"rank {rank} fsdp+tp exact, steps {[c.step for c in ckptr.checkpoints]}, {chunks} chunk files")
    # rows that do not divide the 2 x 2 ranks (blocks of 130, 129, 129, 129): chunks of 129 rows, some holding two
    # ranks' rows, written in two rounds (were one-row chunks: 517 files); a synchronous and an async save
    uneven = torch.arange(517 * 520.0).reshape(517, 520)
    for step, save in ((15, ckptr.save), (16, ckptr.save_async)):
        save(step, {"x": distribute_tensor(uneven, grid, fsdp_tp, src_data_rank=None)}, force=True)
        ckptr.wait()
        into = {"x": distribute_tensor(torch.zeros_like(uneven), grid, fsdp_tp, src_data_rank=None)}
        exact = torch.equal(ckptr.load(step, into)["x"].full_tensor(), uneven) and torch.equal(ckptr.load(step)["x"], uneven)
        chunks = sum(1 for f in (Path(directory) / str(step) / "arrays").rglob("*") if f.is_file() and f.name != "zarr.json")
        say(f"rank {rank} fsdp+tp uneven {save.__name__} exact: {exact}, {chunks} chunk files")
    # small ones split on dim 1: gathered whole, as bytes (gloo gathers none of these dtypes itself)
    small = {str(dtype): torch.arange(24).reshape(4, 6).to(dtype) for dtype in (
        torch.int16, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.bfloat16, torch.bool)}
    ckptr.save(3, {k: distribute_tensor(v, line, [Shard(1)], src_data_rank=None) for k, v in small.items()}, force=True)
    loaded = ckptr.load(3)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in small.items()), loaded
    say(f"rank {rank} small gathered exact: {len(small)} dtypes")
    # a lazily conjugated complex one (a view), split on either dimension: its values (gathering it as bytes raised)
    values = torch.arange(24.0).reshape(4, 6).to(torch.complex64) * (1 + 2j)
    conjugated = {f"dim {d}": DTensor.from_local(distribute_tensor(values, line, [Shard(d)], src_data_rank=None)
                                                 .to_local().conj(), line, [Shard(d)], run_check=False,
                                                 shape=values.shape, stride=values.stride()) for d in (0, 1)}
    ckptr.save(8, conjugated, force=True)
    say(f"rank {rank} small conjugated: {all(torch.equal(v, values.conj()) for v in ckptr.load(8).values())}")
    # a pending reduction (Partial), small or large: refused, never saved as the sum of the ranks' bit patterns
    for step, part in ((5, torch.full((2, 3), 1.5)), (6, torch.full((600, 520), 1.5))):
        try:
            ckptr.save(step, {"p": DTensor.from_local(part, line, [Partial()], run_check=False)}, force=True)
        except TypeError as e:
            say(f"rank {rank} partial {tuple(part.shape)} refused: {e}")
    # more dimensions than a zarr array has (1.2 MB: written shard by shard): refused naming it, before any write
    deep = torch.ones((1,) * 32 + (300000,))
    try:
        ckptr.save(7, {"d": distribute_tensor(deep, line, [Shard(32)], src_data_rank=None)}, force=True)
    except ValueError as e:
        say(f"rank {rank} 33 dimensions refused: {e}")
    # 0-d (a replicated counter), loaded into a 0-d template
    ckptr.save(4, {"n": distribute_tensor(torch.tensor(7), line, [Replicate()])}, force=True)
    loaded = ckptr.load(4, {"n": distribute_tensor(torch.tensor(0), line, [Replicate()])})["n"]
    say(f"rank {rank} 0-d loaded {type(loaded).__name__} {tuple(loaded.shape)} {loaded.full_tensor().item()}")
    # small ones on meshes of ranks 0-1 and 2-3, which every rank holds (empty outside its mesh): written by their
    # ranks (gathered, they raised IndexError outside the mesh, or OSError on rank 0, which packs, outside mesh b)
    halves = [DeviceMesh("cpu", torch.tensor([0, 1])), DeviceMesh("cpu", torch.tensor([2, 3]))]
    values = torch.arange(12.0).reshape(3, 4)
    placements = {"rows": Shard(0), "columns": Shard(1), "replicated": Replicate()}
    ckptr.save(9, {f"{name} {m}": distribute_tensor(values, half, [placement], src_data_rank=None)
                   for m, half in enumerate(halves) for name, placement in placements.items()}, force=True)
    say(f"rank {rank} small on half meshes: {sorted(k for k, v in ckptr.load(9).items() if torch.equal(v, values))}")
    # a mesh of ranks out of order: torch's collectives place the shards by rank, its chunk list by place in the mesh
    # (small ones were gathered in rank order, large ones written in mesh order, both loaded into templates in mesh
    # order: silently wrong values); split there, refused saved or loaded into; replicated, saved and loaded
    backwards = DeviceMesh("cpu", torch.tensor([3, 2, 1, 0]))
    ckptr.save(10, {"r": distribute_tensor(values, backwards, [Replicate()])}, force=True)
    loaded = ckptr.load(10, {"r": distribute_tensor(torch.zeros_like(values), backwards, [Replicate()])})["r"]
    say(f"rank {rank} backwards replicated: {torch.equal(loaded.to_local(), values)}")
    for shape in ((4, 3), (600, 520)):
        whole = torch.arange(float(math.prod(shape))).reshape(shape)
        try:
            ckptr.save(11, {"r": distribute_tensor(whole, backwards, [Shard(0)])}, force=True)
        except TypeError as e:
            say(f"rank {rank} backwards {shape} refused: {e}")
    try:
        ckptr.load(10, {"r": distribute_tensor(values, backwards, [Shard(0)])})
    except ckpt.errors.TreeMismatchError as e:
        say(f"rank {rank} backwards template refused: {e}")
    # a value the template's dtype cannot hold (70000.0 in float16), in rank 3's shard: refused there, naming the leaf
    # (torch's cast made it inf); the other ranks load their shards (a load has no collective)
    holds = torch.zeros(4, 6)
    holds[3, 0] = 70000.0
    ckptr.save(12, {"h": distribute_tensor(holds, line, [Shard(0)], src_data_rank=None)}, force=True)
    try:
        into = distribute_tensor(torch.zeros(4, 6, dtype=torch.float16), line, [Shard(0)], src_data_rank=None)
        say(f"rank {rank} cast loaded {ckptr.load(12, {'h': into})['h'].to_local().tolist()}")
    except ckpt.errors.TreeMismatchError as e:
        say(f"rank {rank} cast refused: {e}")
    # FSDP2 over tensor parallelism, with modules the TP plan leaves alone (a LayerNorm, a head): their DTensors lie on
    # mesh["dp"], whose slices (ranks 0, 2 and 1, 3) hold copies: written once, loaded into every slice, as DCP does
    # (refused on every rank as DTensors of one key over meshes of other ranks); copies that differ, refused
    import torch.distributed.checkpoint as dcp

    def tp_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8),
                                    torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
        parallelize_module(model, grid_named["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=grid_named["dp"])
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    grid_named = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model, optimizer = tp_model()
    torch.manual_seed(1)
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    saved = dict(zip(["model", "optim"], get_state_dict(model, optimizer)))
    ckptr.save_checkpointables(13, saved, force=True)
    dcp.save(saved, checkpoint_id=f"{directory}-dcp")
    ours, theirs = tp_model(), tp_model()
    for fresh in (ours, theirs):
        fresh[0](torch.randn(4, 8)).sum().backward()
        fresh[1].step()  # (the optimizer's state, as templates)
    into = dict(zip(["model", "optim"], get_state_dict(*ours)))
    loaded = ckptr.load_checkpointables(13, into)
    set_state_dict(*ours, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    into = dict(zip(["model", "optim"], get_state_dict(*theirs)))
    dcp.load(into, checkpoint_id=f"{directory}-dcp")
    set_state_dict(*theirs, model_state_dict=into["model"], optim_state_dict=into["optim"])
    local = lambda v: v.to_local() if isinstance(v, DTensor) else v
    values = [{k: local(v) for k, v in state_tensors(*state).items()} for state in (ours, theirs, (model, optimizer))]
    say(f"rank {rank} fsdp+tp copies: {sorted(values[2]) == sorted(values[0])}, "
        f"{[k for k in values[2] if not torch.equal(values[0][k], values[1][k]) or not torch.equal(values[0][k], values[2][k])]}")
    # with two tiers, whose local tiers each save the rank's part alone, the copies are compared too (were promoted:
    # the durable step held some rows of one slice's copy, some of the other's); copies alike, saved and promoted
    local = ckpt.LocalCheckpointOptions(f"{directory}-local", save_decision_policy=sdp.FixedIntervalPolicy(1))
    with Checkpointer(f"{directory}-tiers", save_decision_policy=sdp.FixedIntervalPolicy(1), local=local) as tiers:
        copy = model[3].weight.full_tensor()
        tiers.save(1, {"model": get_state_dict(model, optimizer)[0],
                       "uneven": distribute_tensor(uneven, grid, fsdp_tp, src_data_rank=None)})
        tiers.wait()
        # (its local tiers each wrote their parts of the chunks two ranks share: promoted, one part of each was lost)
        say(f"rank {rank} two tiers uneven exact: {torch.equal(ckpt.load(f'{directory}-tiers/1')['uneven'], uneven)}")
        with torch.no_grad():
            model[3].weight.to_local().add_(rank % 2)  # (pipeline stages naming their parameters alike)
        try:
            tiers.save(2, {"model": get_state_dict(model, optimizer)[0]})
        except ckpt.errors.TreeMismatchError as e:
            say(f"rank {rank} two tiers differing copies refused: {e.differences}")
        say(f"rank {rank} two tiers steps {[(c.step, sorted(c.locations)) for c in tiers.checkpoints]}, locally "
            f"{sorted(os.listdir(f'{directory}-local/process_{rank}'))}, step 1 holds the copies: "
            f"{torch.equal(ckpt.load(f'{directory}-tiers/1')['model']['3.weight'], copy)}")
    try:
        ckptr.save_checkpointables(14, {"model": get_state_dict(model, optimizer)[0]}, force=True)
    except ckpt.errors.TreeMismatchError as e:
        say(f"rank {rank} differing copies refused: {e}")
        if rank == 0:  # a script ending on the error: rank 0's process, which keeps the store, ends at once (the others,
            os._exit(0)  # still reading the differences there, raised torch's DistNetworkError, naming nothing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(mode: str, ranks: int) -> bool:
    """Forks ``ranks`` ranks running ``mode``; True when all of them succeed (one failing kills the rest)."""
    port, running = free_port(), set()
    for r in range(ranks):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(r, ranks, port, mode)
            except SystemExit:
                raise  # (a rank that ends as a script does, through the interpreter's exit and its exit hooks)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os._exit(code)
        running.add(pid)
    while running:
        pid, status = os.wait()
        running.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            for other in running:
                os.kill(other, signal.SIGKILL)
                os.waitpid(other, 0)
            return False
    return True


if __name__ == "__main__":
    directory, reference = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    for phase in sys.argv[3:]:
        mode, world = phase.split(":")
        if not job(mode, int(world)) and mode != "crash":
            sys.exit(1)
        say(f"job {phase} ended")
