"""Round trips are exact: every dtype, leaf and container, with and without an abstract tree."""
from __future__ import annotations

import collections
import math
import re
import warnings

import ml_dtypes
import numpy as np
import pytest

import ckpt
from ckpt import errors
from tests.fsutil import tree_doc

SMALL = 37                    # elements: packed with the other small leaves
LARGE_BYTES = (1 << 20) + 8   # over the packing threshold: stored as its own zarr3 array

NUMPY_DTYPES = [np.dtype(n) for n in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "<U3", "S4", "datetime64[ns]", "timedelta64[s]")]
ML_DTYPES = [np.dtype(getattr(ml_dtypes, n)) for n in (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
    "int2", "int4", "uint2", "uint4") if hasattr(ml_dtypes, n)]
DTYPES = NUMPY_DTYPES + ML_DTYPES


def random_array(dtype: np.dtype, n: int, seed: int = 0) -> np.ndarray:
    """``n`` elements of ``dtype`` from random bits (NaNs, infinities and NaTs included)."""
    rng = np.random.default_rng(seed)
    if dtype.kind == "U":
        return rng.integers(0x20, 0x2FF, n * (dtype.itemsize // 4)).astype("<u4").view(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, n).astype(bool)
    if dtype.name in ("int2", "int4", "uint2", "uint4"):
        info = ml_dtypes.iinfo(dtype)
        return rng.integers(int(info.min), int(info.max) + 1, n).astype(dtype)
    return rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)


def assert_same_array(got, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()  # bit-exact, NaNs included


# ------------------------------------------------------------------------------ numpy dtypes
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_numpy_dtype_round_trips_bit_exactly_with_and_without_abstract(tmp_path, dtype, size):
    n = SMALL if size == "small" else LARGE_BYTES // dtype.itemsize + 1
    array = random_array(dtype, n).reshape(-1, 1) if size == "large" else random_array(dtype, n)
    ckpt.save(tmp_path / "c", {"a": array, "scalar": array.reshape(-1)[0]})
    as_saved = ckpt.load(tmp_path / "c")
    assert_same_array(as_saved["a"], array)
    assert type(as_saved["scalar"]) is type(array.reshape(-1)[0])
    assert np.asarray(as_saved["scalar"]).tobytes() == np.asarray(array.reshape(-1)[0]).tobytes()
    with_abstract = ckpt.load(tmp_path / "c", {"a": np.empty(array.shape, dtype), "scalar": array.reshape(-1)[0]})
    assert_same_array(with_abstract["a"], array)
    assert type(with_abstract["scalar"]) is type(array.reshape(-1)[0])
    assert np.asarray(with_abstract["scalar"]).tobytes() == np.asarray(array.reshape(-1)[0]).tobytes()
    entry = _entry(tmp_path / "c", "['a']")
    assert ("array" in entry) == (size == "large") and ("packed" in entry) == (size == "small")


def _entry(step_dir, key_path: str) -> dict:
    """The manifest entry (tree.json) of one leaf of the ``state`` checkpointable."""
    leaves = tree_doc(step_dir)["checkpointables"]["state"]["leaves"]
    return next(leaf for leaf in leaves if leaf["path"] == key_path)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (2, 3, 4, 5), (LARGE_BYTES // 48 + 1, 3, 2)], ids=str)
def test_multidimensional_zero_size_and_zero_d_arrays_keep_their_shape(tmp_path, shape):
    array = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    ckpt.save(tmp_path / "c", {"a": array})
    assert_same_array(ckpt.load(tmp_path / "c")["a"], array)
    assert_same_array(ckpt.load(tmp_path / "c", {"a": np.empty(shape)})["a"], array)


@pytest.mark.parametrize("size", ["small", "large"])
def test_non_contiguous_inputs_round_trip_as_their_values(tmp_path, size):
    n = 8 if size == "small" else 512
    base = np.arange(n * n * 2, dtype=np.float64).reshape(n, n * 2)
    state = {"strided": base[:, ::2], "transposed": base.T, "fortran": np.asfortranarray(base),
             "reversed": base[::-1], "column": base[:, 3]}
    ckpt.save(tmp_path / "c", state)
    abstract = {key: np.empty_like(value) for key, value in state.items()}
    for restored in (ckpt.load(tmp_path / "c"), ckpt.load(tmp_path / "c", abstract)):
        for key, value in state.items():
            np.testing.assert_array_equal(restored[key], value)
            assert restored[key].shape == value.shape and restored[key].dtype == value.dtype


@pytest.mark.parametrize("size", ["small", "large"])
def test_big_endian_inputs_keep_their_values(tmp_path, size):
    n = 10 if size == "small" else LARGE_BYTES // 8 + 1
    array = np.arange(n, dtype=">f8") / 3
    ints = np.arange(n, dtype=">i4")
    ckpt.save(tmp_path / "c", {"f": array, "i": ints, "s": np.dtype(">i8").type(-5)})
    restored = ckpt.load(tmp_path / "c")
    np.testing.assert_array_equal(restored["f"], array)
    np.testing.assert_array_equal(restored["i"], ints)
    assert restored["f"].dtype == np.dtype("f8") and restored["s"] == -5
    typed = ckpt.load(tmp_path / "c", {"f": np.empty(n, ">f8"), "i": np.empty(n, "<i4"), "s": 0})
    assert typed["f"].dtype == np.dtype(">f8") and typed["i"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(typed["f"], array)


def test_an_array_modified_after_a_sync_save_does_not_change_the_checkpoint(tmp_path):
    array = np.zeros(LARGE_BYTES // 8 + 1)
    ckpt.save(tmp_path / "c", {"a": array})
    array[:] = 1
    assert not ckpt.load(tmp_path / "c")["a"].any()


# ----------------------------------------------------------------------- Python leaves
PYTHON_LEAVES = {
    "int": 3, "negative": -(2**40), "huge": 2**100, "zero": 0,
    "float": 0.1, "negzero": -0.0, "tiny": 5e-324, "inf": float("inf"), "ninf": float("-inf"),
    "true": True, "false": False, "none": None,
    "str": "héllo ✓\n\"quoted\"", "empty_str": "", "bytes": bytes(range(256)), "empty_bytes": b"",
}


def test_python_scalars_strings_bytes_and_none_round_trip_with_their_types(tmp_path):
    state = dict(PYTHON_LEAVES, nan=float("nan"))
    ckpt.save(tmp_path / "c", state)
    for restored in (ckpt.load(tmp_path / "c"), ckpt.load(tmp_path / "c", state)):
        assert list(restored) == list(state)
        for key, value in PYTHON_LEAVES.items():
            assert type(restored[key]) is type(value), key
            assert restored[key] == value, key
        assert math.isnan(restored["nan"])
        assert math.copysign(1, restored["negzero"]) == -1


def test_numpy_scalars_come_back_as_numpy_scalars_of_their_dtype(tmp_path):
    state = {"f32": np.float32(1.5), "i8": np.int8(-3), "b": np.bool_(True), "bf16": ml_dtypes.bfloat16(2.5),
             "c": np.complex64(1 + 2j), "u64": np.uint64(2**64 - 1)}
    ckpt.save(tmp_path / "c", state)
    for restored in (ckpt.load(tmp_path / "c"), ckpt.load(tmp_path / "c", state)):
        for key, value in state.items():
            assert type(restored[key]) is type(value) and restored[key] == value, key


def test_python_types_as_abstract_leaves_cast_the_saved_values(tmp_path):
    ckpt.save(tmp_path / "c", {"i": 3, "f": 2, "arr0d": np.array(7.0), "s": np.int64(4)})
    restored = ckpt.load(tmp_path / "c", {"i": float, "f": float, "arr0d": int, "s": int})
    assert restored == {"i": 3.0, "f": 2.0, "arr0d": 7, "s": 4}
    assert [type(v) for v in restored.values()] == [float, float, int, int]


def test_python_types_as_abstract_leaves_refuse_values_they_cannot_hold_as_array_casts_do(tmp_path):
    """A Python int, float or bool abstract leaf casts as a numpy dtype does (a fraction dropped, 0.5 is True),
    and refuses what it cannot hold, naming the leaf, where bool(3) would be True and float(1+2j) 1.0."""
    torch = pytest.importorskip("torch")
    fits = {"frac": (2.5, int), "exact": (2.0, int), "huge": (2**100, int), "half": (np.float32(0.5), True),
            "one": (torch.tensor(1), bool), "real": (np.complex64(1.5 + 0j), float),
            "bf16": (torch.tensor(-2.5, dtype=torch.bfloat16), 0)}
    ckpt.save(tmp_path / "fits", {k: saved for k, (saved, _) in fits.items()})
    loaded = ckpt.load(tmp_path / "fits", {k: abstract for k, (_, abstract) in fits.items()})
    assert loaded == {"frac": 2, "exact": 2, "huge": 2**100, "half": True, "one": True, "real": 1.5, "bf16": -2}
    assert [type(v) for v in loaded.values()] == [int, int, int, bool, bool, float, int]
    cases = {"three": (3, bool, "int value 3 does not fit bool"), "two": (2.0, False, "do not fit bool"),
             "np": (np.int64(3), bool, "int64 values, from 3 to 3, do not fit bool"),
             "torch": (torch.tensor(3), True, "do not fit bool"), "nan": (float("nan"), int, "value nan does not fit int"),
             "inf": (np.float32(np.inf), 0, "float32 value inf does not fit int"),
             "imag": (np.complex64(1 + 2j), float, "value (1+2j) has an imaginary part"),
             "imag_int": (np.complex128(1 + 2j), int, "has an imaginary part"),
             "big": (10**400, float, "int value (1329 bits) does not fit float")}
    ckpt.save(tmp_path / "c", {k: saved for k, (saved, _, _) in cases.items()})
    for key, (_, abstract, why) in cases.items():
        tree = {k: (abstract if k == key else ckpt.PLACEHOLDER) for k in cases}
        with pytest.raises(errors.TreeMismatchError, match=rf"state\['{key}'\]: .*{re.escape(why)}"):
            ckpt.load(tmp_path / "c", tree)


def test_numpy_scalar_types_and_array_classes_as_abstract_leaves_give_their_types_and_refuse_as_casts_do(tmp_path):
    """An abstract leaf np.int32 (the type, as Orbax's restore_type takes) gave the saved value as it was (np.int64
    2**40, a Python 3 for np.bool_); np.ndarray, jax.Array or torch.Tensor gave a saved Python number as a Python
    number (np.ndarray an object array for an int past 64 bits). Each gives its type now, cast as arrays are."""
    jax, torch = pytest.importorskip("jax"), pytest.importorskip("torch")
    ckpt.save(tmp_path / "fits", {"i": np.int64(7), "f": 3.5, "a": 2, "j": 2.5, "t": 4})
    loaded = ckpt.load(tmp_path / "fits", {"i": np.int32, "f": np.float16, "a": np.ndarray, "j": jax.Array,
                                           "t": torch.Tensor})
    assert [type(v) for v in loaded.values()] == [np.int32, np.float16, np.ndarray, type(jax.numpy.zeros(())),
                                                  torch.Tensor]
    assert [v.item() for v in loaded.values()] == [7, 3.5, 2, 2.5, 4]
    cases = {"big": (np.int64(2**40), np.int32, "int64 values, from 1099511627776 to 1099511627776, do not fit int32"),
             "three": (3, np.bool_, "from 3 to 3, do not fit bool"), "str": ("x", np.int32, "wants a numpy int32"),
             "huge": (2**70, np.ndarray, "int value (71 bits) does not fit a numpy integer")}
    ckpt.save(tmp_path / "c", {k: saved for k, (saved, _, _) in cases.items()})
    for key, (_, abstract, why) in cases.items():
        tree = {k: (abstract if k == key else ckpt.PLACEHOLDER) for k in cases}
        with pytest.raises(errors.TreeMismatchError, match=rf"state\['{key}'\]: .*{re.escape(why)}"):
            ckpt.load(tmp_path / "c", tree)


# --------------------------------------------------------------------------- containers
class Point(collections.namedtuple("Point", "x y")):
    pass


Pair = collections.namedtuple("Pair", "first second")


def test_containers_round_trip_with_their_structure(tmp_path):
    state = {
        "dict": {"b": 1, "a": 2},             # insertion order is kept
        "int_keys": {3: "three", 0: "zero", -1: "minus"},
        "list": [1, [2, [3]], []],
        "tuple": (1, (2,), ()),
        "empty": {}, "nested_empty": {"x": {"y": []}},
        "mixed": [{"a": np.ones(2)}, (None, "s")],
    }
    ckpt.save(tmp_path / "c", state)
    restored = ckpt.load(tmp_path / "c")
    assert list(restored["dict"]) == ["b", "a"]
    assert restored["int_keys"] == state["int_keys"] and list(restored["int_keys"]) == [3, 0, -1]
    assert restored["list"] == [1, [2, [3]], []] and restored["tuple"] == (1, (2,), ())
    assert restored["empty"] == {} and restored["nested_empty"] == {"x": {"y": []}}
    assert isinstance(restored["mixed"][1], tuple) and restored["mixed"][1] == (None, "s")
    np.testing.assert_array_equal(restored["mixed"][0]["a"], np.ones(2))


def test_a_top_level_leaf_and_an_empty_tree_round_trip(tmp_path):
    ckpt.save(tmp_path / "leaf", np.arange(3))
    np.testing.assert_array_equal(ckpt.load(tmp_path / "leaf"), np.arange(3))
    ckpt.save(tmp_path / "empty", {})
    assert ckpt.load(tmp_path / "empty") == {}
    ckpt.save(tmp_path / "none", None)
    assert ckpt.load(tmp_path / "none") is None


def test_namedtuples_come_back_as_dicts_without_abstract_and_as_their_type_with_it(tmp_path):
    state = {"p": Pair(np.ones(2), Point(1, "y"))}
    ckpt.save(tmp_path / "c", state)
    plain = ckpt.load(tmp_path / "c")
    assert plain["p"]["second"] == {"x": 1, "y": "y"}
    typed = ckpt.load(tmp_path / "c", state)
    assert type(typed["p"]) is Pair and type(typed["p"].second) is Point
    assert typed["p"].second == Point(1, "y")
    np.testing.assert_array_equal(typed["p"].first, np.ones(2))


def test_many_small_leaves_round_trip(tmp_path):
    state = {f"layer{i}": {"w": np.full((4, 4), i, np.float32), "b": np.int32(i), "name": f"l{i}"} for i in range(1000)}
    ckpt.save(tmp_path / "c", state)
    restored = ckpt.load(tmp_path / "c")
    for i in (0, 499, 999):
        np.testing.assert_array_equal(restored[f"layer{i}"]["w"], state[f"layer{i}"]["w"])
        assert restored[f"layer{i}"]["b"] == i and restored[f"layer{i}"]["name"] == f"l{i}"


def test_packed_leaves_of_every_dtype_and_shape_are_read_in_place_of_one_packed_array(tmp_path):
    """0-d, 1-d and 2-d leaves of every dtype share the packed array, at offsets not always a multiple of
    their itemsize (<U3's is 12): each comes back exactly, as saved and into an abstract tree."""
    state = {f"{dtype}-{i}": random_array(dtype, math.prod(shape), seed=i).reshape(shape)
             for dtype in DTYPES for i, shape in enumerate([(), (SMALL,), (3, 5)])}
    ckpt.save(tmp_path / "c", state)
    tree = tree_doc(tmp_path / "c")
    assert all("packed" in leaf for leaf in tree["checkpointables"]["state"]["leaves"])
    for abstract in (None, state):
        loaded = ckpt.load(tmp_path / "c", abstract)
        assert [(v.dtype, v.shape, v.tobytes()) for v in loaded.values()] == [
            (v.dtype, v.shape, v.tobytes()) for v in state.values()]


# ------------------------------------------------------------------------ abstract trees
def test_abstract_array_dtype_casts_the_saved_values(tmp_path):
    ckpt.save(tmp_path / "c", {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 4, "n": np.arange(4)})
    restored = ckpt.load(tmp_path / "c", {"w": np.empty((2, 3), ml_dtypes.bfloat16), "n": np.empty(4, np.int8)})
    assert restored["w"].dtype == ml_dtypes.bfloat16 and restored["n"].dtype == np.int8
    np.testing.assert_array_equal(restored["w"].astype(np.float32), np.arange(6).reshape(2, 3) / 4)


def test_none_in_the_abstract_tree_loads_that_subtree_as_saved(tmp_path):
    state = {"model": {"w": np.ones(3), "b": [1, 2]}, "opt": {"mu": np.zeros(2)}}
    ckpt.save(tmp_path / "c", state)
    restored = ckpt.load(tmp_path / "c", {"model": None, "opt": {"mu": np.empty(2, np.float32)}})
    assert restored["model"]["b"] == [1, 2] and restored["opt"]["mu"].dtype == np.float32


def test_every_mismatching_key_path_is_listed_in_one_value_error(tmp_path):
    ckpt.save(tmp_path / "c", {"a": np.ones((2, 3)), "b": {"c": np.ones(4), "d": 1}, "e": [1, 2]})
    abstract = {"a": np.empty((3, 2)), "b": {"c": np.empty(4), "new": np.empty(1)}, "e": [1, 2, 3], "x": 0}
    with pytest.raises(ValueError) as info:
        ckpt.load(tmp_path / "c", abstract)
    message = str(info.value)
    for path in ("['a']", "['b']['new']", "['b']['d']", "['e'][2]", "['x']"):
        assert path in message, path
    assert isinstance(info.value, errors.TreeMismatchError) and len(info.value.differences) == 5
    assert "(2, 3)" in message and "(3, 2)" in message


def test_an_array_abstract_leaf_for_a_saved_scalar_value_is_a_mismatch(tmp_path):
    ckpt.save(tmp_path / "c", {"n": 3})
    with pytest.raises(ValueError, match=r"\['n'\].*int"):
        ckpt.load(tmp_path / "c", {"n": np.empty((2,))})


def test_a_saved_str_or_none_is_a_mismatch_for_a_zero_d_array_leaf_not_returned_in_its_place(tmp_path):
    ckpt.save(tmp_path / "c", {"s": "x", "n": None, "text": "y"})
    abstract = {"s": np.zeros((), np.float32), "n": np.float32(0), "text": np.str_("")}
    with pytest.raises(errors.TreeMismatchError) as info:
        ckpt.load(tmp_path / "c", abstract)
    assert sorted(info.value.differences) == [
        "state['n']: saved a none value, abstract leaf wants an array of shape ()",
        "state['s']: saved a str value, abstract leaf wants an array of shape ()"]
    assert ckpt.load(tmp_path / "c", {**abstract, "s": None, "n": None})["text"] == "y"


@pytest.mark.parametrize("saved, abstract", [
    ("x", 0), (None, 0), (float("nan"), 0), (float("inf"), 0), ("x", 1.0), (2**100, np.zeros((), np.int64)),
    (2**100, np.int32(0)), (np.array(["ab", "x"]), np.zeros(2, np.float32)),
    (np.arange(3.0), "x"), (np.arange(300_000.0), str), (5, "x"), (2.5, "x"), (b"xy", "x"), ("hello", True),
    (np.arange(3.0), b""), ("hello", b""),
], ids=["str into int", "None into int", "nan into int", "inf into int", "str into float",
        "2**100 into an int64 array", "2**100 into an int32 scalar", "text into a float32 array",
        "an array into a str", "a large array into the type str", "an int into a str", "a float into a str",
        "bytes into a str", "a str into a bool", "an array into bytes", "a str into bytes"])
def test_a_value_the_abstract_leaf_cannot_hold_is_a_mismatch_naming_the_leaf(tmp_path, saved, abstract):
    """Never a value of the abstract leaf's type made up from another (an array's printout as a str, a str's
    truth as a bool), which Orbax refuses too."""
    ckpt.save(tmp_path / "c", {"ok": np.ones(2), "n": saved})
    with pytest.raises(errors.TreeMismatchError,
                       match=r"\['n'\]: (it cannot be restored as a .* of the abstract tree|saved .*, abstract leaf wants)") as info:
        ckpt.load(tmp_path / "c", {"ok": np.ones(2), "n": abstract})
    assert info.value.differences[0].startswith("state['n']")


def test_a_cast_into_the_abstract_leafs_dtype_that_would_change_a_value_is_a_mismatch_naming_the_leaf(tmp_path):
    """numpy and jax wrap integers around (2**40 + 5 becomes 5 in int32) and overflow floats to inf; a load
    refuses such values (a value in range loads, rounded as numpy rounds)."""
    jax = pytest.importorskip("jax")
    fits = {"i": np.array([7, -3], np.int64), "f": np.array([0.1, -2.5]), "step": 40}
    ckpt.save(tmp_path / "fits", fits)
    narrow = {"i": np.int32, "f": np.float32, "step": np.int32}
    ckpt.save(tmp_path / "f4", np.array([6.3, -6.3]))  # (float4 has no infinity: these round to its largest, 6)
    assert ckpt.load(tmp_path / "f4", np.zeros(2, ml_dtypes.float4_e2m1fn)).astype(float).tolist() == [6, -6]
    one_device = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("x",)), jax.sharding.PartitionSpec())
    for make in (lambda d: np.zeros((2,), d), lambda d: jax.ShapeDtypeStruct((2,), d)):
        loaded = ckpt.load(tmp_path / "fits", {k: (make(d) if k != "step" else np.zeros((), d)) for k, d in narrow.items()})
        assert [np.asarray(loaded[k]).tolist() for k in fits] == [[7, -3], np.float32([0.1, -2.5]).tolist(), 40]
    cases = {"i": (np.array([7, 2**40 + 5], np.int64), np.zeros(2, np.int32), "int64 values, from 7 to 1099511627781"),
             "u": (np.array([2**63 + 7], np.uint64), jax.ShapeDtypeStruct((1,), np.int32), "do not fit int32"),
             "neg": (np.array([-1], np.int8), np.zeros(1, np.uint8), "from -1 to -1, do not fit uint8"),
             "f": (np.array([1e300, 0.5]), jax.ShapeDtypeStruct((2,), np.float32), "value 1e+300 does not fit float32"),
             "f8": (np.array([1000.0], np.float32), np.zeros(1, ml_dtypes.float8_e4m3fn), "it would become nan"),
             "f4": (np.array([1.0, 100.0], np.float32), np.zeros(2, ml_dtypes.float4_e2m1fn), "100.0 does not fit"),
             "f4inf": (np.array([np.inf]), np.zeros(1, ml_dtypes.float4_e2m1fn), "value inf does not fit float4_e2m1fn"),
             "e8m0": (np.array([2.0, 0.0], np.float16), np.zeros(2, ml_dtypes.float8_e8m0fnu), "0.0 does not fit"),
             # (compared with the target's largest value in the source's dtype, where it rounded up to 65536 in bfloat16,
             # to 16 in float8_e4m3fn: values that become inf loaded)
             "bf16": (np.array([65536.0], ml_dtypes.bfloat16), np.zeros(1, np.float16), "65536.0 does not fit float16"),
             "e3m4": (np.array([16.0], ml_dtypes.float8_e4m3fn), np.zeros(1, ml_dtypes.float8_e3m4), "16.0 does not fit"),
             # (every finite value in range: inf and NaN loaded as finite values, 28 and -0)
             "f6inf": (np.array([np.inf, np.nan], ml_dtypes.float8_e3m4), np.zeros(2, ml_dtypes.float6_e3m2fn),
                       "value inf does not fit float6_e3m2fn (it would become 28.0; 2 such value(s))"),
             # (casts into or from text and dates were numpy's: a text cut short, a number as text not its own, a
             # time made coarser loaded)
             "text": (np.array(["ab", "cde"]), np.zeros(2, "U1"), "<U3 value ab does not fit <U1 (it would become a;"),
             "as text": (np.array([1.5, 1e300]), np.zeros(2, "U3"), "float64 values do not fit <U3: they cannot be read"),
             "day": (np.array([1, 2], "datetime64[s]"), np.zeros(2, "datetime64[D]"), "does not fit datetime64[D]"),
             "nan": (np.array([np.nan], np.float32), np.zeros(1, np.int32), "from nan to nan, do not fit int32"),
             "step": (2**40 + 5, jax.ShapeDtypeStruct((), np.int32), "do not fit int32"),
             "imag": (np.array([1.5 + 0j, 1 + 2j]), np.zeros(2, np.float32),
                      "value (1+2j) has an imaginary part, which float32 cannot hold"),
             "c64": (np.array([1e300 + 0j]), np.zeros(1, np.complex64), "value (1e+300+0j) does not fit complex64"),
             "weak": (np.array([2**40]), jax.ShapeDtypeStruct((1,), np.int32, weak_type=True), "do not fit int32"),
             "placed": (np.array([2**40]), jax.ShapeDtypeStruct((1,), np.int32, weak_type=True, sharding=one_device),
                        "do not fit int32")}
    ckpt.save(tmp_path / "c", {k: saved for k, (saved, _, _) in cases.items()})  # (weak, placed: jax's other paths)
    for key, (_, abstract, why) in cases.items():
        tree = {k: (abstract if k == key else ckpt.PLACEHOLDER) for k in cases}
        with pytest.raises(errors.TreeMismatchError, match=rf"state\['{key}'\]: .*{re.escape(why)}"):
            ckpt.load(tmp_path / "c", tree)


def test_without_jax_x64_a_saved_64_bit_jax_array_whose_values_int32_cannot_hold_is_refused_naming_the_leaf(tmp_path):
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        ckpt.save(tmp_path / "c", {"ok": jax.numpy.arange(3, dtype=np.int64),
                                   "big": jax.numpy.array([2**40 + 5], dtype=np.int64)})
    assert not jax.config.jax_enable_x64
    assert ckpt.load(tmp_path / "c", {"ok": None, "big": ckpt.PLACEHOLDER})["ok"].dtype == np.int32
    for abstract in (None, {"ok": None, "big": None}, {"ok": None, "big": jax.ShapeDtypeStruct((1,), np.int64)}):
        with pytest.raises(errors.TreeMismatchError, match=r"state\['big'\]: .*do not fit int32 .*: jax holds int64 values as int32 without jax_enable_x64"):
            ckpt.load(tmp_path / "c", abstract)
    assert ckpt.load(tmp_path / "c", {"ok": None, "big": np.ndarray})["big"].tolist() == [2**40 + 5]


def test_partial_load_reads_a_subtree_only_when_asked(tmp_path):
    with ckpt.Checkpointer(tmp_path / "strict") as ckptr:
        ckptr.save(0, {"model": {"w": np.ones(3)}, "opt": {"mu": np.zeros(3)}})
        with pytest.raises(ValueError, match=r"\['opt'\]\['mu'\]: in the checkpoint"):
            ckptr.load(0, {"model": {"w": np.empty(3)}})
    context = ckpt.Context(pytree_options=ckpt.PyTreeOptions(partial_load=True))
    with ckpt.Checkpointer(tmp_path / "strict", context=context) as ckptr:
        assert list(ckptr.load(0, {"model": {"w": np.empty(3)}})) == ["model"]
        with pytest.raises(ValueError, match="not in the checkpoint"):
            ckptr.load(0, {"model": {"w": np.empty(3), "extra": np.empty(1)}})


def test_a_lazy_modules_uninitialized_parameters_in_the_template_are_a_mismatch_naming_them_and_none_loads_them(tmp_path):
    """(torch's bare RuntimeError "Can't access the shape of an uninitialized parameter", naming no leaf.)"""
    torch = pytest.importorskip("torch")
    trained = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Linear(3, 2))
    trained(torch.ones(1, 5))
    ckpt.save(tmp_path / "c", trained.state_dict())
    fresh = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Linear(3, 2))
    with pytest.raises(errors.TreeMismatchError) as info:
        ckpt.load(tmp_path / "c", fresh.state_dict())
    for key in ("0.weight", "0.bias"):
        assert (f"state['{key}']: the abstract leaf is an uninitialized parameter of a lazy module, which has no "
                "shape yet: put None in its place") in str(info.value)
    template = {k: None if isinstance(v, torch.nn.parameter.UninitializedParameter) else v
                for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(ckpt.load(tmp_path / "c", template))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))


def test_a_nested_tensor_in_the_template_is_a_mismatch_naming_it(tmp_path):
    """(A strided nested tensor raised torch's bare "RuntimeError: Internal error: NestedTensorImpl doesn't support
    sizes", naming no leaf; a jagged one said "abstract leaf wants (2, j1)".)"""
    torch = pytest.importorskip("torch")
    parts = [torch.ones(2), torch.ones(3)]
    ckpt.save(tmp_path / "c", {"a": torch.ones(2), "b": torch.ones(5)})
    for layout in (torch.strided, torch.jagged):
        with pytest.raises(errors.TreeMismatchError) as info:
            ckpt.load(tmp_path / "c", {"a": torch.zeros(2), "b": torch.nested.nested_tensor(parts, layout=layout)})
        assert "state['b']: the abstract leaf is a nested torch tensor, which ckpt neither stores nor loads into: put " \
               "None in its place" in str(info.value), layout
    assert torch.equal(ckpt.load(tmp_path / "c", {"a": torch.zeros(2), "b": None})["b"], torch.ones(5))

def test_a_sparse_tensor_in_the_template_is_a_mismatch_naming_it_as_its_save_is_refused(tmp_path):
    """A sparse COO or CSR template (of the saved shape) gave a dense tensor in its place without a word, where the
    save of a sparse tensor is refused naming the leaf: ckpt neither stores nor loads into sparse layouts."""
    torch = pytest.importorskip("torch")
    dense = torch.tensor([[0.0, 0.0, 3.0], [4.0, 0.0, 0.0]])
    with pytest.raises(TypeError, match=r"\['b'\] is torch\.sparse_coo, which ckpt cannot store"):
        ckpt.save(tmp_path / "refused", {"a": torch.ones(2), "b": dense.to_sparse()})
    ckpt.save(tmp_path / "c", {"a": torch.ones(2), "b": dense})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's CSR support is in beta)
        templates = {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr(), "shape": torch.zeros(3, 2).to_sparse()}
    for name, template in templates.items():
        with pytest.raises(errors.TreeMismatchError, match=r"state\['b'\]: .*(is a torch\.sparse_c.. tensor, which ckpt "
                                                           r"neither stores nor loads into|wants \(3, 2\))"):
            ckpt.load(tmp_path / "c", {"a": torch.zeros(2), "b": template})
    assert torch.equal(ckpt.load(tmp_path / "c", {"a": torch.zeros(2), "b": torch.zeros(2, 3)})["b"], dense)


def test_a_fresh_optimizers_empty_state_in_the_template_leads_to_none_not_to_a_partial_load(tmp_path):
    # was: the hint suggested partial_load, which silently dropped Adam's moments on resume
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt.save(tmp_path / "c", {"optim": optimizer.state_dict()})
    template = {"optim": torch.optim.Adam(torch.nn.Linear(3, 2).parameters()).state_dict()}
    with pytest.raises(errors.TreeMismatchError) as info:
        ckpt.load(tmp_path / "c", template)
    assert "state['optim']['state'][0]['exp_avg']: in the checkpoint, not in the abstract tree (where " \
           "state['optim']['state'] is empty)" in str(info.value)
    assert "put None in its place" in str(info.value) and "partial_load=True" not in str(info.value)
    template["optim"]["state"] = None
    loaded = ckpt.load(tmp_path / "c", template)["optim"]["state"]
    assert torch.equal(loaded[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


# --------------------------------------------------------------------------------- jax
def test_jax_arrays_of_every_dtype_round_trip_as_jax_arrays(tmp_path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.int32, jnp.uint8, jnp.uint32, jnp.bool_,
              jnp.float8_e4m3fn, jnp.int4, jnp.complex64]
    state = {str(np.dtype(d)): jnp.asarray(random_array(np.dtype(d), 12).reshape(3, 4)) for d in dtypes}
    state["large"] = jnp.arange(LARGE_BYTES // 4 + 1, dtype=jnp.float32)
    state["zero_d"] = jnp.float32(3.0)
    ckpt.save(tmp_path / "c", state)
    as_saved = ckpt.load(tmp_path / "c")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    typed = ckpt.load(tmp_path / "c", abstract)
    for key, value in state.items():
        for restored in (as_saved, typed):
            assert isinstance(restored[key], jax.Array), key
            assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, key
            assert np.asarray(restored[key]).tobytes() == np.asarray(value).tobytes(), key


def test_typed_prng_keys_round_trip_with_their_impl_and_raw_keys_as_uint32(tmp_path):
    jax = pytest.importorskip("jax")

    state = {"key": jax.random.key(42), "keys": jax.random.split(jax.random.key(1), 3),
             "rbg": jax.random.key(7, impl="rbg"), "raw": jax.random.PRNGKey(5)}
    ckpt.save(tmp_path / "c", state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    for restored in (ckpt.load(tmp_path / "c"), ckpt.load(tmp_path / "c", abstract)):
        for key in ("key", "keys", "rbg"):
            assert jax.dtypes.issubdtype(restored[key].dtype, jax.dtypes.prng_key), key
            assert restored[key].shape == state[key].shape, key
            assert str(jax.random.key_impl(restored[key])) == str(jax.random.key_impl(state[key])), key
            np.testing.assert_array_equal(jax.random.key_data(restored[key]), jax.random.key_data(state[key]))
        assert restored["raw"].dtype == np.uint32
        np.testing.assert_array_equal(restored["raw"], state["raw"])
        assert jax.random.uniform(restored["key"]) == jax.random.uniform(state["key"])


def test_a_jax_ref_is_refused_when_saved_and_an_abstract_jax_ref_receives_a_new_ref_holding_the_array(tmp_path):
    """A jax.Ref (mutable) is no leaf ckpt stores, nor does Orbax: the refusal says to save ``ref[...]``, before
    anything is written. Was: an abstract jax.Ref received a numpy array (it has shape and dtype); Orbax gives a
    jax.Array; ckpt gives a Ref of the abstract tree's type, holding the array in the abstract's dtype."""
    jax = pytest.importorskip("jax")
    if not hasattr(jax, "Ref"):
        pytest.skip("jax.Ref is jax 0.7's and later")
    jnp = jax.numpy
    with pytest.raises(TypeError, match=r"leaf at \['w'\] is a jax.Ref.*save the array it holds, `ref\[...\]`"):
        ckpt.save(tmp_path / "refs", {"w": jax.new_ref(jnp.ones(3))})
    assert not (tmp_path / "refs").exists()
    ckpt.save(tmp_path / "model", {"w": jnp.arange(3.0), "n": np.arange(2)})
    abstract = {"w": jax.new_ref(jnp.zeros(3, jnp.bfloat16)), "n": jax.new_ref(jnp.zeros(2, jnp.int32))}
    loaded = ckpt.load(tmp_path / "model", abstract)
    assert all(isinstance(v, jax.Ref) for v in loaded.values())  # was: numpy arrays
    assert loaded["w"].dtype == jnp.bfloat16 and loaded["n"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(loaded["w"][...], np.float32), [0, 1, 2])
    np.testing.assert_array_equal(abstract["w"][...], np.zeros(3))  # the abstract tree's Ref is left as it was


def test_weak_typed_jax_arrays_keep_their_weak_type_with_and_without_an_abstract_tree(tmp_path):
    """A weak-typed scalar (jnp.asarray(0.5): a Python scalar's type) came back strong, into jax.eval_shape's
    weak abstract leaf too: a resumed step multiplying bf16 params by it made them float32."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    state = {"params": jnp.ones(4, jnp.bfloat16), "scale": jnp.asarray(0.5), "count": jnp.asarray(3),
             "strong": jnp.float32(2.0)}
    weak = {key: value.weak_type for key, value in state.items()}
    assert weak == {"params": False, "scale": True, "count": True, "strong": False}
    ckpt.save(tmp_path / "c", state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = {key: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device, weak_type=v.weak_type) for key, v in state.items()}
    for target in (None, jax.eval_shape(lambda: state), placed, state):
        restored = ckpt.load(tmp_path / "c", target)
        assert {key: value.weak_type for key, value in restored.items()} == weak
        assert (restored["params"] * restored["scale"]).dtype == jnp.bfloat16
        for key, value in state.items():
            assert restored[key].dtype == value.dtype and restored[key].item(0) == value.item(0), key
    with ckpt.Checkpointer(tmp_path / "run") as ckptr:  # the second save, of another weak type, plans anew
        ckptr.save(0, {"s": jnp.asarray(0.5)}, force=True)
        ckptr.save(1, {"s": jnp.float32(0.5)}, force=True)
        assert ckptr.load(0)["s"].weak_type and not ckptr.load(1)["s"].weak_type


def test_weak_typed_arrays_load_under_the_jax_set_mesh_of_another_mesh(tmp_path):
    """Under jax.set_mesh, a weak-typed array saved on another mesh (a TrainState's step after a jitted step
    of a pjit loop: 0 + 1 is weak) made a load without an abstract tree call the step damaged, and a load into
    the state itself a mismatch: jax refused the weak-type conversion of an array off the context's mesh."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    if not hasattr(jax, "set_mesh"):
        pytest.skip("jax.set_mesh is newer than this jax")
    step = jax.device_put(jnp.asarray(3), NamedSharding(jax.make_mesh((1,), ("saved",)), PartitionSpec()))
    state = {"step": step, "scale": jnp.asarray(0.5), "w": jnp.ones(2)}
    ckpt.save(tmp_path / "c", state)
    with jax.set_mesh(jax.make_mesh((1,), ("other",))):
        for target in (None, state):
            restored = ckpt.load(tmp_path / "c", target)
            assert restored["step"].weak_type and restored["step"].sharding == step.sharding
            assert restored["step"].item() == 3 and restored["scale"].weak_type


def test_weak_typed_arrays_placed_in_host_memory_load_into_host_memory(tmp_path):
    """A weak-typed array restored into an abstract leaf placed in host memory (memory_kind='pinned_host': a
    state offloaded to the host, a TrainState's step among it) came back in device memory, which a jitted
    step sharded for the host refuses ('Memory kinds passed to jax.jit does not match')."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    state = {"step": jax.device_put(jnp.asarray(3), host)}
    ckpt.save(tmp_path / "c", state)
    for target in (state, {"step": jax.ShapeDtypeStruct((), jnp.int32, weak_type=True, sharding=host)}):
        restored = ckpt.load(tmp_path / "c", target)["step"]
        assert restored.weak_type and restored.sharding == host and restored.item() == 3


def test_weak_typed_nans_and_infinities_load_under_jax_debug_nans_and_debug_infs(tmp_path):
    """Under jax.debug_nans (on while a run's NaNs are hunted), a load of a weak-typed NaN raised jax's
    FloatingPointError 'invalid value (nan) encountered in convert_element_type', naming no leaf; strong ones loaded."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    state = {"loss": jnp.asarray(float("nan")), "best": jnp.asarray(float("inf")), "w": jnp.array([np.nan, 1.0])}
    ckpt.save(tmp_path / "c", state)
    with jax.debug_nans(True), jax.debug_infs(True):
        for target in (None, state):
            restored = ckpt.load(tmp_path / "c", target)
            assert restored["loss"].weak_type and np.isnan(restored["loss"]) and np.isinf(restored["best"])


def test_prng_keys_of_another_impl_than_the_abstract_leafs_are_a_mismatch_naming_the_leaf(tmp_path):
    jax = pytest.importorskip("jax")

    ckpt.save(tmp_path / "c", {"k": jax.random.key(1), "n": 1})
    for impl, target in [("rbg", jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))),
                         ("unsafe_rbg", jax.random.key(0, impl="unsafe_rbg"))]:
        with pytest.raises(ckpt.errors.TreeMismatchError,
                           match=rf"\['k'\]: saved 'threefry2x32' PRNG keys, abstract leaf wants '{impl}' keys"):
            ckpt.load(tmp_path / "c", {"k": target, "n": 0})


def test_prng_keys_go_into_uint32_leaves_of_their_shape_and_a_numpy_leaf_of_their_key_datas_not_elsewhere(tmp_path):
    """A float32 ShapeDtypeStruct silently received keys, and a 0-d numpy leaf their key data of shape (2,)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    ckpt.save(tmp_path / "c", {"k": jax.random.key(3)})
    data = jax.random.key_data(jax.random.key(3))
    keys_leaf = ckpt.metadata(tmp_path / "c").metadata["k"]  # metadata()'s idiom: uint32 leaves of the keys' shape
    for target in (jax.ShapeDtypeStruct((), jnp.uint32), jnp.zeros((), jnp.uint32), keys_leaf):
        loaded = ckpt.load(tmp_path / "c", {"k": target})["k"]
        np.testing.assert_array_equal(jax.random.key_data(loaded), data)
    np.testing.assert_array_equal(ckpt.load(tmp_path / "c", {"k": np.zeros(2, np.uint32)})["k"], data)
    data_shape, keys_shape = r"PRNG keys, their key data has shape \(2,\)", r"PRNG keys, the keys have shape \(\)"
    for target, why in [(jax.ShapeDtypeStruct((), jnp.float32),
                         r"PRNG keys \(uint32 key data\), abstract leaf wants float32"),
                        (np.zeros((), np.uint32), data_shape + r", abstract leaf wants \(\)"),
                        (np.uint32(0), data_shape + r", abstract leaf wants \(\)"),
                        (jax.ShapeDtypeStruct((2,), jnp.uint32), keys_shape + r", abstract leaf wants \(2,\)")]:
        with pytest.raises(ckpt.errors.TreeMismatchError, match=r"\['k'\]: saved 'threefry2x32' " + why):
            ckpt.load(tmp_path / "c", {"k": target})


def test_raw_key_data_goes_into_typed_keys_of_its_shape_less_the_key_data_dimension_and_nowhere_else(tmp_path):
    """A state saved with jax.random.PRNGKey keys, loaded into one with jax.random.key keys: a uint32 (2,) leaf
    into a 0-d key was refused ('saved shape (2,), abstract leaf wants ()'), and one into two keys (shape (2,))
    silently became a single 0-d key."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    raw = {"k": jax.random.PRNGKey(3), "ks": jax.random.key_data(jax.random.split(jax.random.key(1), 3)),
           "two": jnp.arange(2, dtype=jnp.uint32), "f": jnp.ones(2)}
    ckpt.save(tmp_path / "c", raw)
    target = {"k": jax.eval_shape(lambda: jax.random.key(0)), "ks": jax.random.split(jax.random.key(0), 3),
              "two": None, "f": None}
    loaded = ckpt.load(tmp_path / "c", target)
    for name in ("k", "ks"):
        assert loaded[name].dtype == target[name].dtype and loaded[name].shape == target[name].shape, name
        np.testing.assert_array_equal(jax.random.key_data(loaded[name]), raw[name])
    two_keys = jax.random.split(jax.random.key(0))
    for name, dtype in [("two", "uint32"), ("f", "float32")]:
        with pytest.raises(ckpt.errors.TreeMismatchError, match=rf"\['{name}'\]: saved a jax leaf of dtype {dtype} and "
                           r"shape \(2,\), abstract leaf wants 'threefry2x32' PRNG keys of shape \(2,\), which only "
                           r"their uint32 key data \(shape \(2, 2\)\) becomes"):
            ckpt.load(tmp_path / "c", {**target, name: two_keys})

def test_prng_keys_go_into_a_torch_tensor_of_their_key_datas_shape_and_uint32_else_a_mismatch(tmp_path):
    """A torch abstract leaf raised numpy's 'Cannot interpret torch.float32 as a data type', naming no leaf."""
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")

    ckpt.save(tmp_path / "c", {"k": jax.random.key(3)})
    data = np.asarray(jax.random.key_data(jax.random.key(3)))
    loaded = ckpt.load(tmp_path / "c", {"k": torch.zeros(2, dtype=torch.uint32)})["k"]
    assert isinstance(loaded, torch.Tensor) and np.array_equal(loaded.numpy(), data)
    for target, why in [(torch.zeros(2), r"PRNG keys \(uint32 key data\), abstract leaf wants float32"),
                        (torch.zeros((), dtype=torch.uint32), r"PRNG keys, their key data has shape \(2,\), abstract "
                                                              r"leaf wants \(\)")]:
        with pytest.raises(ckpt.errors.TreeMismatchError, match=r"\['k'\]: saved 'threefry2x32' " + why):
            ckpt.load(tmp_path / "c", {"k": target})


def test_shape_dtype_struct_dtype_casts_and_a_shape_mismatch_names_the_leaf(tmp_path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    ckpt.save(tmp_path / "c", {"w": np.linspace(0, 1, 8, dtype=np.float32), "n": np.ones(3)})
    restored = ckpt.load(tmp_path / "c", {"w": jax.ShapeDtypeStruct((8,), jnp.bfloat16), "n": np.empty(3)})
    assert isinstance(restored["w"], jax.Array) and restored["w"].dtype == jnp.bfloat16
    assert isinstance(restored["n"], np.ndarray)
    want = np.linspace(0, 1, 8, dtype=np.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(restored["w"]), want)
    with pytest.raises(ValueError, match=r"\['w'\]: saved shape \(8,\), abstract leaf wants \(4,\)"):
        ckpt.load(tmp_path / "c", {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "n": np.empty(3)})


def test_an_abstract_tree_with_its_keys_in_another_order_gets_each_leaf_by_its_key(tmp_path):
    """jax.eval_shape sorts the keys of dicts saved in insertion order: each abstract leaf still receives
    the saved leaf at its key path (packed, large or inline; into jax or numpy), and a leaf that cannot
    is named."""
    jax = pytest.importorskip("jax")
    state = {f"w{i}": jax.numpy.full(3 + i, i, np.float32) for i in (10, 2, 1, 0)}  # saved as jax
    state.update(big=np.arange(LARGE_BYTES // 4, dtype=np.float32), n=5)
    ckpt.save(tmp_path / "c", state)
    target = jax.eval_shape(lambda: {k: jax.numpy.asarray(v) for k, v in state.items()})
    assert list(target) == sorted(state) != list(state)
    restored = ckpt.load(tmp_path / "c", target)
    assert list(restored) == list(target)
    for key, value in state.items():
        assert isinstance(restored[key], jax.Array) and restored[key].dtype == target[key].dtype, key
        np.testing.assert_array_equal(np.asarray(restored[key]), value)
    reverse = {key: np.empty(np.shape(state[key]), np.float64) for key in reversed(state)}
    restored = ckpt.load(tmp_path / "c", reverse)
    assert list(restored) == list(reverse)
    for key, value in state.items():
        assert restored[key].dtype == np.float64, key
        np.testing.assert_array_equal(restored[key], value)
    with pytest.raises(ValueError, match=r"\['w2'\]: saved shape \(5,\), abstract leaf wants \(4,\)"):
        ckpt.load(tmp_path / "c", {**reverse, "w2": np.empty(4)})
    renamed = {("v0" if key == "w0" else key): value for key, value in reverse.items()}  # as many keys, one other
    with pytest.raises(ValueError, match=r"(?s)\['v0'\]: in the abstract tree, not in the checkpoint.*\['w0'\]: in the"):
        ckpt.load(tmp_path / "c", renamed)
    nested = {"z": {"b": np.ones(2), "a": [np.zeros(1), 3]}, "y": np.arange(3)}  # reordered at two levels
    ckpt.save(tmp_path / "n", nested)
    restored = ckpt.load(tmp_path / "n", {"y": np.empty(3, np.int8), "z": {"a": [np.empty(1), 0], "b": np.empty(2)}})
    assert list(restored) == ["y", "z"] and list(restored["z"]) == ["a", "b"] and restored["y"].dtype == np.int8
    np.testing.assert_array_equal(restored["y"], [0, 1, 2])
    assert restored["z"]["a"][1] == 3 and restored["z"]["b"].tolist() == [1, 1] and restored["z"]["a"][0].tolist() == [0]
    skipped = ckpt.load(tmp_path / "n", {"z": {"a": [np.empty(1), 0], "b": np.empty(2)}, "y": ckpt.PLACEHOLDER})
    assert skipped["y"] is ckpt.PLACEHOLDER and skipped["z"]["a"][1] == 3 and list(skipped["z"]) == ["a", "b"]
    some = ckpt.load(tmp_path / "n", {"y": ckpt.PLACEHOLDER, "z": {"a": None, "b": np.empty(2)}})  # not one leaf each
    assert some["y"] is ckpt.PLACEHOLDER and some["z"]["a"][1] == 3 and list(some["z"]) == ["a", "b"]


def test_an_abstract_tree_like_the_saved_one_in_plain_containers_gets_its_own_containers_keys_and_checks(tmp_path):
    """The usual load (an abstract tree of dicts, lists and tuples with the saved keys in the saved order)
    finds its leaves without key paths: its containers, keys and mismatches stay those of any other load."""
    state = {"a": {"x": np.arange(3), 1: np.ones(2)}, "l": [np.zeros(1), np.arange(4.0)], "t": (np.int8(3) * np.ones(()),)}
    ckpt.save(tmp_path / "c", state)
    restored = ckpt.load(tmp_path / "c", state)
    assert type(restored["a"]) is dict and list(map(type, restored["a"])) == [str, int]
    assert type(restored["l"]) is list and type(restored["t"]) is tuple and restored["t"][0].shape == ()
    np.testing.assert_array_equal(restored["l"][1], np.arange(4.0))
    as_tuple = ckpt.load(tmp_path / "c", {**state, "l": tuple(state["l"])})
    assert type(as_tuple["l"]) is tuple
    ordered = ckpt.load(tmp_path / "c", {**state, "a": collections.OrderedDict(state["a"])})
    assert type(ordered["a"]) is collections.OrderedDict and list(ordered["a"]) == ["x", 1]
    as_text = ckpt.load(tmp_path / "c", {**state, "a": {"x": np.arange(3), "1": np.ones(2)}})  # (as Orbax keys)
    assert list(as_text["a"]) == ["x", "1"] and as_text["a"]["1"].tolist() == [1.0, 1.0]
    with pytest.raises(errors.TreeMismatchError, match=r"\['a'\]\['y'\]: in the abstract tree, not in the"):
        ckpt.load(tmp_path / "c", {**state, "a": {"x": np.arange(3), "y": np.ones(2)}})
    for key in (1.0, True):
        with pytest.raises(TypeError, match=f"dict key {key!r} of type {type(key).__name__}"):
            ckpt.load(tmp_path / "c", {**state, "a": {"x": np.arange(3), key: np.ones(2)}})
    with pytest.raises(errors.TreeMismatchError, match=r"\['l'\]\[1\]: saved shape \(4,\), abstract leaf wants \(5,\)"):
        ckpt.load(tmp_path / "c", {**state, "l": [np.zeros(1), np.empty(5)]})


def test_registered_pytree_nodes_come_back_as_their_types_from_an_abstract_tree(tmp_path):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")

    params = {"dense": {"kernel": jax.numpy.ones((3, 2)), "bias": jax.numpy.zeros(2)}}
    opt_state = optax.adam(1e-3).init(params)
    state = {"params": params, "opt_state": opt_state, "step": 3}
    ckpt.save(tmp_path / "c", state)
    restored = ckpt.load(tmp_path / "c", jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert type(restored["opt_state"][0]) is type(opt_state[0])
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    as_saved = ckpt.load(tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(as_saved["opt_state"][0]["mu"]["dense"]["kernel"]), np.zeros((3, 2)))


# ------------------------------------------------------------------------------- torch
TORCH_DTYPES = ["float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "int8",
                "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128"]


@pytest.mark.parametrize("size", ["small", "large"])
def test_torch_tensors_of_every_dtype_round_trip_as_tensors(tmp_path, size):
    torch = pytest.importorskip("torch")

    state = {}
    for name in TORCH_DTYPES:
        dtype = getattr(torch, name)
        n = 6 if size == "small" else LARGE_BYTES // dtype.itemsize + 1
        state[name] = torch.from_numpy(random_array(np.dtype("uint8"), n * dtype.itemsize).copy()).view(dtype)
        if name == "bool":
            state[name] = state[name] & True
    state["non_contiguous"] = torch.arange(40.0).reshape(5, 8).T
    ckpt.save(tmp_path / "c", state)
    abstract = {key: torch.empty(value.shape, dtype=value.dtype) for key, value in state.items()}
    for restored in (ckpt.load(tmp_path / "c"), ckpt.load(tmp_path / "c", abstract)):
        for key, value in state.items():
            got = restored[key]
            assert isinstance(got, torch.Tensor) and got.dtype == value.dtype and got.shape == value.shape, key
            assert got.contiguous().view(torch.uint8).equal(value.contiguous().view(torch.uint8)), key


def test_a_tensor_abstract_leaf_casts_to_its_dtype_and_an_array_leaf_returns_numpy(tmp_path):
    torch = pytest.importorskip("torch")

    ckpt.save(tmp_path / "c", {"w": torch.linspace(0, 1, 6), "b": torch.ones(2, dtype=torch.bfloat16)})
    abstract = {"w": torch.empty(6, dtype=torch.bfloat16), "b": np.empty(2, ml_dtypes.bfloat16)}
    restored = ckpt.load(tmp_path / "c", abstract)
    assert restored["w"].dtype == torch.bfloat16
    assert torch.equal(restored["w"], torch.linspace(0, 1, 6).to(torch.bfloat16))
    assert isinstance(restored["b"], np.ndarray) and restored["b"].dtype == ml_dtypes.bfloat16


def test_a_cast_into_a_torch_templates_dtype_that_would_change_a_value_is_a_mismatch_naming_the_leaf(tmp_path):
    """torch's cast wrapped 2**40 + 5 into 5 in an int32 template, made 70000.0 inf in a float16 one and 1000.0
    448.0 in a float8_e4m3fn one, a NaN INT_MIN, a saved 2 True; a value in range loads, rounded as torch rounds."""
    torch = pytest.importorskip("torch")
    ckpt.save(tmp_path / "fits", {"i": torch.tensor([7, -3]), "f": torch.tensor([0.1, 65504.0]), "n": 40,
                                  "c": torch.tensor([0.5 + 0j, -2 + 0j], dtype=torch.complex128)})
    loaded = ckpt.load(tmp_path / "fits", {"i": torch.zeros(2, dtype=torch.int8), "f": torch.zeros(2, dtype=torch.float16),
                                           "n": torch.nn.Parameter(torch.zeros((), dtype=torch.int16), requires_grad=False),
                                           "c": torch.zeros(2)})
    assert loaded["i"].tolist() == [7, -3] and torch.equal(loaded["f"], torch.tensor([0.1, 65504.0]).half())
    assert loaded["c"].dtype == torch.float32 and loaded["c"].tolist() == [0.5, -2.0]  # (no imaginary part to lose)
    assert type(loaded["n"]) is torch.nn.Parameter and loaded["n"].item() == 40
    cases = {"i": (torch.tensor([7, 2**40 + 5]), torch.zeros(2, dtype=torch.int32), "int64 values, from 7 to 1099511627781"),
             "neg": (torch.tensor([-1], dtype=torch.int8), torch.zeros(1, dtype=torch.uint8), "do not fit uint8"),
             "f": (torch.tensor([70000.0, 0.5]), torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)),
                   "value 70000.0 does not fit float16"),
             "meta": (torch.tensor([1e300], dtype=torch.float64), torch.empty(1, device="meta"), "does not fit float32"),
             "f8": (torch.tensor([1000.0]), torch.zeros(1, dtype=torch.float8_e4m3fn), "it would become nan"),
             "nan": (torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.int32), "from nan to nan, do not fit int32"),
             "bool": (torch.tensor([0, 2]), torch.zeros(2, dtype=torch.bool), "do not fit bool"),
             "imag": (torch.tensor([1 + 2j]), torch.zeros(1), "value (1+2j) has an imaginary part, which float32 cannot hold"),
             "c64": (torch.tensor([1e300 + 0j], dtype=torch.complex128), torch.zeros(1, dtype=torch.complex64),
                     "does not fit complex64"),
             # (complex32, which numpy has no twin of, was cast unchecked: 2**40 became inf+0j)
             "c32": (torch.tensor([2**40]), torch.zeros(1, dtype=torch.complex32),
                    "value 1099511627776 does not fit float16 (it would become inf; 1 such value(s)): complex32 holds two"),
             "c32imag": (torch.tensor([1 + 7e4j]), torch.zeros(1, dtype=torch.complex32),
                        "value 70000.0 does not fit float16"),
             "step": (2**40 + 5, torch.zeros((), dtype=torch.int32), "do not fit int32")}
    ckpt.save(tmp_path / "c", {k: saved for k, (saved, _, _) in cases.items()})
    for key, (_, template, why) in cases.items():
        tree = {k: (template if k == key else ckpt.PLACEHOLDER) for k in cases}
        with pytest.raises(errors.TreeMismatchError, match=rf"state\['{key}'\]: .*{re.escape(why)}"):
            ckpt.load(tmp_path / "c", tree)


@pytest.mark.parametrize("dtype", ["bits8", "qint8"])
def test_a_tensor_template_of_a_dtype_torch_cannot_copy_into_is_a_mismatch_naming_the_leaf(tmp_path, dtype):
    """torch's NotImplementedError ('"copy_" not implemented for 'Bits8'') or RuntimeError came out of the load,
    naming no leaf."""
    torch = pytest.importorskip("torch")
    ckpt.save(tmp_path / "c", {"ok": torch.ones(2), "w": torch.arange(6, dtype=torch.uint8)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch deprecates its quantized dtypes)
        template = (torch.empty(6, dtype=torch.bits8) if dtype == "bits8"
                    else torch.quantize_per_tensor(torch.zeros(6), 0.1, 0, torch.qint8))
    with pytest.raises(errors.TreeMismatchError, match=rf"state\['w'\]: .*the template has dtype torch\.{dtype}, "
                                                       "which torch cannot copy values into"):
        ckpt.load(tmp_path / "c", {"ok": torch.empty(2), "w": template})


def test_a_model_made_on_the_meta_device_is_an_abstract_tree_loaded_as_cpu_tensors(tmp_path):
    """``with torch.device("meta"): model = Net()`` then ``load_state_dict(loaded, assign=True)``: the
    meta tensors give shapes and dtypes only, and the values must arrive (not more meta tensors)."""
    torch = pytest.importorskip("torch")
    saved = torch.nn.Linear(3, 2).state_dict()
    ckpt.save(tmp_path / "c", saved)
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2, dtype=torch.float64)
    loaded = ckpt.load(tmp_path / "c", model.state_dict())
    for key, value in saved.items():
        assert loaded[key].device.type == "cpu" and loaded[key].dtype == torch.float64, key
        assert torch.equal(loaded[key], value.double()), key
    model.load_state_dict(loaded, assign=True)
    assert torch.equal(model.weight, saved["weight"].double())


def test_zero_dimensional_torch_tensors_keep_their_shape(tmp_path):
    torch = pytest.importorskip("torch")
    saved = {"step": torch.tensor(3.0), "count": torch.tensor(7), "bf": torch.tensor(0.5, dtype=torch.bfloat16)}
    ckpt.save(tmp_path / "c", saved)
    for loaded in (ckpt.load(tmp_path / "c"), ckpt.load(tmp_path / "c", {k: torch.empty(()) for k in saved})):
        assert all(loaded[k].shape == () for k in saved), {k: loaded[k].shape for k in loaded}
    assert ckpt.load(tmp_path / "c")["bf"].dtype == torch.bfloat16


def test_a_tensor_template_of_another_layout_gives_its_values_in_that_layout(tmp_path):
    """A channels_last (or transposed) template gave back a contiguous tensor: a result used directly lost the
    template's layout, which DCP, loading into the template, keeps."""
    torch = pytest.importorskip("torch")
    saved = {"conv": torch.randn(2, 3, 4, 5), "conv3d": torch.randn(2, 3, 2, 2, 2), "t": torch.randn(3, 4)}
    ckpt.save(tmp_path / "c", saved)
    templates = {"conv": torch.nn.Parameter(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)),
                 "conv3d": torch.empty(2, 3, 2, 2, 2, device="meta").to(memory_format=torch.channels_last_3d),
                 "t": torch.empty(4, 3).t()}
    loaded = ckpt.load(tmp_path / "c", templates)
    assert isinstance(loaded["conv"], torch.nn.Parameter) and loaded["conv"].requires_grad
    assert loaded["conv"].is_contiguous(memory_format=torch.channels_last)
    assert loaded["conv3d"].is_contiguous(memory_format=torch.channels_last_3d)
    assert loaded["t"].stride() == (1, 3)
    assert all(torch.equal(loaded[k].detach(), saved[k]) for k in saved)


def test_tensors_tied_in_the_template_come_back_tied_where_their_saved_values_are_alike(tmp_path):
    """(A module's tied weights, an embedding and the LM head at two keys of state_dict() sharing their storage,
    came back as two tensors, untied; torch.load, and a load into the template's own tensors, keep them tied.)"""
    torch = pytest.importorskip("torch")

    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    saved = TiedLM().state_dict()
    ckpt.save(tmp_path / "tied", saved)
    with torch.device("meta"):
        on_meta = TiedLM()
    for templates in (TiedLM().state_dict(), on_meta.state_dict(), TiedLM().state_dict(keep_vars=True)):
        loaded = ckpt.load(tmp_path / "tied", templates)
        assert loaded["emb.weight"] is loaded["head.weight"] and torch.equal(loaded["emb.weight"], saved["emb.weight"])
    untied = {"emb.weight": torch.zeros(10, 4), "head.weight": torch.ones(10, 4)}  # an untied model's: kept apart
    ckpt.save(tmp_path / "untied", untied)
    loaded = ckpt.load(tmp_path / "untied", TiedLM().state_dict())
    assert all(torch.equal(loaded[k], untied[k]) for k in untied)
    alike = torch.zeros(10, 4)  # tensors that share no storage stay apart, their values alike or not
    ckpt.save(tmp_path / "apart", {"a": alike, "b": alike.clone()})
    loaded = ckpt.load(tmp_path / "apart", {"a": torch.empty(10, 4), "b": torch.empty(10, 4)})
    assert loaded["a"] is not loaded["b"]


def test_keys_of_one_template_tensor_come_back_tied_by_the_values_saved_at_them_whichever_key_is_first(tmp_path):
    """(Each key of a template tensor was compared with its first key only: three keys saved a != b == c came back
    as three tensors, b and c untied.)"""
    torch = pytest.importorskip("torch")
    w, template = torch.arange(12.0).reshape(4, 3), torch.zeros(4, 3)
    ckpt.save(tmp_path / "three", {"a": w, "b": w + 1, "c": w + 1})
    loaded = ckpt.load(tmp_path / "three", dict.fromkeys("abc", template))
    assert loaded["b"] is loaded["c"] and loaded["a"] is not loaded["b"] and torch.equal(loaded["a"], w)
    assert torch.equal(loaded["b"], w + 1)
    # one template tensor at many keys (grouped by their bytes at once, not compared pair by pair): three values
    saved = {f"k{i}": torch.full((3,), float(i % 3)) for i in range(40)}
    saved["k7"] = torch.tensor([1.0, float("nan"), -0.0])  # (alike as bits only: k37 holds the same, k38 +0.0)
    saved["k37"], saved["k38"] = saved["k7"].clone(), torch.tensor([1.0, float("nan"), 0.0])
    ckpt.save(tmp_path / "many", saved)
    loaded = ckpt.load(tmp_path / "many", dict.fromkeys(saved, torch.zeros(3)))
    firsts = {id(loaded[k]): k for k in reversed(list(saved))}
    assert sorted(firsts.values()) == ["k0", "k1", "k2", "k38", "k7"]
    assert all(loaded[k].equal(v) or k in ("k7", "k37", "k38") for k, v in saved.items())
    assert loaded["k37"] is loaded["k7"] and loaded["k4"] is loaded["k1"] and loaded["k39"] is loaded["k0"]


def test_a_parameter_and_its_detached_tensor_in_the_template_come_back_each_as_its_template_is(tmp_path):
    """(A template holding a Parameter and its detach() at two keys, one storage and one view, gave the Parameter,
    requiring gradients, at both keys: an in-place change of the plain tensor's key raised in torch's autograd.)"""
    torch = pytest.importorskip("torch")
    ckpt.save(tmp_path / "alike", {"p": torch.ones(4, 3), "d": torch.ones(4, 3)})
    for weight in (torch.nn.Parameter(torch.zeros(4, 3)), torch.zeros(4, 3, requires_grad=True)):
        loaded = ckpt.load(tmp_path / "alike", {"p": weight, "d": weight.detach()})
        assert type(loaded["p"]) is type(weight) and loaded["p"].requires_grad and torch.equal(loaded["p"], torch.ones(4, 3))
        assert type(loaded["d"]) is torch.Tensor and not loaded["d"].requires_grad
        assert torch.equal(loaded["d"].add_(1), torch.full((4, 3), 2.0))  # (raised: a leaf requiring grad, in place)


def test_a_conjugated_or_negated_torch_view_saves_its_values(tmp_path):
    """torch.conj and torch.neg of some tensors are lazy views, a bit set on the tensor; numpy() refuses them."""
    torch = pytest.importorskip("torch")
    z, x = torch.tensor([1 + 2j, 3 - 1j]), torch.tensor([1.0, -2.0])
    saved = {"conj": z.conj(), "neg": torch._neg_view(x)}
    ckpt.save(tmp_path / "c", saved)
    loaded = ckpt.load(tmp_path / "c")
    assert torch.equal(loaded["conj"], torch.tensor([1 - 2j, 3 + 1j])) and torch.equal(loaded["neg"], -x)


def test_a_parameter_template_gives_a_parameter_and_one_requiring_grad_a_tensor_that_does(tmp_path):
    """(Every torch template gave a plain tensor without gradients: a module's attribute refused it, 'cannot
    assign torch.FloatTensor as parameter', and a loop's leaf tensors trained no more; torch.load keeps both.)"""
    torch = pytest.importorskip("torch")
    saved = torch.nn.Linear(3, 2)
    ckpt.save(tmp_path / "c", {"weight": saved.weight, "bias": saved.bias, "leaf": torch.ones(2), "plain": torch.ones(2)})
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    loaded = ckpt.load(tmp_path / "c", {"weight": model.weight, "bias": model.bias,
                                        "leaf": torch.zeros(2, requires_grad=True), "plain": torch.zeros(2)})
    assert [(type(v).__name__, v.requires_grad) for v in loaded.values()] == [
        ("Parameter", True), ("Parameter", False), ("Tensor", True), ("Tensor", False)]
    model.weight, model.bias = loaded["weight"], loaded["bias"]
    model(torch.ones(1, 3)).sum().backward()
    assert torch.equal(model.weight.grad, torch.ones(2, 3)) and torch.equal(model.bias, saved.bias)


def test_an_array_whose_last_chunk_is_partial_round_trips(tmp_path):
    # 5000 rows of 4 KiB: the last 16 MiB chunk holds fewer rows, and zarr3 stores it padded to full size.
    a = np.random.default_rng(0).random((5000, 1024), dtype=np.float32)
    ckpt.save(tmp_path / "c", {"a": a})
    np.testing.assert_array_equal(ckpt.load(tmp_path / "c")["a"], a)


def test_an_ordered_dict_such_as_a_torch_state_dict_round_trips_as_an_ordered_dict(tmp_path):
    import collections

    state = collections.OrderedDict([("b", np.ones(2)), ("a", collections.OrderedDict([("x", 1)]))])
    ckpt.save(tmp_path / "c", state)
    plain = ckpt.load(tmp_path / "c")
    assert list(plain) == ["b", "a"] and plain["a"] == {"x": 1}
    np.testing.assert_array_equal(plain["b"], np.ones(2))
    restored = ckpt.load(tmp_path / "c", state)
    assert type(restored) is collections.OrderedDict and list(restored) == ["b", "a"]
    assert type(restored["a"]) is collections.OrderedDict


def test_a_multistep_schedulers_state_dict_whose_milestones_are_a_counter_round_trips(tmp_path):
    torch = pytest.importorskip("torch")
    import collections

    def scheduler():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4, 4], gamma=0.5)

    optimizer, saved = scheduler()
    for _ in range(3):
        optimizer.step()
        saved.step()
    ckpt.save(tmp_path / "c", {"scheduler": saved.state_dict()})
    assert ckpt.load(tmp_path / "c")["scheduler"]["milestones"] == {2: 1, 4: 2}
    _, fresh = scheduler()
    restored = ckpt.load(tmp_path / "c", {"scheduler": fresh.state_dict()})["scheduler"]
    assert type(restored["milestones"]) is collections.Counter and restored == saved.state_dict()
    fresh.load_state_dict(restored)
    assert fresh.last_epoch == 3 and sorted(fresh.milestones.elements()) == [2, 4, 4]


def test_loaded_arrays_start_at_64_byte_boundaries_and_restore_into_jax_arrays(tmp_path):
    state = {"big": np.arange(600_000, dtype=np.float32), **{f"s{i}": np.arange(i + 1, dtype=np.int16) for i in range(5)}}
    ckpt.save(tmp_path / "0", state)
    loaded = ckpt.load(tmp_path / "0")
    assert all(array.ctypes.data % 64 == 0 for array in loaded.values())
    jax = pytest.importorskip("jax")
    as_jax = ckpt.load(tmp_path / "0", abstract_state={k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in state.items()})
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(as_jax[name]), value, err_msg=name)
