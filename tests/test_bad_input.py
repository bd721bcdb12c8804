"""Bad input: each case gets a clear error (type and message asserted) before anything is written.

Every case runs against a root that already holds step 0, and the root must be byte for byte the same
afterwards: no temporary, no lock change, no partial step.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import ckpt
from ckpt import errors
from ckpt.path import step as step_lib
from ckpt.training import Checkpointer
from tests import fsutil

GOOD = {"w": np.arange(4.0), "b": {"c": np.ones(2, np.int32)}}


@dataclasses.dataclass
class Case:
    call: Callable[[Checkpointer, Path], Any]
    error: type[BaseException]
    message: str  # a regex the message must match


def save(state: Any = GOOD, step: Any = 1, **kwargs: Any) -> Callable[[Checkpointer, Path], Any]:
    return lambda ckptr, root: ckptr.save(step, state, force=True, **kwargs)


def save_async(state: Any = GOOD, step: Any = 1, **kwargs: Any) -> Callable[[Checkpointer, Path], Any]:
    return lambda ckptr, root: ckptr.save_async(step, state, force=True, **kwargs)


def named(name: Any) -> Callable[[Checkpointer, Path], Any]:
    return lambda ckptr, root: ckptr.save_checkpointables(1, {"state": GOOD, name: GOOD}, force=True)


class Opaque:
    pass


class EscapingFormat:
    """A user's step name format that builds names outside the root."""

    def build_name(self, step: int) -> str:
        return f"../escaped_{step}"

    def parse_name(self, name: str) -> int | None:
        return None


class OneWayFormat:
    """A user's step name format whose names do not parse back: its steps would never be listed."""

    def build_name(self, step: int) -> str:
        return f"ckpt-{step}"

    def parse_name(self, name: str) -> int | None:
        return None


def with_format(name_format: Any) -> Callable[[Checkpointer, Path], Any]:
    def call(ckptr: Checkpointer, root: Path) -> Any:
        with Checkpointer(root, step_name_format=name_format) as other:
            other.save(1, GOOD, force=True)
    return call


def torch_step(make: str) -> Callable[[Checkpointer, Path], Any]:
    """A save at a step that is a torch tensor made by ``make`` (a Python expression of ``torch``)."""
    def call(ckptr: Checkpointer, root: Path) -> Any:
        torch = pytest.importorskip("torch")
        return ckptr.save(eval(make, {"torch": torch}), GOOD, force=True)
    return call


def load_with(abstract: Any) -> Callable[[Checkpointer, Path], Any]:
    return lambda ckptr, root: ckptr.load(0, abstract)


def holding_itself(leaf: Any = None) -> dict:
    tree: dict = {"w": np.ones(2) if leaf is None else leaf}
    tree["me"] = tree
    return tree


def nested_lists(depth: int) -> Any:
    tree: Any = np.ones(2)
    for _ in range(depth):
        tree = [tree]
    return tree


TWO_TENSOR = ("__import__('torch.testing._internal.two_tensor', fromlist=['TwoTensor'])"
              ".TwoTensor(torch.ones(3, dtype={0}), torch.zeros(3, dtype={0}))")


def save_torch(make: str) -> Callable[[Checkpointer, Path], Any]:
    """A save of a torch tensor made by ``make`` (a Python expression of ``torch``)."""
    def call(ckptr: Checkpointer, root: Path) -> Any:
        torch = pytest.importorskip("torch")
        return ckptr.save(1, {"t": eval(make, {"torch": torch})}, force=True)
    return call


def save_pytree_with_key(*keys: Any) -> Callable[[Checkpointer, Path], Any]:
    """A save of a defaultdict (a jax pytree once jax is imported, flattened by jax) with ``keys``."""
    def call(ckptr: Checkpointer, root: Path) -> Any:
        import collections

        pytest.importorskip("jax")
        return ckptr.save(1, {"d": collections.defaultdict(list, {key: np.ones(2) for key in keys})}, force=True)
    return call


def save_jax(how: str) -> Callable[[Checkpointer, Path], Any]:
    """A save of a jax array that a jitted function was donated (deleted), or of a tracer (the save
    called inside ``jax.jit``)."""
    def call(ckptr: Checkpointer, root: Path) -> Any:
        jax = pytest.importorskip("jax")
        state = {"w": jax.numpy.ones(3), "b": jax.numpy.zeros(2)}
        if how == "tracer":
            return jax.jit(lambda w: ckptr.save(1, {"w": w}, force=True) and w)(state["w"])
        jax.jit(lambda w: w + 1, donate_argnums=0)(state["w"])
        return getattr(ckptr, how)(1, state, force=True)
    return call


class RepeatingKeys:
    """A jax pytree whose flatten gives both its children the key 'a' (.a and ['a'])."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = a, b


@functools.cache
def _register_repeating_keys() -> None:
    tree_util = pytest.importorskip("jax").tree_util
    tree_util.register_pytree_with_keys(
        RepeatingKeys, lambda r: (((tree_util.GetAttrKey("a"), r.a), (tree_util.DictKey("a"), r.b)), None),
        lambda _, children: RepeatingKeys(*children))


def save_repeating_keys(ckptr: Checkpointer, root: Path) -> Any:
    """A save of a pytree whose children share a key: the step could never be loaded (or, loaded without an
    abstract tree, would give one leaf of the two)."""
    _register_repeating_keys()
    return ckptr.save(1, {"r": RepeatingKeys(np.ones(2), np.zeros(2))}, force=True)


def save_int_gradients(ckptr: Checkpointer, root: Path) -> Any:
    """A save of jax's gradients of an integer input: arrays of dtype float0."""
    jax = pytest.importorskip("jax")
    grads = jax.grad(lambda x, i: (x * i).sum(), argnums=(0, 1), allow_int=True)(jax.numpy.ones(3), jax.numpy.arange(3))
    return ckptr.save(1, {"grads": grads}, force=True)


STRUCTURED = np.dtype([("x", "<i4"), ("y", "<f8")])


CASES = {
    # unsupported leaves: TypeError naming the key path and the type
    "object leaf": Case(save({"a": {"b": Opaque()}}), TypeError, r"\['a'\]\['b'\].*Opaque.*cannot store"),
    "object leaf, async": Case(save_async({"a": [1, Opaque()]}), TypeError, r"\['a'\]\[1\].*Opaque"),
    "function leaf": Case(save({"f": lambda x: x}), TypeError, r"\['f'\].*function"),
    "set leaf": Case(save({"s": {1, 2}}), TypeError, r"\['s'\].*builtins\.set"),
    "object array": Case(save({"o": np.array([1, "x"], dtype=object)}), TypeError, r"\['o'\].*Python objects"),
    "donated jax array": Case(save_jax("save"), ValueError, r"jax array at \['w'\] has been deleted \(donated"),
    "donated jax array, async": Case(save_jax("save_async"), ValueError, r"\['w'\] has been deleted"),
    "jax tracer": Case(save_jax("tracer"), TypeError, r"jax array at \['w'\] is a tracer.*inside a transformed"),
    "masked array": Case(save({"m": np.ma.array([1, 2], mask=[0, 1])}), TypeError, r"\['m'\] is a masked array"),
    "structured array": Case(save({"a": np.zeros(2, STRUCTURED)}), TypeError, r"\['a'\] has the structured dtype"),
    "record array": Case(save({"a": np.rec.array(np.zeros(2, STRUCTURED))}), TypeError, r"\['a'\].*structured"),
    # (it was refused as a structured dtype, with the advice to store each of its fields as an array)
    "float0 gradient": Case(save_int_gradients, TypeError, r"\['grads'\]\[1\] has jax's dtype float0 \(the gradient "
                            r"of an integer or bool input\), which holds no values.*drop the leaf or replace it with None"),
    "structured scalar": Case(save({"a": np.zeros((), STRUCTURED)[()]}), TypeError, r"scalar at \['a'\].*structured"),
    "33 dimensions": Case(save({"a": np.zeros((1,) * 33)}), ValueError, r"\['a'\] has 33 dimensions; .* at most 32"),
    "an int of 4,000 digits": Case(save({"seed": 10 ** 4000}), ValueError, r"int at \['seed'\] has \d+ bits"),
    "a tree that holds itself": Case(save(holding_itself()), ValueError, r"holds itself"),
    "a tree 2,000 lists deep": Case(save({"deep": nested_lists(2000)}), ValueError, r"nested deeper than"),
    "sparse tensor": Case(save_torch("torch.eye(3).to_sparse()"), TypeError, r"\['t'\] is torch.sparse_coo"),
    "meta tensor": Case(save_torch("torch.empty(3, device='meta')"), TypeError, r"\['t'\] is on the meta device"),
    # (torch's bare ValueError 'Attempted to use an uninitialized parameter in <method 'detach' ...>', naming no leaf)
    "lazy module's parameter": Case(save_torch("torch.nn.LazyLinear(2).weight"), TypeError,
                                    r"\['t'\] is an uninitialized parameter of a lazy module"),
    # a wrapper tensor subclass (torchao's NF4Tensor of a QLoRA model is one, of bfloat16)
    "bfloat16 tensor subclass": Case(save_torch(TWO_TENSOR.format("torch.bfloat16")), TypeError,
                                     r"\['t'\] has type torch\.testing\._internal\.two_tensor\.TwoTensor \(a tensor subclass\)"),
    "float32 tensor subclass": Case(save_torch(TWO_TENSOR.format("torch.float32")), TypeError, r"\['t'\] has type .*TwoTensor"),
    "jax pytree whose children share a key": Case(save_repeating_keys, ValueError,
                                                  r"RepeatingKeys at \['r'\] gives two of its children the key 'a' "
                                                  r"\(\['r'\]\.a and \['r'\]\['a'\]\)"),
    "tuple key of a jax pytree": Case(save_pytree_with_key((1, 2)), TypeError, r"dict key \(1, 2\) of type tuple at \['d'\]"),
    # (jax's flatten sorts its keys: 'checkpointable 'state': '<' not supported between instances of 'str' and 'int'')
    "int and str keys of a jax pytree": Case(save_pytree_with_key(0, "a"), TypeError, r"the defaultdict at \['d'\] "
                                             r"cannot be flattened as the jax pytree node it is: '<' not supported"),
    # dict keys that cannot round-trip
    "tuple key": Case(save({"a": {(1, 2): 1}}), TypeError, r"dict key \(1, 2\) of type tuple at \['a'\]"),
    "float key": Case(save({1.5: 1}), TypeError, r"dict key 1\.5 of type float at the root"),
    "bool key": Case(save({"a": {True: 1}}), TypeError, r"dict key True of type bool at \['a'\]"),
    "None key": Case(save_async({None: 1}), TypeError, r"dict key None of type NoneType"),
    # metrics and custom metadata that are not strict JSON (NaN metrics are saved: tests/test_strange_roots.py)
    "array metric": Case(save(metrics={"loss": [np.ones(3, np.float32)]}), ValueError,
                         r"metrics\['loss'\]\[0\] must be JSON .*not an object of type ndarray, shape \(3,\)"),
    "complex metric": Case(save(metrics={"z": np.complex64(1j)}), ValueError, r"metrics\['z'\] must be JSON .*complex64"),
    "numpy custom metadata": Case(save(custom_metadata={"n": np.int64(1)}), ValueError,
                                  r"custom_metadata\['n'\] must be JSON .*int64, shape \(\)"),
    "int metric key": Case(save(metrics={1: 2.0}), ValueError, r"metrics must be JSON: key 1 is of type int, not str"),
    "object metric": Case(save(metrics={"m": Opaque()}), ValueError, r"metrics\['m'\] must be JSON .*type Opaque$"),
    "metrics 1,000 levels deep": Case(save(metrics=nested_lists(1000)), ValueError, r"metrics.*nested at most 64"),
    "metrics that hold themselves": Case(save(metrics=holding_itself(0.5)), ValueError, r"metrics.*nested at most 64"),
    # refused by save_async itself, before the background writes every array: after them (at the manifest) once
    "custom metadata larger than a manifest holds": Case(save_async(custom_metadata={"x": "a" * (17 << 20)}), ValueError,
                                                         r"metrics and custom metadata takes \d+ bytes as JSON, more"),
    "set in custom metadata": Case(save(custom_metadata={"x": [{math.nan}]}), ValueError,
                                   r"custom_metadata\[.x.\]\[0\] must be JSON .*type set$"),
    # checkpointable names
    "name with /": Case(named("a/b"), ValueError, r"'a/b' .*path separator"),
    "name ..": Case(named(".."), ValueError, r"'\.\.' "),
    "name with \\": Case(named("a\\b"), ValueError, r"path separator"),
    "empty name": Case(named(""), ValueError, r"'' is empty"),
    "hidden name": Case(named(".x"), ValueError, r"'\.x' is reserved"),
    "reserved name metrics": Case(named("metrics"), ValueError, r"'metrics' is reserved"),
    "reserved name manifest.json": Case(named("manifest.json"), ValueError, r"'manifest\.json' is reserved"),
    "non-str name": Case(named(3), ValueError, r"checkpointable name 3 must be a str"),
    "name via save": Case(save(checkpointable_name="../up"), ValueError, r"'\.\./up' .*path separator"),
    # steps
    "negative step": Case(save(step=-1), ValueError, r"non-negative int, got -1"),
    "negative step, async": Case(save_async(step=-3), ValueError, r"non-negative int, got -3"),
    "float step": Case(save(step=1.5), ValueError, r"got 1\.5 of type float"),
    "str step": Case(save(step="2"), ValueError, r"got '2' of type str"),
    "bool step": Case(save(step=True), ValueError, r"got True of type bool"),
    "None step": Case(save(step=None), ValueError, r"got None of type NoneType"),
    "one-element array step": Case(save(step=np.array([3])), ValueError, r"got array\(\[3\]\) of type ndarray"),
    "bool array step": Case(save(step=np.array(True)), ValueError, r"got array\(True\) of type ndarray"),
    "float array step": Case(save(step=np.array(2.0)), ValueError, r"got array\(2\.\) of type ndarray"),
    "one-element tensor step": Case(torch_step("torch.tensor([3])"), ValueError, r"got tensor\(\[3\]\) of type Tensor"),
    "bool tensor step": Case(torch_step("torch.tensor(True)"), ValueError, r"got tensor\(True\) of type Tensor"),
    "a step of 4,000 digits": Case(save(step=10 ** 4000), ValueError, r"step must be a non-negative int of at most"),
    "negative should_save": Case(lambda c, r: c.should_save(-1), ValueError, r"non-negative"),
    "negative load step": Case(lambda c, r: c.load(-1), ValueError, r"non-negative"),
    # step name formats
    "prefix with /": Case(lambda c, r: step_lib.standard_name_format(step_prefix="a/b"), ValueError, r"'a/b'"),
    "prefix ..": Case(lambda c, r: step_lib.standard_name_format(step_prefix=".."), ValueError, r"'\.\.'"),
    "negative fixed length": Case(lambda c, r: step_lib.standard_name_format(step_format_fixed_length=-1), ValueError,
                                  r"at least 0, got -1"),
    "format escaping the root": Case(with_format(EscapingFormat()), ValueError,
                                     r"'\.\./escaped_1' .*not a plain directory name"),
    "format that does not parse back": Case(with_format(OneWayFormat()), ValueError,
                                            r"'ckpt-1' .*parses back to None, not step 1"),
    # an existing step, and loading with the abstract tree of another model
    "existing step": Case(lambda c, r: c.save(0, GOOD, force=True), errors.StepAlreadyExistsError,
                          r"step 0 already exists .*overwrite=True"),
    "another model's tree": Case(load_with({"w": np.zeros(5), "x": np.zeros(2)}), errors.TreeMismatchError,
                                 r"3 differences(.|\n)*\['w'\]: saved shape \(4,\), abstract leaf wants \(5,\)"
                                 r"(.|\n)*\['x'\]: in the abstract tree, not in the checkpoint"
                                 r"(.|\n)*\['b'\]\['c'\]: in the checkpoint, not in the abstract tree\Z"),
    "a part of the tree": Case(load_with({"w": np.zeros(4)}), errors.TreeMismatchError,
                               r"\['b'\]\['c'\]: in the checkpoint, not in the abstract tree\n"
                               r"To load only the abstract tree's part .*PyTreeOptions\(partial_load=True\)"),
    "unknown checkpointable": Case(lambda c, r: c.load_checkpointables(0, {"model": None}), KeyError, r"'model'"),
    # was: AttributeError "'list' object has no attribute 'items'"
    "checkpointables as a list": Case(lambda c, r: c.load_checkpointables(0, ["state"]), TypeError,
                                      r"abstract_checkpointables must be a dict .*got list \['state'\]"),
    "free load of a name": Case(lambda c, r: ckpt.load_checkpointables(r / "0", "state"), TypeError,
                                r"abstract_checkpointables must be a dict .*got str 'state'"),
}


@pytest.fixture
def root(tmp_path) -> Path:
    with Checkpointer(tmp_path / "root") as ckptr:
        ckptr.save(0, GOOD, force=True)
    return tmp_path / "root"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error_and_the_directory_is_unchanged(root, case):
    spec = CASES[case]
    before = fsutil.snapshot(root)
    with Checkpointer(root) as ckptr:
        with pytest.raises(spec.error) as info:
            spec.call(ckptr, root)
        assert not ckptr.is_saving_in_progress()
        assert [c.step for c in ckptr.checkpoints] == [0]
    assert re.search(spec.message, str(info.value)), f"{info.value!s} does not match {spec.message!r}"
    assert fsutil.snapshot(root) == before
    assert [p.name for p in root.parent.iterdir()] == ["root"]  # nothing written beside the root either


def test_a_bad_first_save_creates_no_lock_and_no_temporary(tmp_path):
    with Checkpointer(tmp_path) as ckptr:
        with pytest.raises(TypeError):
            ckptr.save(0, {"a": Opaque()}, force=True)
    assert list(tmp_path.iterdir()) == []


def test_bad_custom_metadata_of_the_root_fails_before_the_directory_is_created(tmp_path):
    with pytest.raises(ValueError, match=r"custom_metadata\['lr'\] must be JSON .*not an object of type set"):
        Checkpointer(tmp_path / "root", custom_metadata={"lr": {0.1}})
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("how", ["save", "save_async"])
def test_the_free_functions_refuse_bad_input_before_creating_the_path(tmp_path, how):
    with pytest.raises(TypeError, match=r"\['a'\].*Opaque"):
        getattr(ckpt, how)(tmp_path / "one" / "ckpt", {"a": Opaque()})
    assert not (tmp_path / "one").exists()


@pytest.mark.parametrize("how", ["save", "save_async"])
def test_a_later_save_of_the_same_jax_tree_refuses_a_donated_array_as_the_first(root, how):
    """The reused plan of the last save must not take a deleted array for the same leaf."""
    jax = pytest.importorskip("jax")
    state = {"w": jax.numpy.ones(3), "b": jax.numpy.zeros(2)}
    with Checkpointer(root) as ckptr:
        getattr(ckptr, how)(1, state, force=True)
        ckptr.wait()
        jax.jit(lambda w: w + 1, donate_argnums=0)(state["w"])
        with pytest.raises(ValueError, match=r"jax array at \['w'\] has been deleted"):
            getattr(ckptr, how)(2, state, force=True)
        assert [c.step for c in ckptr.checkpoints] == [0, 1]


def test_a_later_save_of_the_same_structure_checks_its_keys_as_the_first(root):
    """A Checkpointer reuses its last save's plan for a tree of the same structure; a key equal to the
    saved one but of another type (True == 1.0 == 1) is still refused, as a first save refuses it."""
    with Checkpointer(root) as ckptr:
        ckptr.save(1, {1: np.ones(2), "b": 2}, force=True)
        for key in (True, 1.0, np.int64(1)):
            with pytest.raises(TypeError, match=f"dict key {re.escape(repr(key))} of type"):
                ckptr.save(2, {key: np.ones(2), "b": 2}, force=True)
        assert [c.step for c in ckptr.checkpoints] == [0, 1]


def test_keys_that_differ_by_torch_compiles_prefix_are_a_mismatch_that_says_where_it_comes_from(tmp_path):
    # A torch.compile'd module's state_dict() names its keys '_orig_mod.<key>'.
    ckpt.save(tmp_path / "m", {"_orig_mod.0.weight": np.ones(2), "_orig_mod.0.bias": np.ones(1)})
    with pytest.raises(errors.TreeMismatchError, match=r"\['0\.weight'\]: in the abstract tree(.|\n)*"
                                                       r"come from `torch.compile`(.|\n)*compiled\._orig_mod"):
        ckpt.load(tmp_path / "m", {"0.weight": np.zeros(2), "0.bias": np.zeros(1)})
