"""Sharded torch: FSDP2 state dicts (DTensors) saved by 2 gloo ranks on 127.0.0.1, reloaded at 2, 1 and 4
ranks and in a plain process, and a single-process checkpoint loaded into DTensor templates."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests import procs

torch = pytest.importorskip("torch")
WORKER = Path(__file__).with_name("torch_multiprocess_worker.py")


def run_jobs(directory: Path, reference: Path, *phases: str) -> str:
    result = procs.run_script(WORKER, str(directory), str(reference), *phases, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def full_reference(reference: Path) -> dict[str, np.ndarray]:
    with np.load(reference) as found:
        return {key: found[key] for key in found.files}


@pytest.mark.timeout(600)  # 8 ranks in all, forked; 2-3 minutes on 2 shared cores, more at a load of 20
def test_an_fsdp2_checkpoint_of_two_ranks_reloads_bit_exact_at_two_one_and_four_ranks_and_in_a_plain_process(tmp_path):
    directory, reference = tmp_path / "run", tmp_path / "reference.npz"
    out = run_jobs(directory, reference, "train:2", "load:1", "load:4")
    for line in ["rank 0 saved [1, 2, 3]", "rank 1 saved [1, 2, 3]",
                 "rank 0 of 2 reloaded step 3: 16 tensors bit-exact", "rank 1 of 2 reloaded step 3: 16 tensors bit-exact",
                 "rank 0 of 1 loaded step 3: 16 tensors bit-exact"] + [
                 f"rank {r} of 4 loaded step 3: 16 tensors bit-exact" for r in range(4)]:
        assert line in out, out
    assert "is an FSDP1 ShardedTensor, which ckpt does not store" in out
    assert sorted(p.name for p in (directory / "3" / "arrays").iterdir()) == ["0", "1", "2"]  # the 1 MB leaves
    import ckpt

    expected = full_reference(reference)
    loaded = ckpt.load_checkpointables(directory / "3")  # a plain process: whole tensors, as saved
    found = {f"model/{k}": v for k, v in loaded["model"].items()}
    found.update({f"optim/{p}/{k}": v for p, state in loaded["optim"]["state"].items() for k, v in state.items()})
    assert sorted(found) == sorted(expected)
    for key, value in found.items():
        assert isinstance(value, torch.Tensor) and np.array_equal(value.numpy(), expected[key]), key
    templates = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in loaded["model"].items()}
    into_plain = ckpt.load(directory / "3", templates, checkpointable_name="model")  # the reverse of sharding
    assert all(np.array_equal(into_plain[k].numpy(), expected[f"model/{k}"]) for k in templates)

    # A checkpoint of one process (plain tensors, as DDP saves them) into the DTensor templates of 4 ranks.
    single = tmp_path / "single"
    ckpt.save_checkpointables(single / "7", {"model": loaded["model"], "optim": loaded["optim"]})
    out = run_jobs(single, reference, "load:4")
    assert all(f"rank {r} of 4 loaded step 7: 16 tensors bit-exact" in out for r in range(4)), out


@pytest.mark.timeout(300)
def test_ranks_that_each_call_the_free_save_write_one_whole_checkpoint(tmp_path):
    """(A rank saving a large DTensor alone, under MultiprocessingOptions(processes=SingleProcess()), wrote a step
    of its own shards only, which no load could read. A large replicated one, held whole, was refused. Each
    DTensor's local shard was copied to host memory twice a save, once only to learn its dtype. Every slice of a
    mesh wrote its copy of a DTensor they hold alike, through a Processes object without compare. A DTensor a template
    holds at two keys, split over the ranks, saved apart: rank 1, holding no rows, tied the keys and rank 0 did not.)"""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "free:2")
    assert "rank 0 free save: whole" in out and "rank 1 free save: whole" in out, out
    for r in (0, 1):  # each rank's shard of the large one, and the small one's gathered whole, read once (not
        assert f"rank {r} free save copies: [('big', 1), ('small', 1)]" in out, out  # also for its dtype: twice)
    # (through a Processes object without compare, every slice of a mesh wrote its copy of a DTensor they hold alike)
    assert "rank 0 uncompared copies: [('copy', 1)], True" in out and "rank 1 uncompared copies: [('copy', 0)], True" in out, out
    for r in (0, 1):  # one rank saving a DTensor alone wrote its own shards only: a step that did not load
        for key in ("big", "small"):  # (a small one was gathered: rank 0 alone waited there for rank 1)
            assert (f"rank {r} alone refused: checkpointable 'state': the array at ['{key}'] is spread over processes, "
                    f"but this process saves {tmp_path / f'run-alone{r}'} alone (MultiprocessingOptions.processes)"
                    ) in out, out
        assert not (tmp_path / f"run-alone{r}").exists()
        assert f"rank {r} alone replicated: whole" in out, out  # (was refused as spread over processes)
        assert f"rank {r} alone replicated float16: torch.float16, True" in out, out  # (was numpy's TypeError)
    assert out.count("rank 0 in rank 0's mesh: whole") == 2, out
    for key in ("big", "small"):  # rank 1 holds none of a DTensor on a mesh of rank 0 alone
        assert (f"rank 1 outside rank 0's mesh refused: checkpointable 'state': the array at ['{key}'] is spread over "
                "processes") in out, out
    assert "rank 0 meta templates: ['cpu']" in out and "rank 1 meta templates: ['cpu']" in out, out  # not more meta
    for r in (0, 1):  # a template's DTensor at two keys saved apart: split over the ranks, untied on every rank
        assert f"rank {r} tied templates: split False, replicated True, True" in out, out  # (rank 1 tied them)


@pytest.mark.timeout(300)
def test_ranks_saving_other_keys_paths_or_steps_are_refused_on_every_rank_before_anything_is_written(tmp_path):
    """(Checkpointers opened on other roots waited for each other at every barrier until the timeout; a small
    DTensor that one rank alone saved, or of another layout there, ended the job in gloo's gathering of small
    DTensors, which ran before the trees were compared, or saved one rank's bytes as another's. A tensor of another
    shape or dtype on rank 1, rank 0's written alone, was saved, rank 1's lost, as was a value of another type.)"""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "differ:2")
    for r in (0, 1):
        assert (f"rank {r} checkpointer refused: [\"state['stage0.weight'] on process 0, not on process 1\", "
                f"\"state['stage1.weight'] on process 1, not on process 0\"]") in out, out
        assert f"rank {r} free refused: [\"state['stage0.weight'] on process 0" in out, out
        assert (f"rank {r} path refused: ['process 1 saves to {tmp_path / 'run'}-rank1, process 0 to "
                f"{tmp_path / 'run'}-rank0']") in out, out  # (nothing else: it said the containers differed too)
        assert (f"rank {r} step refused: ['process 1 saves to {tmp_path / 'run' / '6'}, process 0 to "
                f"{tmp_path / 'run' / '5'}']") in out, out
        assert f"rank {r} dtensor refused: [\"state['b'] on process 0, not on process 1\"]" in out, out
        assert (f"rank {r} layout refused: [\"state['a']: a DTensor of shape (4, 6), float32, (Shard(dim=0),) over a "
                "mesh of shape (2,) of ranks 0-1 on process 0, not on process 1\", \"state['a']: a DTensor of shape "
                "(4, 6), float32, (Shard(dim=1),) over a mesh of shape (2,) of ranks 0-1 on process 1, not on process 0\"]"
                ) in out, out
        # the same key over meshes of other ranks (pipeline stages naming their parameters alike): each stage's
        # shards went into one array, a large one's chunks mixed, a small one saved as rank 0's alone
        assert (f"rank {r} mesh refused: [\"state['a']: a DTensor of shape (2,), float32, (Shard(dim=0),) over a "
                "mesh of shape (1,) of rank 0 on process 0, not on process 1\", \"state['a']: a DTensor of shape (2,), "
                "float32, (Shard(dim=0),) over a mesh of shape (1,) of rank 1 on process 1, not on process 0\"]") in out, out
        assert (f"rank {r} shape refused: [\"state['buf']: float32 of shape (3,) on process 0, float32 of "
                "shape (4,) on process 1\"]") in out, out
        assert (f"rank {r} dtype refused: [\"state['buf']: int64 of shape (2,) on process 0, float32 of "
                "shape (2,) on process 1\"]") in out, out
        # (saved as rank 0's int: rank 1's str was lost, and loaded as an int there; values alike in type are saved)
        assert (f"rank {r} inline refused: [\"state['n']: a value of type int stored inline on process 0, a value of "
                "type str stored inline on process 1\"]") in out, out
        assert (f"rank {r} full state dict refused: the processes of this job save different trees to "
                f"{tmp_path / 'run'}-full: process 1 saves no leaf, process 0 saves 22 (state['model']['bias'] first). "
                "State that process 0 alone holds (a full state dict: ") in out, out
        assert "is saved from process 0 alone (`if rank == 0:`) inside `with ckpt.Context(multiprocessing_options=" in out
        assert (f"rank {r} roots refused: the processes of this job open Checkpointers on different roots (process 0: "
                f"{tmp_path / 'run'}-root0; process 1: {tmp_path / 'run'}-root1)") in out, out
        assert f"rank {r} steps [] entries ['run']" in out, out
        # two tiers (were saved: each local tier saved alone, the promotion copied rank 0's tree, rank 1's lost)
        assert (f"rank {r} two tiers step 1 refused: [\"state['stage0.weight'] on process 0, not on process 1\", "
                f"\"state['stage1.weight'] on process 1, not on process 0\"]") in out, out
        assert (f"rank {r} two tiers step 2 refused: [\"state['buf']: float32 of shape (3,) on process 0, float32 of "
                "shape (4,) on process 1\", \"state['n']: a value of type int stored inline on process 0, a value of type "
                "str stored inline on process 1\"]") in out, out
        assert (f"rank {r} two tiers steps [(4, ['durable', 'local'])], locally ['.ckpt.lock', '3', '4', "
                "'ckpt-root.json'], durable ['.ckpt.lock', '4']") in out, out


@pytest.mark.timeout(300)
def test_dtensors_of_unusual_layouts_at_four_ranks(tmp_path):
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "dtensors:4")
    for r in range(4):
        # a lone _StridedShard: each rank's rows lie apart (torch reports one wrong block): refused, not miswritten
        assert (f"rank {r} strided refused: checkpointable 'state': DTensor at ['x'] has the placements "
                "(_StridedShard(dim=0, sf=2),): its _S(0, 2) on mesh dimension 0 leaves each rank 2 pieces") in out, out
        # FSDP2 over tensor parallelism: saved as it is, a chunk per rank (not one per row: 600 files)
        assert f"rank {r} fsdp+tp exact, steps [2], 4 chunk files" in out, out
        for save in ("save", "save_async"):  # rows that do not divide 2 x 2: chunks of the smallest block, some
            assert f"rank {r} fsdp+tp uneven {save} exact: True, 5 chunk files" in out, out  # shared (were 517 rows)
        assert f"rank {r} small gathered exact: 7 dtypes" in out, out
        assert f"rank {r} small conjugated: True" in out, out  # (was ConnectionError: 'another rank stopped')
        assert f"rank {r} 0-d loaded DTensor () 7" in out, out
        assert (f"rank {r} small on half meshes: ['columns 0', 'columns 1', 'replicated 0', 'replicated 1', 'rows 0', "
                "'rows 1']") in out, out  # (was IndexError outside a mesh, or OSError on rank 0 outside mesh 1)
        # (tensorstore refused it while it was written: "Rank 33 is outside valid range [0, 32]", naming no leaf)
        assert f"rank {r} 33 dimensions refused: torch tensor at ['d'] has 33 dimensions; ckpt stores at most 32" in out
        # a mesh of ranks out of order (torch's collectives and its chunk list disagree on each shard's place): split
        # there, refused (a small one was saved in rank order and a large one in mesh order, each loaded into a
        # template in mesh order: silently wrong values); replicated, saved and loaded
        assert f"rank {r} backwards replicated: True" in out, out
        for shape in ((4, 3), (600, 520)):
            assert (f"rank {r} backwards {shape} refused: checkpointable 'state': DTensor at ['r'] has no one layout: it "
                    "is split (S(0)) over dimension 0 of a mesh of shape (4,) of ranks [3, 2, 1, 0], along which the ranks "
                    "are not in ascending order") in out, out
        assert (f"rank {r} backwards template refused: User-provided restore item and on-disk value differ in "
                f"{tmp_path / 'run' / '10'}: state['r']: it cannot be restored as a DTensor of the abstract tree (TypeError: "
                "a DTensor template with the placements (Shard(dim=0),) cannot be loaded into: it is split (S(0)) over "
                "dimension 0 of a mesh of shape (4,) of ranks [3, 2, 1, 0], along which") in out, out
        # a value the template's dtype cannot hold, in rank 3's shard: refused there (torch made it inf), loaded elsewhere
        assert (f"rank {r} cast loaded [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]" if r < 3 else
                f"rank 3 cast refused: User-provided restore item and on-disk value differ in {tmp_path / 'run' / '12'}: "
                "state['h']: it cannot be restored as a DTensor of the abstract tree (OutOfRangeError: its float32 value "
                "70000.0 does not fit float16 (it would become inf") in out, out
        # FSDP2 over TP with a LayerNorm and a head the TP plan leaves alone, on mesh["dp"], whose slices hold copies:
        # saved once and loaded bit for bit as DCP loads it (was refused: "a DTensor ... over a mesh of shape (2,) of
        # ranks [0, 2] on process 0, not on process 1"); copies that differ (pipeline stages), refused
        assert f"rank {r} fsdp+tp copies: True, []" in out, out
        assert (f"rank {r} two tiers differing copies refused: [\"state['model']['3.weight']: its copies on the slices (0, 2), "
                "(1, 3) of one mesh hold other values\"]") in out, out
        assert f"rank {r} two tiers uneven exact: True" in out, out  # (each local tier's part of a shared chunk)
        assert (f"rank {r} two tiers steps [(1, ['durable', 'local'])], locally ['.ckpt.lock', '1', 'ckpt-root.json'], "
                "step 1 holds the copies: True") in out, out
        assert (f"rank {r} differing copies refused: the processes of this job save different values under one key path "
                f"to {tmp_path / 'run' / '14'}: model['3.weight']: its copies on the slices (0, 2), (1, 3) of one mesh "
                "hold other values.") in out, out
        for shape in ((2, 3), (600, 520)):  # a small one too, which was gathered as bytes: sums of bit patterns
            assert (f"rank {r} partial {shape} refused: checkpointable 'state': DTensor at ['p'] has the placement "
                    "P(sum) (a pending reduction)") in out, out


@pytest.mark.timeout(300)
def test_a_save_failing_on_one_rank_raises_on_every_rank_at_once_and_commits_nothing(tmp_path):
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "fail:2")
    for how, step in (("sync", 1), ("async", 2)):
        assert f"rank 1 {how} failed: OSError: disk full on rank 1" in out, out
        assert (f"rank 0 {how} failed: RuntimeError: the save of {tmp_path / 'run' / str(step)} failed in another "
                "process (process 1: OSError: disk full on rank 1); nothing was committed") in out, out
    assert "rank 1 start failed: ValueError: no snapshot on rank 1" in out, out
    assert (f"rank 0 start failed: RuntimeError: the save of {tmp_path / 'run' / '3'} failed in another process "
            "(process 1: ValueError: no snapshot on rank 1); nothing was committed") in out, out
    for how, step in (("sync", 7), ("async", 8)):  # (async: rank 0 waited at the commit until the timeout)
        refused = ("the array at ['x'] cannot be stored as float16 (the storage options' dtype): its float32 value "
                   "10000000000.0 does not fit float16 (it would become inf")
        assert re.search(rf"rank 1 stored {how} failed: \w+Error: .*{re.escape(refused)}", out), out
        assert (f"rank 0 stored {how} failed: RuntimeError: the save of {tmp_path / 'run' / str(step)} failed in "
                f"another process (process 1: ") in out and out.count(refused) == 4, out
    for how, path in (("plan", tmp_path / "run" / "4"), ("free", tmp_path / "run-free")):
        assert f"rank 1 {how} failed: UnregisteredTypeError: checkpointable 'state': leaf at ['w'] has type" in out, out
        assert (f"rank 0 {how} failed: RuntimeError: the save of {path} failed in another process (process 1: "
                "UnregisteredTypeError: checkpointable 'state': leaf at ['w'] has type builtins.object") in out, out
    said = ("ValueError: DTensor at ['w'] does not hold what its layout says: its local shard on this rank has the shape "
            "(1, 6), where its layout (global shape (4, 6), (Shard(dim=0),) over a mesh of shape (2,) of ranks 0-1) puts a "
            "block of the shape (2, 6) (torch.chunk's split)")
    assert f"rank 1 misshapen failed: {said}" in out, out  # (was raised in the gathering, rank 0 waiting there)
    assert (f"rank 0 misshapen failed: RuntimeError: the save of {tmp_path / 'run' / '4'} failed in another process "
            f"(process 1: {said}") in out, out
    assert "rank 1 copy failed: MemoryError: no memory for the copies on rank 1\n" in out, out
    assert (f"rank 0 copy failed: RuntimeError: the save of {tmp_path / 'run' / '4'} failed in another process (process 1: "
            "MemoryError: no memory for the copies on rank 1); nothing was committed") in out, out  # (was the timeout)
    said = f"StepAlreadyExistsError: step 5 already exists at {tmp_path / 'run' / '5'}; pass overwrite=True to replace it"
    assert f"rank 1 overwrite failed: {said}" in out, out  # (rank 0 waited for rank 1 until the timeout)
    assert (f"rank 0 overwrite failed: RuntimeError: the save of {tmp_path / 'run' / '5'} failed in another process "
            f"(process 1: {said}); nothing was committed") in out, out
    # (a forced save skipped the decision's broadcast: the ranks waited for each other until the timeout)
    said = ("process 1 saves step 6 without force=True, process 0 with it: every process passes the same force (a "
            f"forced save skips the save-decision policy) to the save of one step of {tmp_path / 'run'}; nothing was written")
    assert f"rank 1 force failed: ValueError: {said}\n" in out, out
    assert (f"rank 0 force failed: RuntimeError: the save of {tmp_path / 'run' / '6'} failed in another process "
            f"(process 1: ValueError: {said}); nothing was committed") in out, out
    assert "rank 0 behind forced: False" in out, out  # rank 0's policy declines a step below the latest
    assert "rank 1 behind forced failed: process 1 saves step 3 with force=True, process 0 without it" in out, out
    assert "rank 0 steps [5], step 5 holds [1.0, 1.0]" in out and "rank 1 steps [5], step 5 holds [1.0, 1.0]" in out, out
    assert not (tmp_path / "run-free").exists()
    # two tiers, a local save that fails on rank 1 alone at a step to promote: rank 1 raised, rank 0 waited for it in
    # the promotion until the timeout, and the ranks' next saves for each other
    for how, step in (("sync", 2), ("async", 4)):
        assert f"rank 1 two tiers {how} failed: OSError: disk full on rank 1" in out, out
        assert (f"rank 0 two tiers {how} failed: RuntimeError: the promotion of step {step} to "
                f"{tmp_path / 'run-tiers' / str(step)} failed in another process (process 1: OSError: disk full on rank "
                "1); nothing was committed") in out, out
    # steps that stay on the local tiers: rank 1 raised, rank 0's save went on (its step on rank 0 alone); a failure
    # of an async save no one waited for is raised by the next save on every rank (where the ranks meet)
    for how, step in (("local sync", 7), ("local async", 9), ("local async, not waited for", 11)):
        assert f"rank 1 two tiers {how} failed: OSError: disk full on rank 1" in out, out
        assert (f"rank 0 two tiers {how} failed: RuntimeError: the save of step {step} to the local tiers failed in "
                "another process (process 1: OSError: disk full on rank 1)\n") in out, out
    # each failed step saved again without overwrite=True: rank 0 had kept its copy, and refused it (StepAlreadyExistsError,
    # rank 1 a RuntimeError naming it); now every rank that committed its copy discards it once the save failed
    for r in (0, 1):
        for how in ("sync", "async", "local sync", "local async"):
            assert f"rank {r} two tiers {how} saved again: True" in out, out
        assert (f"rank {r} two tiers steps [(2, ['durable']), (4, ['durable']), (6, ['durable']), "
                "(14, ['durable', 'local'])]") in out, out


@pytest.mark.timeout(300)
def test_should_save_or_reload_on_rank_0_alone_changes_no_save_on_any_rank(tmp_path):
    """(Each decision's message was named by a count of decisions: a should_save on rank 0 alone shifted every later
    name, so rank 1 read the answers of earlier steps: it returned False from the save of step 4, which rank 0
    waited for until the timeout, step 4 lost; a reload on rank 0 alone made both ranks wait until the timeout. A
    should_save on rank 1 alone, which waits for rank 0's answer, timed out saying that every rank calls the same
    methods, which should_save need not.)"""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "alone:2")
    for r in (0, 1):
        assert f"rank {r} alone saved {[step % 2 == 0 for step in range(10)]}, steps [0, 2, 4, 6, 8]" in out, out
        # steps 2, 3 and 2 again, the policy's answer changed between: rank 1 asked again before rank 0 (rank 0 said yes
        # and saved, rank 1 had read its first no: rank 0 waited for rank 1's save until the timeout)
        assert f"rank {r} asked again [False, False, False, False, True], steps [4]" in out, out
        # then 1000 steps asked, none saved: ~250 bytes each were kept until the next save; the first answer still
        held = re.search(rf"rank {r} asked 1000 steps, holding (\d+) bytes a step; step 5 again: False", out)
        assert held and int(held[1]) < 10, out
    assert ("rank 1 alone asked: should_save(10) on process 1 waited for process 0's answer, which decides for every "
            "process: call should_save(10) on process 0 too wherever another process calls it (rank 1 of 2 waited 1 s "
            f"for rank 0's '{tmp_path / 'run'}-alone/") in out, out


@pytest.mark.timeout(300)
def test_a_step_or_checkpoint_every_rank_deletes_is_gone_on_every_rank_before_any_uses_it_again(tmp_path):
    """(Rank 1 returned from delete at once, rank 0 deleting the step: rank 1's save of the step found it still
    there, StepAlreadyExistsError. Every rank deleting one checkpoint with ckpt.delete, as Orbax's says, raced:
    one deleted it while another still loaded it, or found nothing to delete, CheckpointNotFoundError.)"""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "delete:2")
    assert "rank 0 steps [0, 1, 2], step 2 holds [25.0, 25.0]" in out, out
    assert "rank 1 steps [0, 1, 2], step 2 holds [25.0, 25.0]" in out, out
    # ckpt.delete on every rank: rank 0 deleted while rank 1 still loaded, rank 1 found nothing to delete
    for r in (0, 1):
        assert (f"rank {r} free deletes refused: the processes of this job delete different checkpoints (process 0: "
                f"{tmp_path / 'run' / '0'}; process 1: {tmp_path / 'run' / '1'})") in out, out
        assert f"rank {r} free deletes: steps [0, 1, 2]" in out, out
        assert (f"rank {r} deletes refused: the processes of this job delete different steps (process 0: 0; process 1: "
                f"1) of {tmp_path / 'run'}: every process deletes the same one; nothing was deleted") in out, out
        assert (f"rank {r} missing deletes refused: the processes of this job delete different steps (process 0: 2; "
                f"process 1: 7) of {tmp_path / 'run'}: every process deletes the same one; nothing was deleted") in out, out
        assert f"rank {r} deletes: steps [0, 1, 2]" in out, out
        assert f"rank {r} after the failed deletion: steps [0, 1, 2]" in out, out
    # a deletion that failed where the step is deleted (it said "; nothing was committed" on the other rank)
    said = f"PermissionError: cannot delete {tmp_path / 'run' / '1'}"
    assert f"rank 0 deletion failed: {said}\n" in out, out
    assert (f"rank 1 deletion failed: RuntimeError: the deletion of step 1 ({tmp_path / 'run' / '1'}) failed in "
            f"another process (process 0: {said})\n") in out, out
    for r in (0, 1):  # (rank 0 loaded step 2, rank 1 step 3: a sharded state would have mixed the two)
        assert f"rank {r} loads the latest while step 3 is written: [3.0, 3.0]" in out, out


@pytest.mark.timeout(300)
def test_with_two_tiers_every_rank_gets_rank_0s_save_decision_whatever_its_local_policy_says(tmp_path):
    """(Each rank's local tier decided alone: with local policies that differ, or decide by each rank's clock,
    should_save and save answered True on one rank and False on another, at steps 2, 3 and 4.) Then steps the ranks
    delete differently, a save rank 0 alone forces, and a step rank 1 alone overwrites: each raises on every rank at
    once, nothing deleted or replaced."""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "policies:2")
    for r in (0, 1):
        assert (f"rank {r} saved [True, False, True, False, True, False, True], locally "
                "['.ckpt.lock', '4', '6', 'ckpt-root.json']") in out, out
        # a step rank 1's local tier alone keeps, saved again: rank 0 declines it, and every rank returns False (rank 1
        # raised StepAlreadyExistsError alone while rank 0 went on: the ranks diverged)
        assert f"rank {r} saved step 2, which rank 1 alone holds, again: False" in out, out
    # one rank 0's alone keeps: every rank raises (rank 0 alone did, while rank 1 returned False)
    said = (f"StepAlreadyExistsError: step 2 already exists at {tmp_path / 'run-kept0' / 'process_0' / '2'}")
    assert f"rank 0 saved step 2, which rank 0 alone holds, again: {said}; pass overwrite=True to replace it\n" in out
    assert (f"rank 1 saved step 2, which rank 0 alone holds, again: {said} (process 0's copy); pass overwrite=True on "
            "every process to replace it\n") in out, out
    import ckpt

    # (each rank copied its own values of the leaves rank 0 writes alone into the durable steps, which their
    # checksums, rank 0's, did not match: every durable step was damaged, and the job could not resume)
    for step in (0, 4):
        loaded = ckpt.load(tmp_path / "run" / "durable" / str(step))
        assert loaded["rng"].tolist() == [0, 0, 0] and not loaded["big_rng"].any(), step
        assert torch.equal(loaded["rows"], torch.arange(600 * 520.0).reshape(600, 520)), step
    # steps the ranks delete differently: each rank had deleted its local copy before they compared their steps
    for r in (0, 1):
        assert (f"rank {r} tiers deletes refused: ValueError: the processes of this job delete different steps (process "
                f"0: 2; process 1: 3) of {tmp_path / 'run' / 'durable2'}: every process deletes the same one; nothing was "
                "deleted") in out, out
        assert (f"rank {r} tiers steps after the deletions [(2, ['durable', 'local'])], locally "
                "['.ckpt.lock', '2', '3', 'ckpt-root.json']") in out, out
    # step 5, which rank 0 alone forces and promotes: rank 0 waited in the promotion for rank 1 until the timeout (then
    # failed there, after its local save); step 7, which rank 1 alone forces and rank 0's local tier alone saves: rank 0
    # waited for rank 1 where the trees are compared, and the ranks' next saves for each other. Now each fails where the
    # ranks' trees are compared, before either tier is written.
    for step, label, forced in ((5, "force", ("without", "with")), (7, "local force", ("with", "without"))):
        said = (f"process 1 saves step {step} {forced[0]} force=True, process 0 {forced[1]} it: every process passes the "
                "same force (a forced save skips the save-decision policy) to the save of one step of "
                f"{tmp_path / 'run' / 'durable2'}; nothing was written")
        assert f"rank 1 tiers {label} failed: ValueError: {said}\n" in out, out
        assert (f"rank 0 tiers {label} failed: RuntimeError: the save of {tmp_path / 'run' / 'durable2' / str(step)} "
                f"failed in another process (process 1: ValueError: {said}); nothing was committed") in out, out
    # step 6 again, which rank 1 alone overwrites: each rank raises where the ranks meet before either tier is written
    said = (f"StepAlreadyExistsError: step 6 already exists at {tmp_path / 'run-local2' / 'process_0' / '6'}; pass "
            "overwrite=True to replace it")
    assert f"rank 0 tiers overwrite failed: {said}\n" in out, out
    assert (f"rank 1 tiers overwrite failed: RuntimeError: the save of {tmp_path / 'run' / 'durable2' / '6'} failed in "
            f"another process (process 0: {said}); nothing was committed") in out, out
    for r in (0, 1):  # (and the ranks still made the same calls)
        assert f"rank {r} tiers steps [(2, ['durable']), (6, ['durable', 'local']), (8, ['durable', 'local'])], step 6 " \
               "holds [1.0, 1.0]" in out, out
    # step 9, which the local tiers alone held, saved again with overwrite=True on rank 0 alone: rank 1 kept its old copy
    # (said it saved; forced, promoted it, and the durable step mixed rank 0's new part with rank 1's old one); step 11,
    # held by rank 0 alone (its local save failed on rank 1), forced: rank 0 promoted its copy, rank 1 a new one.
    # Now step 9 raises on every rank where the ranks meet, before either tier is written; step 11's failed save left
    # no local copy (rank 0 discarded its own), and the forced save saves it anew on every rank.
    said = (f"StepAlreadyExistsError: step 9 already exists at {tmp_path / 'run-local2' / 'process_1' / '9'}; pass "
            "overwrite=True to replace it")
    assert f"rank 1 tiers local overwrite failed: {said}\n" in out, out
    assert f"rank 0 tiers local overwrite failed: RuntimeError: the save of {tmp_path / 'run' / 'durable2' / '9'}" in out
    said = ("StepAlreadyExistsError: process 1 saves step 9 with force=True promoting the copy its local tier holds, "
            "process 0 anew: ")
    assert f"rank 1 tiers forced overwrite failed: {said}" in out, out
    assert (f"rank 0 tiers forced overwrite failed: RuntimeError: the save of {tmp_path / 'run' / 'durable2' / '9'} "
            f"failed in another process (process 1: {said}") in out, out
    for r in (0, 1):
        assert f"rank {r} tiers forced again: True" in out, out
        assert (f"rank {r} tiers step 9 holds [1.0, 1.0] locally, durable steps [2, 6, 8, 11], step 11 holds "
                "[2.0, 2.0]") in out, out


def test_with_two_tiers_on_s3_a_step_rank_0_alone_overwrites_keeps_its_durable_copy(tmp_path, bucket, monkeypatch):
    """(Rank 0's promotion made its temporary before it met rank 1, which refused the overwrite: on an object store the
    temporary is the step's own name, and making it removed the committed step 6 it was to replace. Every rank raised,
    saying nothing was committed, and step 6 was gone from the durable tier.)"""
    monkeypatch.setenv("CKPT_TEST_DURABLE", bucket)
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "overwritten:2")
    assert "rank 0 overwrite on rank 0 alone failed: RuntimeError" in out, out
    assert "rank 1 overwrite on rank 0 alone failed: StepAlreadyExistsError" in out, out
    for r in (0, 1):
        assert f"rank {r} durable step 6 holds [1.0, 1.0]" in out, out  # was: not a checkpoint


@pytest.mark.timeout(300)
def test_a_sigterm_to_one_rank_alone_saves_the_same_step_on_every_rank(tmp_path):
    """A SIGTERM to rank 1 only (its node preempted) was swallowed: rank 0 decides for all, and no rank saved.
    With two tiers, rank 1's local tier latched the preemption at the step rank 1 saw it (3), which rank 0 had
    decided without it, and ended rank 1's process at the next step (4), the one every rank saves for it:
    nothing reached the durable tier."""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "sigterm:2")
    for tiers in ("", " with two tiers"):
        stopped = {line.split(" stopped at ")[1] for line in out.splitlines() if f"{tiers} stopped at " in line
                   and (tiers or "two tiers" not in line)}
        assert len(stopped) == 1 and f"rank 0{tiers} stopped at" in out and f"rank 1{tiers} stopped at" in out, out
        step = int(stopped.pop().split(",")[0])
        assert step == 4 and f"{tiers} stopped at 4, steps [0, 4]" in out, out


@pytest.mark.timeout(300)
def test_a_root_one_rank_does_not_see_is_refused_on_every_rank_at_a_save_and_a_promotion(tmp_path):
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "unshared:2")
    if "rank 1 cannot make a mount namespace" in out:
        pytest.skip("no mount namespaces here (a root that one rank does not see needs one)")
    said = (f"RootDirectoryError: process 1 does not see {tmp_path / 'run' / '1.ckpt-tmp'}, which process 0 made to "
            "save the step in: the root must be one directory that every process sees")
    assert f"rank 1 refused: {said}" in out, out
    assert (f"rank 0 refused: RuntimeError: the save of {tmp_path / 'run' / '1'} failed in another process "
            f"(process 1: {said}") in out, out
    assert "rank 0 steps []" in out and "rank 1 steps []" in out, out
    assert sorted(os.listdir(tmp_path / "run")) == [".ckpt.lock", "durable"]  # nothing committed, nothing left
    said = said.replace("/1.ckpt-tmp", "/durable/2.ckpt-tmp")  # two tiers: a promotion, the same way
    assert f"rank 1 promotion refused: {said}" in out, out
    assert (f"rank 0 promotion refused: RuntimeError: the promotion of {tmp_path / 'run-local' / 'process_0' / '2'} to "
            f"{tmp_path / 'run' / 'durable' / '2'} failed in another process (process 1: {said}") in out, out
    assert "rank 0 durable steps ['.ckpt.lock']" in out, out


@pytest.mark.timeout(300)
def test_a_root_one_rank_names_through_a_symbolic_link_is_one_root(tmp_path):
    """Rank 1 opening the root through a link to it was refused ('the processes of this job open Checkpointers
    on different roots'), and a free save there ('process 1 saves to ...'): paths were compared as strings."""
    (tmp_path / "run-real").mkdir()
    (tmp_path / "run-link").symlink_to(tmp_path / "run-real")
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "linked:2")
    for r in (0, 1):
        assert f"rank {r} linked steps [2]" in out and f"rank {r} linked free [0.0, 1.0, 2.0]" in out, out
    assert sorted(os.listdir(tmp_path / "run-real")) == [".ckpt.lock", "2"]


@pytest.mark.timeout(300)
def test_a_rank_whose_store_or_whose_peer_in_a_gathering_stopped_raises_at_once_saying_so(tmp_path):
    """Rank 0's process, which keeps the job's store, stopping in a save: rank 1 raised at once a TimeoutError
    saying that it had waited the whole timeout (60 s) for rank 0. A deletion on rank 1 then, whose writer thread
    connected to the store for the first time, waited 300 s (TCPStore's retries), whatever the timeout. Rank 1
    stopping in the gathering of small DTensors: rank 0 raised gloo's RuntimeError, naming no save; rank 1, out of
    device memory there, a ConnectionError saying that another rank stopped. Rank 1 stopping in an async save: rank
    0's wait said only that the save was still running after the timeout, and its next save waited the timeout again
    at its first meeting. Two tiers, rank 1 stopping once rank 0
    committed a promotion (or, with one tier, an async save): rank 0 raised TimeoutError, though the step was durable
    (committed), and did not list it."""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "stopped:2", "gone:2", "vanish:2", "promoted:2",
                   "committed:2")
    assert (f"rank 0 raised ConnectionError: rank 0 of 2: the save of {tmp_path / 'run' / '1'} failed while the "
            "ranks gathered its small DTensors: another rank stopped, or the process group failed (RuntimeError: "
            ) in out, out
    assert "rank 1 raised OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB\n" in out, out
    assert (f"rank 0 wait raised: the save of step 1 ({tmp_path / 'run' / '1'}) is still running after 2.0 s "
            f"(AsyncOptions.timeout_secs); it waits for the other ranks at '{tmp_path / 'run'}/") in out, out
    assert "(rank 1 never arrived): a process stopped, or does not make the same ckpt calls" in out, out
    assert "rank 0 steps [0]" in out and not (tmp_path / "run" / "1").exists(), out
    # the next save raises the timeout of the save before it, at once: it met the others first, for the timeout again
    said = re.search(r"rank 0 next save raised: rank 0 of 2 waited 2 s for the other ranks at '(.*?)'", out)
    assert said and said[1].startswith(f"{tmp_path / 'run'}/") and "/save/1/" in said[1], out
    # two tiers, rank 1 stopping once rank 0 committed a promotion: the step is durable (rank 0 raised TimeoutError at
    # the promotion's last meeting, and did not list the step)
    assert "rank 0 saved the promoted step: True, steps [(1, ['durable', 'local'])]" in out, out
    assert "rank 0 wait for the committed step returned, steps [1]" in out, out
    assert ("rank 1 raised at once: rank 1 of 2 lost the job's store (kept by rank 0's process, or by the launcher's) "
            f"while it waited for rank 0's '{tmp_path / 'run'}/") in out, out
    assert ("rank 1 deletion raised at once: rank 1 of 2 lost the job's store (kept by rank 0's process, or by the "
            f"launcher's) while it waited for rank 0's '{tmp_path / 'run'}/") in out, out


@pytest.mark.timeout(300)
def test_every_rank_lists_and_loads_a_step_from_the_moment_its_save_or_promotion_is_queued(tmp_path):
    """Each rank listed a step once its own writer thread had committed it, so that latest and checkpoints read at one
    point of the program differed between ranks while an async save (or a promotion) was in flight; with two tiers,
    load() right after an async save that was promoted loaded the step before it on one rank and the new one on
    another, or raised StepNotFoundError (the first); should_save of a step whose promotion was queued said yes, though
    latest named it (and a save of it then raised StepAlreadyExistsError); a forced save of that step queued a second
    promotion, which raised StepAlreadyExistsError on rank 0 and a RuntimeError on rank 1; each rank listed a queued step
    with its own metrics and custom metadata (rank 1 {'loss': 11.0}, rank 0 {'loss': 1.0}), so that best_model_path or a
    BestN decision read meanwhile could differ between ranks. The saves here are held in the background until read."""
    out = run_jobs(tmp_path / "run", tmp_path / "unused.npz", "queued:2")
    for r in (0, 1):
        assert (f"rank {r} forced save raised StepAlreadyExistsError: step 2 already exists at "
                f"{tmp_path / 'run'}-queued/2; pass overwrite=True to replace it") in out, out
        listed = "metrics [({'loss': 1.0, 'top': inf}, {'rank': 0})]"  # (rank 0's, as the step's manifest holds them)
        assert f"rank {r} queued: latest 1, steps [0, 1], should_save False, loaded [1.0, 1.0], {listed}" in out, out
        assert f"rank {r} promotion queued: latest 0, steps [0], should_save False, loaded [0.0, 0.0], {listed}" in out, out
        assert f"rank {r} promotion queued: latest 2, steps [0, 2], should_save False, loaded [2.0, 2.0], {listed}" in out, out


def test_a_rank_that_times_out_at_a_barrier_names_the_ranks_that_never_arrived():
    """It named none ('rank 0 of 4 waited 1 s for the other ranks at ...'); in a job of more ranks than the
    store's 63-bit count can name, it says how many. (Ranks as threads, each with its own connection to a
    real TCPStore.)"""
    import datetime
    import threading

    import torch.distributed as dist
    from ckpt.distributed import TorchProcesses

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=9))
    ranks = [TorchProcesses("127.0.0.1", store.port, index, count) for index, count in [(0, 4), (1, 4), (5, 64)]]
    said: dict[int, str] = {}

    def arrive(rank: TorchProcesses) -> None:
        with pytest.raises(TimeoutError) as raised:
            rank.barrier(f"barrier of {rank.count}", 1)
        said[rank.index] = str(raised.value)

    threads = [threading.Thread(target=arrive, args=(rank,)) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in (0, 1):
        assert f"rank {i} of 4 waited 1 s for the other ranks at 'barrier of 4' (ranks 2, 3 never arrived);" in said[i]
    assert "rank 5 of 64 waited 1 s for the other ranks at 'barrier of 64' (63 of 64 ranks never arrived);" in said[5]


@pytest.mark.timeout(300)
def test_ranks_that_end_after_save_async_and_destroy_process_group_without_waiting_commit_the_step(tmp_path):
    """(The end of rank 0's process group stopped the job's store, which it kept: the exit finished neither
    rank's save, 'a background save failed before the interpreter exited: ConnectionError', exit status 0. With two
    tiers, rank 0's process ended once past the meeting of a save that stays local, before rank 1 read there whether
    a rank failed: rank 1's save failed, DistNetworkError, and so did its close() where it called it. Rank 1, the last
    to arrive at the last barrier of a save, asked the store once more after it let rank 0 go: its committed save failed,
    ConnectionError.)"""
    result = procs.run_script(WORKER, str(tmp_path / "run"), str(tmp_path / "unused.npz"), "exit:2", timeout=300)
    assert result.returncode == 0 and "rank 0 ends" in result.stdout and "rank 1 ends" in result.stdout, result
    assert "finishing it first" in result.stderr and "save failed" not in result.stderr, result.stderr
    assert "failed in the background" not in result.stderr, result.stderr
    for r in (0, 1):
        assert (tmp_path / "run-tiers-local" / f"process_{r}" / "1" / "manifest.json").exists()
    import ckpt

    assert ckpt.load(tmp_path / "run" / "1")["w"].tolist() == [1, 1], result.stderr
    assert sorted(os.listdir(tmp_path / "run" / "1" / "extra")) == ["rank_0", "rank_1"]


@pytest.mark.timeout(300)
def test_every_rank_lists_a_step_a_crash_left_set_aside_once_the_checkpointer_is_open(tmp_path):
    """A crash in an overwrite's commit where directories cannot be swapped (NFS) leaves the step set aside: rank 0
    put it back while rank 1 listed the root, so rank 1 resumed from step 4 and rank 0 from step 5."""
    import ckpt
    from ckpt import format as fmt

    directory = tmp_path / "run"
    with ckpt.Checkpointer(directory) as ckptr:
        for step in (4, 5):
            ckptr.save(step, {"w": np.ones(2)}, force=True)
    os.rename(directory / "5", directory / ("5" + fmt.REPLACED_SUFFIX))  # as the crash leaves it (marked)
    out = run_jobs(directory, tmp_path / "unused.npz", "list:2")
    assert "rank 0 lists [4, 5]" in out and "rank 1 lists [4, 5]" in out, out
