"""Checkpointables saved by handlers (ckpt.handlers, ckpt.custom) and by themselves (StatefulCheckpointable)."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import ckpt
from ckpt import Checkpointer, errors
from ckpt.training import save_decision_policies as sdp


@dataclasses.dataclass
class Vocab:
    words: list


class AbstractVocab:
    pass


class VocabHandler:
    async def save(self, directory, checkpointable):
        words = list(checkpointable.words)  # captured in the caller: later changes do not reach the step

        async def write():
            path = await directory.await_creation()
            (path / "words.json").write_text(json.dumps(words))
        return write()

    async def load(self, directory, abstract_checkpointable=None):
        async def read():
            return Vocab(json.loads((directory / "words.json").read_text()))
        return read()

    async def metadata(self, directory):
        return AbstractVocab()

    def is_handleable(self, checkpointable):
        return isinstance(checkpointable, Vocab)

    def is_abstract_handleable(self, abstract_checkpointable):
        return isinstance(abstract_checkpointable, AbstractVocab)


class Counter:
    """A StatefulCheckpointable: saves itself and loads itself back in place."""

    def __init__(self, n=0):
        self.n = n

    async def save(self, directory):
        n = self.n

        async def write():
            path = await directory.await_creation()
            (path / "n").write_text(str(n))
        return write()

    async def load(self, directory):
        async def read():
            self.n = int((directory / "n").read_text())
        return read()


def registry_context():
    ctx = ckpt.Context()
    ctx.checkpointables.registry = ckpt.handlers.local_registry().add(VocabHandler)
    return ctx


def test_a_handler_saves_beside_the_trees_and_loads_back_async_included(tmp_path):
    vocab = Vocab(["a", "b"])
    with Checkpointer(tmp_path, context=registry_context()) as ckptr:
        response = ckptr.save_checkpointables_async(0, {"state": {"w": np.ones(3)}, "vocab": vocab})
        vocab.words.append("changed after the call")
        assert response.result()
        loaded = ckptr.load_checkpointables(0)
        assert loaded["vocab"] == Vocab(["a", "b"]) and np.array_equal(loaded["state"]["w"], np.ones(3))
        assert isinstance(ckptr.checkpointables_metadata(0).metadata["vocab"], AbstractVocab)
        assert ckptr.load_checkpointables(0, {"vocab": AbstractVocab()}) == {"vocab": Vocab(["a", "b"])}
    assert (tmp_path / "0" / "vocab" / "words.json").exists()


class Failing:
    """A StatefulCheckpointable whose save fails in its first, synchronous part (after making its directory)."""

    async def save(self, directory):
        await directory.await_creation()
        raise RuntimeError("the vocabulary server is down")

    async def load(self, directory):
        raise AssertionError("never saved")


@pytest.mark.parametrize("how", ["free save", "Checkpointer"])
def test_a_handler_whose_save_fails_raises_its_own_error_and_leaves_no_temporary(tmp_path, how):
    with pytest.raises(RuntimeError, match="the vocabulary server is down"):
        if how == "free save":
            ckpt.save_checkpointables(tmp_path / "m", {"state": {"w": np.ones(3)}, "failing": Failing()})
        else:
            with Checkpointer(tmp_path) as ckptr:
                ckptr.save_checkpointables(0, {"state": {"w": np.ones(3)}, "failing": Failing()})
    assert [name for name in os.listdir(tmp_path) if name != ckpt.format.LOCK] == []


def test_a_stateful_checkpointable_saves_itself_and_loads_in_place(tmp_path):
    ckpt.save_checkpointables(tmp_path / "m", {"counter": Counter(7)})
    target = Counter()
    assert ckpt.load_checkpointables(tmp_path / "m", {"counter": target})["counter"] is target
    assert target.n == 7
    with pytest.raises(ValueError, match="To restore a `StatefulCheckpointable`, you must pass an instance of the "
                                         "object.* 'counter' was saved by itself"):
        ckpt.load_checkpointables(tmp_path / "m")


class ShardedCounter(Counter):
    """Writes into a subdirectory, named through the PathAwaitingCreation it is given, as Orbax's allows."""

    async def save(self, directory):
        n, part = self.n, directory / "part0"

        async def write():
            path = await part.await_creation()  # the checkpointable's directory exists; part0 is ours to make
            assert path == directory.path / "part0" and path.parent.is_dir()
            path.mkdir()
            (path / "n").write_text(str(n))
        return write()

    async def load(self, directory):
        async def read():
            self.n = int((directory / "part0" / "n").read_text())
        return read()


def test_a_checkpointable_names_a_subdirectory_of_the_directory_awaiting_creation_as_in_orbax(tmp_path):
    """Was: ``directory / "part0"`` raised TypeError (unsupported operand type(s) for /)."""
    with Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save_checkpointables(0, {"state": {"w": np.ones(2)}, "counter": ShardedCounter(5)})
        target = ShardedCounter()
        ckptr.load_checkpointables(0, {"counter": target})
    assert target.n == 5 and (tmp_path / "run" / "0" / "counter" / "part0" / "n").read_text() == "5"


def test_the_metadata_of_a_stateful_checkpointable_is_none_as_in_orbax(tmp_path):
    with Checkpointer(tmp_path / "run") as ckptr:
        ckptr.save_checkpointables(0, {"state": {"w": np.ones(2)}, "counter": Counter(7)})
        trees = ckptr.checkpointables_metadata(0).metadata
    assert trees["counter"] is None and trees["state"]["w"].shape == (2,)
    ckpt.save_checkpointables(tmp_path / "m", {"state": {"w": np.ones(2)}, "counter": Counter(7)})
    trees = ckpt.checkpointables_metadata(tmp_path / "m").metadata
    assert trees["counter"] is None and trees["state"]["w"].shape == (2,)


@pytest.mark.parametrize("how", ["a link to a directory outside", "a file"])
def test_a_handlers_directory_that_is_not_the_one_ckpt_made_is_never_handed_to_it(tmp_path, how):
    """Was: a step's ``counter`` a link to a directory outside, the handler read the file there."""
    with Checkpointer(tmp_path / "run", context=registry_context()) as ckptr:
        ckptr.save_checkpointables(0, {"state": {"w": np.ones(3)}, "counter": Counter(3), "vocab": Vocab(["a"])})
    step = tmp_path / "run" / "0"
    outside = tmp_path / "outside"
    shutil.copytree(step / "counter", outside)
    (outside / "n").write_text("999")
    shutil.rmtree(step / "counter")
    if how == "a file":
        (step / "counter").write_text("999")
    else:
        os.symlink(outside, step / "counter")
    with Checkpointer(tmp_path / "run", context=registry_context()) as ckptr:
        counter = Counter(0)
        with pytest.raises(errors.CheckpointCorruptedError, match=f"{step / 'counter'} is a") as info:
            ckptr.load_checkpointables(0, {"counter": counter})
        assert counter.n == 0 and info.value.path == step
        assert ckptr.load_checkpointables(0, {"vocab": AbstractVocab()}) == {"vocab": Vocab(["a"])}


def test_a_handler_name_on_disk_is_only_looked_up_never_imported(tmp_path):
    with registry_context():
        ckpt.save_checkpointables(tmp_path / "m", {"vocab": Vocab(["x"])})
    tree = tmp_path / "m" / "tree.json"
    assert json.loads(tree.read_text())["handled"] == {"vocab": {"handler": f"{__name__}.VocabHandler"}}
    with pytest.raises(KeyError, match="no handler for it is registered"):
        ckpt.load_checkpointables(tmp_path / "m")  # not in the active registry: an error, not an import
    by_name = ckpt.Context()
    by_name.checkpointables.registry = ckpt.handlers.local_registry(include_global_registry=False).add(
        VocabHandler, checkpointable_name="vocab")
    with by_name:
        assert ckpt.load_checkpointables(tmp_path / "m") == {"vocab": Vocab(["x"])}


def test_register_handler_adds_to_the_global_registry_once():
    class Once(VocabHandler):
        pass

    assert ckpt.handlers.register_handler(Once) is Once
    ckpt.handlers.register_handler(Once)
    entries = ckpt.handlers.global_registry().get_all_entries()
    assert entries.count((Once, None)) == 1
    with pytest.raises(ValueError, match="already exists"):
        ckpt.handlers.local_registry().add(Once)


def test_a_directory_that_is_not_a_checkpoint_is_an_invalid_layout_not_damage(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(ckpt.errors.InvalidLayoutError, match="not a checkpoint"):
        ckpt.load(tmp_path / "notes")
    with pytest.raises(ckpt.errors.InvalidLayoutError, match="not a checkpoint"):
        ckpt.metadata(tmp_path / "notes")


def test_load_takes_what_metadata_returned_and_falls_back_to_the_only_checkpointable(tmp_path):
    ckpt.save_checkpointables(tmp_path / "m", {"params": {"w": np.arange(3), "n": 2}})
    info = ckpt.metadata(tmp_path / "m")  # no "state": the only tree
    assert info.step is None and info.metadata["w"].shape == (3,)
    assert ckpt.load(tmp_path / "m", info)["n"] == 2
    assert ckpt.load(tmp_path / "m")["n"] == 2
    assert ckpt.metadata(tmp_path / "m", checkpointable_name="params").metadata["n"].type == "int"
    assert ckpt.CheckpointMetadata(tmp_path / "m", metadata={"n": 2}).path == tmp_path / "m"


def test_an_optax_empty_state_loads_as_none_without_a_target_as_in_orbax(tmp_path):
    optax = pytest.importorskip("optax")
    ckpt.save(tmp_path / "m", {"opt": optax.EmptyState(), "w": np.ones(2)})
    assert ckpt.load(tmp_path / "m")["opt"] is None
    assert ckpt.load(tmp_path / "m", {"opt": optax.EmptyState(), "w": np.ones(2)})["opt"] == optax.EmptyState()


def checkpointables(step: int) -> dict:
    return {"state": {"w": np.full(1 << 18, step, np.float32)}, "vocab": Vocab([str(step)]), "counter": Counter(step)}


def assert_loads(ckptr, step: int) -> None:
    counter = Counter()
    loaded = ckptr.load_checkpointables(step, {"state": None, "vocab": AbstractVocab(), "counter": counter})
    assert loaded["vocab"] == Vocab([str(step)]) and loaded["counter"] is counter and counter.n == step
    np.testing.assert_array_equal(loaded["state"]["w"], np.full(1 << 18, step, np.float32))


def test_prepare_async_save_reserves_the_trees_memory_and_leaves_the_rest_to_the_handlers(tmp_path):
    with Checkpointer(tmp_path, context=registry_context()) as ckptr:
        assert ckptr.prepare_async_save(checkpointables(0)).result() is None
        assert list(ckptr._staging._free) == [(1 << 20, False)]  # the tree's one array, ready for the snapshot
        assert ckptr.save_checkpointables_async(0, checkpointables(0)).result()
        assert_loads(ckptr, 0)


def test_custom_checkpointables_are_saved_locally_promoted_and_restored_from_either_tier(tmp_path):
    local = ckpt.LocalCheckpointOptions(tmp_path / "local", save_decision_policy=sdp.FixedIntervalPolicy(1))

    def tiered() -> Checkpointer:  # the handler comes from the constructor's Context on both tiers
        return Checkpointer(tmp_path / "durable", context=registry_context(), local=local,
                            save_decision_policy=sdp.FixedIntervalPolicy(2))

    with tiered() as ckptr:
        ckptr.prepare_async_save(checkpointables(0)).result()
        for step in range(4):
            ckptr.save_checkpointables_async(step, checkpointables(step))
        ckptr.wait()
        assert {c.step: sorted(c.locations) for c in ckptr.checkpoints} == {
            0: ["durable"], 2: ["durable", "local"], 3: ["local"]}
        assert_loads(ckptr, 3)
        assert_loads(ckptr, 2)
    assert json.loads((tmp_path / "durable" / "2" / "vocab" / "words.json").read_text()) == ["2"]
    shutil.rmtree(tmp_path / "local")  # a new machine: restored from the durable tier
    with tiered() as ckptr:
        assert ckptr.latest.step == 2 and ckptr.latest.locations.keys() == {"durable"}
        assert_loads(ckptr, 2)


class FirstCustomBarrierTimesOut:
    """Process 0 of 2 whose first 'custom' barrier (the other process never came) times out."""

    index, count = 0, 2

    def __init__(self):
        self.failed = False

    def barrier(self, name, timeout_secs):
        if name.endswith("/custom") and not self.failed:
            self.failed = True
            raise TimeoutError(f"rank 0 of 2 waited for the other ranks at {name!r}")

    def broadcast(self, name, value, timeout_secs):
        return value


def test_a_save_whose_handlers_barrier_fails_leaves_nothing_and_the_step_saves_again(tmp_path):
    ctx = ckpt.Context(multiprocessing_options=ckpt.MultiprocessingOptions(processes=FirstCustomBarrierTimesOut()))
    with Checkpointer(tmp_path, context=ctx) as ckptr:
        with pytest.raises(TimeoutError, match="waited for the other ranks"):
            ckptr.save_checkpointables(3, {"state": {"w": np.arange(4)}, "counter": Counter(7)}, force=True)
        assert os.listdir(tmp_path) == [ckpt.format.LOCK]
        assert ckptr.save_checkpointables(3, {"state": {"w": np.arange(4)}, "counter": Counter(7)}, force=True)
    assert ckpt.load_checkpointables(tmp_path / "3", {"counter": Counter()})["counter"].n == 7
