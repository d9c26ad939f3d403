"""tracejit's thread pool (codegen/threadpool.py): the kernels split into chunks give the results of
one thread bit for bit at any thread count (more threads than cores included), the pool's contract
holds when driven directly, a forked child gets a working pool of its own, and Python threads
calling parallel code at once neither corrupt nor wait on each other."""
from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import tracejit
from tracejit import nn
from tracejit.codegen import parallel, threadpool
from helpers import use_backend

pytestmark = pytest.mark.needs_llvm

THREADS = 8   # compiled for more threads than this machine's cores
CHUNK_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
PARALLEL_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64)


def net_loss(w1, w2, v, x, key):
    """Two convolutions (forward, input and weight gradients), max pooling, matmuls, random
    numbers and fused reductions above the parallel threshold."""
    y = nn.max_pool2d(nn.relu(nn.conv2d(x, w1, padding=2)), 2)
    y = nn.avg_pool2d(tracejit.tanh(nn.conv2d(y, w2, padding=1)), 2)
    h = nn.linear(y.reshape(32, -1), v)
    noise = tracejit.random.normal(key, (256, 512))
    return (h * h).sum() + (noise * w1.sum()).sum()


def build_net():
    """The jitted gradient of net_loss and its inputs."""
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((8, 3, 5, 5), np.float32) * 0.2,
            rng.standard_normal((16, 8, 3, 3), np.float32) * 0.2,
            rng.standard_normal((128, 2304), np.float32) * 0.03,
            rng.standard_normal((32, 3, 48, 48), np.float32),
            tracejit.random.key(3))
    return tracejit.jit_value_and_grad(net_loss, argnums=(0, 1, 2)), args


@pytest.fixture(scope="module")
def net():
    """(gradient function, inputs, its result on one thread, native code), compiled for THREADS
    threads (and stored in the test run's compile cache)."""
    old = os.environ.get("TRACEJIT_NUM_THREADS")
    os.environ["TRACEJIT_NUM_THREADS"] = str(THREADS)
    try:
        with use_backend("llvm"):
            g, args = build_net()
            tracejit.set_num_threads(1)
            try:
                expected = g(*args)
            finally:
                tracejit.set_num_threads(None)
            [entry] = g._cache.values()
            native = entry.native()
            yield g, args, expected, native
    finally:
        if old is None:
            os.environ.pop("TRACEJIT_NUM_THREADS", None)
        else:
            os.environ["TRACEJIT_NUM_THREADS"] = old


def assert_same(got, expected, what=""):
    value, grads = got
    np.testing.assert_array_equal(value, expected[0], err_msg=what)
    for a, b in zip(grads, expected[1]):
        np.testing.assert_array_equal(a, b, err_msg=what)


def test_every_thread_count_gives_the_one_thread_result_bit_for_bit(net):
    g, args, expected, native = net
    assert threadpool.available() and native.max_threads == THREADS
    splits = {g.root.prim.name for g in native.plan.groups
              if g.cost_ns >= parallel.PARALLEL_MIN_NS}
    assert {"conv2d", "conv2d_input_grad", "conv2d_weight_grad", "matmul", "max_pool2d",
            "max_pool2d_grad"} <= splits, splits
    assert 'call void @"tj_parallel"' in native.llvm_ir_unoptimized
    with use_backend("llvm"):
        for n in (2, 3, 4, THREADS):   # THREADS: more threads than cores
            tracejit.set_num_threads(n)
            try:
                for _ in range(2):
                    assert_same(g(*args), expected, f"{n} threads")
            finally:
                tracejit.set_num_threads(None)
    assert threadpool.workers_started() == THREADS - 1


def test_two_python_threads_calling_at_once_get_correct_results(net):
    g, args, expected, _ = net
    errors = []

    def work():
        try:
            with use_backend("llvm"):
                for _ in range(12):
                    assert_same(g(*args), expected)
        except Exception as e:   # reported below: an assertion in a thread fails nothing
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call did not return"
    assert not errors, errors[0]


def wait_child(pid, read_end, seconds=60):
    """The child's report (bytes) and exit status; kills it and fails after `seconds`."""
    ready, _, _ = select.select([read_end], [], [], seconds)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not answer: deadlocked")
    data = os.read(read_end, 1000)
    os.close(read_end)
    return data, os.waitpid(pid, 0)[1]


def fork_and_call(g, args, expected):
    """Fork; the child calls g on all threads and reports 'ok <workers started>'."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: no Python cleanup, never back into pytest
        code = 1
        try:
            os.close(r)
            with use_backend("llvm"):
                for _ in range(3):
                    assert_same(g(*args), expected)
            os.write(w, f"ok {threadpool.workers_started()}".encode())
            code = 0
        except BaseException as e:
            os.write(w, f"error {e!r}".encode()[:900])
        finally:
            os._exit(code)
    os.close(w)
    return wait_child(pid, r)


def test_a_forked_child_starts_a_pool_of_its_own(net):
    g, args, expected, _ = net
    with use_backend("llvm"):
        g(*args)   # this process's workers exist (and do not in the child)
    data, status = fork_and_call(g, args, expected)
    assert status == 0 and data == f"ok {THREADS - 1}".encode(), data


def test_a_child_forked_while_the_pool_is_busy_takes_it_over(net):
    """The parent's pool is locked by a thread (which the child does not have) at the fork."""
    g, args, expected, _ = net
    inside, release = threading.Event(), threading.Event()

    @CHUNK_FN
    def blocking_chunk(ctx, chunk, nchunks, slot):
        inside.set()
        release.wait(60)
    run = PARALLEL_FN(threadpool._build().address)
    holder = threading.Thread(target=run, args=(ctypes.cast(blocking_chunk, ctypes.c_void_p),
                                                None, 2, 2))
    holder.start()
    try:
        assert inside.wait(60)
        data, status = fork_and_call(g, args, expected)
    finally:
        release.set()
        holder.join(60)
    assert status == 0 and data.startswith(b"ok"), data


def test_the_pool_runs_each_chunk_once_on_distinct_slots():
    """Driven directly: every chunk once, min(max_chunks, 4 * nthreads) of them, slots below
    nthreads and never shared by two chunks running at the same time; the caller's chunks are a
    prefix of the range (the same rows every call on an idle machine), the workers' the rest."""
    run = PARALLEL_FN(threadpool._build().address)
    lock = threading.Lock()
    for nthreads, max_chunks in ((2, 100), (3, 5), (8, 1000)):
        seen, running = [], set()
        overlap = []

        @CHUNK_FN
        def chunk(ctx, c, n, slot):
            with lock:
                overlap.append(slot in running)
                running.add(slot)
                seen.append((c, n, slot))
            time.sleep(0.0005)
            with lock:
                running.discard(slot)
        run(ctypes.cast(chunk, ctypes.c_void_p), None, nthreads, max_chunks)
        n = min(max_chunks, threadpool.CHUNKS_PER_THREAD * nthreads)
        assert sorted(c for c, _, _ in seen) == list(range(n))
        assert {k for _, k, _ in seen} == {n}
        assert all(0 <= s < nthreads for _, _, s in seen) and not any(overlap)
        # the caller (slot 0) claims from the bottom, the workers from the top: the caller's
        # chunks are the first ones, in order, whoever ran how many
        mine = [c for c, _, s in seen if s == 0]
        assert mine == list(range(len(mine))), seen
        assert sorted(c for c, _, s in seen if s != 0) == list(range(len(mine), n)), seen


def test_a_call_that_finds_the_pool_busy_runs_alone_without_waiting():
    """A second Python thread entering while the pool runs a job does its whole range itself
    (one chunk of one) instead of waiting for the first job to end."""
    run = PARALLEL_FN(threadpool._build().address)
    inside, second_done = threading.Event(), threading.Event()
    calls = []

    @CHUNK_FN
    def first(ctx, c, n, slot):
        inside.set()
        second_done.wait(60)   # the first job cannot end before the second call has

    @CHUNK_FN
    def second(ctx, c, n, slot):
        calls.append((c, n, slot))
    holder = threading.Thread(target=run, args=(ctypes.cast(first, ctypes.c_void_p), None, 2, 8))
    holder.start()
    try:
        assert inside.wait(60)
        run(ctypes.cast(second, ctypes.c_void_p), None, 2, 8)
        assert calls == [(0, 1, 0)]
    finally:
        second_done.set()
        holder.join(60)
    assert not holder.is_alive()


def test_code_from_the_compile_cache_finds_the_pool(net, tmp_path):
    """A fresh process links the cached object code, which calls the pool's entry by name."""
    _, _, expected, _ = net
    out = tmp_path / "result.npz"
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import numpy as np, tracejit, test_threadpool as t\n"
        "from tracejit.codegen import threadpool\n"
        "g, args = t.build_net()\n"
        "value, grads = g(*args)\n"
        "assert g.compile_stats()['cache_hits'] == 1, g.compile_stats()\n"
        "assert threadpool.workers_started() > 0\n"
        f"np.savez({str(out)!r}, value, *grads)\n")
    env = dict(os.environ, TRACEJIT_NUM_THREADS=str(THREADS), TRACEJIT_BACKEND="llvm")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    assert_same((got["arr_0"], [got[f"arr_{k}"] for k in range(1, 4)]), expected)
