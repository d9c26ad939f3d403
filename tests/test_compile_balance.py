"""How the kernels of a function are spread over the modules that two processes take from a queue
(runtime._modules): the entry first, then the loop-nest kernels' modules, balanced and compiled
with the kernels' pipeline, then the fused loops a few to a module, the heaviest first; kernels
equal to another are left out (they are not compiled); kernels sharing generic functions stay
together."""
from types import SimpleNamespace

from tracejit.codegen import runtime


def _loops(n, start=0, members=0):
    """Stand-ins for fused loops (what `_modules` reads)."""
    return [SimpleNamespace(index=k, kind="loop", members=[None] * members)
            for k in range(start, start + n)]


def _kernels(n, start=0):
    """Stand-ins for loop-nest kernels of one primitive that share no functions."""
    from tracejit.ir.prims.nn import conv2d_p
    return [SimpleNamespace(index=k, kind="nn", root=SimpleNamespace(prim=conv2d_p))
            for k in range(start, start + n)]


def _loads(groups, home, n):
    load = [0] * n
    for g in groups:
        load[home[g.index]] += runtime._compile_weight(g)
    return load


def test_kernels_first_balanced_then_fused_loops_heaviest_first(monkeypatch):
    # three primitives' kernels in units of different weights, beside fused loops
    monkeypatch.setattr(runtime, "_sharing_unit", lambda g: g.index % 3)
    kernels = _kernels(9)
    loops = _loops(20, start=9) + _loops(4, start=29, members=24)
    groups = kernels + loops
    home, pipelines = runtime._modules(groups, processes=2)
    n = len(pipelines)
    assert pipelines[:3] == ["entry", "kernels", "kernels"] and set(pipelines[3:]) == {"fused"}
    assert all(home[g.index] in (1, 2) for g in kernels), home
    assert all(home[g.index] >= 3 for g in loops), home
    load = _loads(groups, home, n)
    assert load[0] == 0   # the entry's module: only the entry
    fillers = load[3:]
    assert fillers == sorted(fillers, reverse=True), fillers
    assert all(w >= runtime.FILLER_WEIGHT for w in fillers[:-1]), fillers
    # the heavy loops (24 instructions) come first, in the first filler modules
    assert {home[g.index] for g in loops[-4:]} <= {3, 4}, home
    # (each unit whole: 3 units of weight 36 over two modules)
    assert sorted(load[1:3]) == [36, 72], load


def test_kernels_equal_to_another_live_with_it_and_weigh_nothing():
    groups = _loops(12)
    same = {k: 0 for k in range(6, 12)}   # the second half calls kernel 0
    home, pipelines = runtime._modules(groups, same, processes=2)
    assert all(home[k] == home[0] for k in same)
    distinct = [g for g in groups if g.index not in same]
    assert sum(_loads(distinct, home, len(pipelines))) == 6 * runtime._compile_weight(groups[0])
    per_module = -(-runtime.FILLER_WEIGHT // runtime._compile_weight(groups[0]))
    assert len(pipelines) == 1 + -(-6 // per_module)


def test_one_process_still_keeps_the_kernels_apart_for_their_pipeline():
    groups = _kernels(3) + _loops(5, start=3)
    home, pipelines = runtime._modules(groups, {2: 0}, processes=1)
    assert pipelines == ["fused", "kernels"]
    assert [home[k] for k in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    home, pipelines = runtime._modules(_loops(5), processes=1)
    assert pipelines == ["fused"] and set(home.values()) == {0}


def test_kernels_sharing_a_function_stay_in_one_module(monkeypatch):
    """Nine small kernels around one shared tile function (LeNet-5's matmuls) beside five
    convolutions: the matmuls all go into one module, weighing the tile once."""
    from tracejit.ir.prims.linalg import matmul_p
    matmuls = [SimpleNamespace(index=k, kind="nn", root=SimpleNamespace(prim=matmul_p))
               for k in range(9)]
    monkeypatch.setattr(runtime, "_shared_weights",
                        lambda g: {"tile": 20} if g.root.prim is matmul_p else {})
    monkeypatch.setattr(runtime, "_sharing_unit", lambda g: (g.root.prim.name, g.index >= 9))
    groups = matmuls + _kernels(5, start=9)
    home, pipelines = runtime._modules(groups, processes=2)
    assert len({home[g.index] for g in matmuls}) == 1, home
    assert pipelines == ["entry", "kernels", "kernels"]
    assert runtime._total_weight(matmuls) == 9 * runtime._compile_weight(matmuls[0]) + 20


def test_an_entry_running_a_loop_is_optimized_as_usual():
    """The entry's module gets the fast code generator only when the entry is straight-line
    calls: a native loop (a control group) runs in it."""
    loop = SimpleNamespace(index=3, kind="control", bodies={})
    home, pipelines = runtime._modules(_kernels(3) + [loop], processes=2)
    assert pipelines[0] == "fused" and home[3] == 0
    home, pipelines = runtime._modules(_kernels(3), processes=2)
    assert pipelines[0] == "entry"


def test_a_unit_the_fused_loops_even_out_stays_whole(monkeypatch):
    """LeNet-5's convolutions (5 kernels sharing the padding and weight-copy functions) weigh a
    little more than half of the loop-nest kernels: split, both modules compiled the shared
    functions. The fused loops, which either process takes from the queue, count in a
    process's share: the unit stays in one module."""
    monkeypatch.setattr(runtime, "_sharing_unit", lambda g: g.index < 5)
    convs, others = _kernels(5), _kernels(4, start=5)   # units of weight 60 and 48
    home, _ = runtime._modules(convs + others, processes=2)
    assert len({home[g.index] for g in convs}) == 2, home   # (60 > (60 + 48) / 2: split)
    loops = _loops(6, start=9)   # 6 x 2: the share is (60 + 48 + 12) / 2 = 60
    home, pipelines = runtime._modules(convs + others + loops, processes=2)
    assert len({home[g.index] for g in convs}) == 1, home
    assert pipelines[:3] == ["entry", "kernels", "kernels"]
    assert {home[g.index] for g in others} == {3 - home[0]}, home
