"""How the kernels of a function are spread over the modules that two processes compile at once:
the entry's process also builds the thread pool on a process's first compile, so it takes less
kernel work; kernels equal to another are left out of the balance (they are not compiled)."""
from types import SimpleNamespace

from tracejit.codegen import runtime


def _loops(n):
    """Stand-ins for fused loops of compile weight 1 (what `_balance` reads)."""
    return [SimpleNamespace(index=k, kind="loop", members=[]) for k in range(n)]


def _weights(groups, home):
    load = [0, 0]
    for g in groups:
        load[home[g.index]] += runtime._compile_weight(g)
    return load


def test_the_entrys_process_takes_less_work_while_it_builds_the_pool():
    groups = _loops(40)
    plain = _weights(groups, runtime._balance(groups, 2))
    with_pool = _weights(groups, runtime._balance(groups, 2, entry_extra=runtime.POOL_WEIGHT))
    assert with_pool[0] < plain[0], (plain, with_pool)
    assert sum(with_pool) == sum(plain) == 40


def test_kernels_equal_to_another_live_with_it_and_weigh_nothing():
    groups = _loops(12)
    same = {k: 0 for k in range(6, 12)}   # the second half calls kernel 0
    home = runtime._balance(groups, 2, same)
    assert all(home[k] == home[0] for k in same)
    distinct = [g for g in groups if g.index not in same]
    load = _weights(distinct, home)
    assert abs(load[0] + len(groups) // 8 - load[1]) <= 1, load


def test_kernels_sharing_a_function_weigh_it_once(monkeypatch):
    """Nine small kernels around one shared tile function (LeNet-5's matmuls) beside 24 loops:
    the modules' real loads (own code, each shared function once per module) end up even."""
    matmul = SimpleNamespace(prim=SimpleNamespace(name="matmul"))
    kernels = [SimpleNamespace(index=k, kind="nn", members=[], root=matmul) for k in range(9)]
    groups = kernels + [SimpleNamespace(index=k, kind="loop", members=[]) for k in range(9, 33)]
    monkeypatch.setattr(runtime, "_compile_weight", lambda g: 2 if g.kind == "nn" else 1)
    monkeypatch.setattr(runtime, "_shared_weights",
                        lambda g: {"tile": 20} if g.kind == "nn" else {}, raising=False)
    home = runtime._balance(groups, 2)
    load = [len(groups) // 8, 0]
    for k in (0, 1):
        mine = [g for g in groups if home[g.index] == k]
        load[k] += sum(runtime._compile_weight(g) for g in mine) + \
            (20 if any(g.kind == "nn" for g in mine) else 0)
    assert abs(load[0] - load[1]) <= 2, load
