"""tracejit.tree: pytree helpers with the flattening order of compiled functions, on numpy arrays
and on tracers inside a trace."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tracejit
from helpers import use_backend
from tracejit import tree


def example():
    # keys deliberately not sorted: the order is insertion order, as for compiled arguments
    return {"z": np.arange(3.0), "a": [np.ones((2, 2), np.float32), 4, (np.zeros(1),)],
            "m": {"y": np.array(2.0), "b": None}}


def test_leaves_and_structure_follow_insertion_order():
    t = example()
    leaves = tree.leaves(t)
    assert [x.shape for x in leaves] == [(3,), (2, 2), (1,), ()]
    assert all(x is y for x, y in zip(leaves, [t["z"], t["a"][0], t["a"][2][0], t["m"]["y"]]))
    s = tree.structure(t)
    assert s.num_leaves == 4
    assert repr(s) == "Structure({'z': *, 'a': [*, 4, (*,)], 'm': {'y': *, 'b': None}})"
    back = tree.unflatten(s, leaves)
    assert list(back) == ["z", "a", "m"] and back["a"][1] == 4 and isinstance(back["a"][2], tuple)
    assert tree.structure(back) == s and hash(tree.structure(back)) == hash(s)
    assert tree.structure({"a": 1, "z": np.ones(1)}) != tree.structure({"z": np.ones(1), "a": 1})
    assert tree.structure([np.ones(1), 4]) != tree.structure([np.ones(1), 5])


def test_order_is_the_order_of_compiled_parameters():
    """A traced function sees the leaves as its parameters in tree.leaves order."""
    t = example()
    f = tracejit.jit(lambda t: tree.leaves(t))
    out = f(t)
    for got, want in zip(out, tree.leaves(t)):
        np.testing.assert_array_equal(got, want)
    header = f.ir(t).splitlines()[0]
    names = re.findall(r"%([\w.]+):", header)
    assert names == ["t.z", "t.a.0", "t.a.2.0", "t.m.y"]


def test_map_add_scale_zeros_like_on_numpy():
    t = example()
    doubled = tree.map(lambda x: 2 * x, t)
    assert doubled["a"][1] == 4 and doubled["m"]["b"] is None  # static values kept
    assert isinstance(doubled["m"]["y"], np.ndarray)  # not the numpy scalar 2 * x returns
    np.testing.assert_array_equal(doubled["z"], 2 * t["z"])
    s = tree.add(t, doubled)
    np.testing.assert_array_equal(s["a"][0], 3 * t["a"][0])
    assert s["a"][0].dtype == np.float32
    np.testing.assert_array_equal(tree.scale(t, 0.5)["m"]["y"], 1.0)
    pair = tree.map(lambda x, y, z: x + y - z, t, doubled, t)
    np.testing.assert_array_equal(pair["z"], doubled["z"])
    fortran = {"w": np.asfortranarray(np.ones((3, 2), np.float32))}
    fortran["w"].setflags(write=False)
    z = tree.zeros_like(fortran)["w"]
    assert z.dtype == np.float32 and z.shape == (3, 2) and not z.any()
    assert z.flags.c_contiguous and z.flags.writeable


@pytest.mark.parametrize("backend", ["interpreter", "llvm"])
def test_helpers_inside_a_trace(backend):
    t = {"w": np.arange(6.0).reshape(2, 3), "b": [np.ones(3, np.float32)]}

    def f(t, s):
        z = tree.zeros_like(t)
        assert isinstance(z["w"], tracejit.Tracer) and z["b"][0].dtype == np.float32
        moved = tree.add(tree.scale(t, s), z)
        return tree.unflatten(tree.structure(t), [x + 1 for x in tree.leaves(moved)])

    with use_backend(backend):
        out = tracejit.jit(f)(t, np.array(3.0, np.float32))
    np.testing.assert_array_equal(out["w"], 3 * t["w"] + 1)
    np.testing.assert_array_equal(out["b"][0], np.full(3, 4.0, np.float32))
    assert out["b"][0].dtype == np.float32


def test_structure_mismatch_names_the_first_difference():
    a = {"w": np.ones(2), "b": [np.ones(1), np.ones(1)]}
    with pytest.raises(ValueError, match=re.escape(
            "tree.add: b does not have the structure of a: a['b'] is a list of 2 but b['b'] is "
            "a list of 1")):
        tree.add(a, {"w": np.ones(2), "b": [np.ones(1)]})
    with pytest.raises(ValueError, match="the same keys in another order"):
        tree.map(lambda x, y: x, a, {"b": [np.ones(1), np.ones(1)], "w": np.ones(2)})
    with pytest.raises(ValueError, match=re.escape(
            "rest[0]['w'] is the static value 3")):
        tree.map(lambda x, y: x, a, {"w": 3, "b": [np.ones(1), np.ones(1)]})


def test_unflatten_checks_its_arguments():
    s = tree.structure([np.ones(1), np.ones(1)])
    with pytest.raises(ValueError, match="has 2 leaves, got 3"):
        tree.unflatten(s, [1, 2, 3])
    with pytest.raises(TypeError, match="structure must be a tracejit.tree.Structure"):
        tree.unflatten([np.ones(1)], [1])


def test_treedef_compares_by_structure_and_static_values_with_their_types():
    """The compile key holds TreeDefs: equal nests are equal and hash alike; a static value of
    another type (1 vs 1.0, True vs 1), other keys or another container kind differ."""
    from tracejit import pytree
    a = np.zeros(2)

    def tdef(o):
        return pytree.flatten(o, "x", "x")[1]

    d1, d2 = tdef({"w": a, "n": (1, [a])}), tdef({"w": a + 1, "n": (1, [a])})
    assert d1 == d2 and hash(d1) == hash(d2) and d1.num_leaves == 2
    for other in ({"w": a, "n": (1.0, [a])}, {"w": a, "n": (True, [a])},
                  {"v": a, "n": (1, [a])}, {"w": a, "n": [1, [a]]}, {"w": a, "n": (1, (a,))}):
        assert tdef(other) != d1, other
    assert d1.array_paths("p") == ["p['w']", "p['n'][1][0]"]
    assert d1.describe() == "{'w': array, 'n': (1, [array])}"
    assert d1.unflatten(["A", "B"]) == {"w": "A", "n": (1, ["B"])}
    assert d1.has_static and not tdef([a, (a,)]).has_static


def test_structures_survive_pickle_and_copy():
    """Ray sends structures to its workers by pickle; copy.deepcopy goes the same way."""
    import copy
    import pickle
    tree = {"w": np.ones((2, 3)), "b": [np.zeros(3), 2, "static"], "t": (np.ones(1),)}
    s = tracejit.tree.structure(tree)
    for again in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert again == s
        back = tracejit.tree.unflatten(again, tracejit.tree.leaves(tree))
        assert back["b"][1:] == [2, "static"] and back["w"].shape == (2, 3)
