"""tracejit.distributed.DataParallel on a local Ray (one per module, 2 CPUs): its steps equal the
single-process jit_train_step on the whole batch, it survives workers killed before and during a
step, it fails cleanly (naming the worker, writing nothing) when a worker keeps dying or the loss
raises, and a checkpointed run restored in a new Ray session continues the same trajectory.

Ray is in the test extra: without it these tests fail at import, they are never skipped.
Most tests use one-hot float labels; one passes traced int64 class labels."""
from __future__ import annotations

import glob
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import ray

import tracejit
from helpers import rng_for
from tracejit import nn, optim
from tracejit.distributed import DataParallel, WorkerError, _Worker

TOL = 1e-10
N_CLASSES = 4
# seconds after which the hang test takes a worker for hung; a worker's first step (tracing and
# compiling the small MLP, mostly from the shared compile cache) takes well under a second idle,
# but several on a loaded machine (a full test run beside other processes: a healthy worker then
# passed 5 s and was replaced too)
HANG_TIMEOUT = 12


def mlp_loss(p, x, t):
    h = tracejit.tanh(x @ p["w1"] + p["b1"])
    return nn.cross_entropy(h @ p["w2"] + p["b2"], t)


def mlp_loss_aux(p, x, t):
    logits = tracejit.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return nn.cross_entropy(logits, t), {"logits": logits, "sq": tracejit.mean(logits * logits)}


def sleepy_loss(p, x, t):
    # the loss is traced on each worker's first step: sleeping here makes that step slow enough
    # to kill a worker in the middle of it (the kill comes 0.5 s into the step, and takes effect
    # up to seconds later on a loaded machine)
    time.sleep(4.0)
    return mlp_loss(p, x, t)


# A worker hangs while tracing hanging_loss (on its first step for a signature) when it can
# claim HANG_ONCE, by renaming it away (so exactly one worker hangs, and not its replacement),
# and every worker hangs while HANG_ALWAYS exists. Paths of this checkout: the workers are other
# processes, and another checkout's tests must not see them.
_FLAGS = os.path.join(tempfile.gettempdir(), "tracejit-dp-test-" +
                      hashlib.sha1(os.path.abspath(__file__).encode()).hexdigest()[:12])
HANG_ONCE, HANG_ALWAYS = _FLAGS + "-hang-once", _FLAGS + "-hang-always"
HANG_RING = _FLAGS + "-hang-ring"   # one worker hangs in the all-reduce


def hanging_loss(p, x, t):
    try:
        os.rename(HANG_ONCE, f"{HANG_ONCE}.{os.getpid()}")
        hang = True
    except FileNotFoundError:
        hang = os.path.exists(HANG_ALWAYS)
    if hang:
        time.sleep(120)   # killed long before
    return mlp_loss(p, x, t)


class RingHangWorker(_Worker):
    def reduce(self, *args):
        try:
            os.rename(HANG_RING, f"{HANG_RING}.{os.getpid()}")
            time.sleep(120)
        except FileNotFoundError:
            pass
        return super().reduce(*args)


def raising_loss(p, x, t):
    raise ValueError("labels out of range in this shard")


def params(seed=0):
    rng = rng_for("dp-params", seed)
    return {"w1": rng.normal(size=(6, 10)) * 0.5, "b1": np.zeros(10),
            "w2": rng.normal(size=(10, N_CLASSES)) * 0.5, "b2": np.zeros(N_CLASSES)}


def batches(n_steps, rows=8):
    rng = rng_for("dp-batches", rows)
    out = []
    for _ in range(n_steps):
        labels = rng.integers(0, N_CLASSES, size=rows)
        out.append((rng.normal(size=(rows, 6)), np.eye(N_CLASSES)[labels]))
    return out


OPTIMIZERS = {"sgd_momentum": lambda: optim.sgd(0.1, momentum=0.9),
              "adam": lambda: optim.adam(lr=0.05)}


def reference(opt, n_steps, loss=mlp_loss, data=None, has_aux=False):
    """Losses (with has_aux, (loss, aux) pairs), params and state of n_steps single-process train
    steps on the whole batches."""
    step = tracejit.jit_train_step(loss, opt, has_aux=has_aux)
    p = params()
    s = opt.init(p)
    values = []
    for x, t in data or batches(n_steps):
        value, p, s = step(p, s, x, t)
        values.append((float(value[0]), value[1]) if has_aux else float(value))
    return values, p, s


def assert_trees_close(a, b):
    for x, y in zip(tracejit.tree.leaves(a), tracejit.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=TOL, atol=TOL)
    assert tracejit.tree.structure(a) == tracejit.tree.structure(b)


def kill_and_wait(actor, seconds=60.0):
    """ray.kill(actor), returning once the actor is gone: ray.kill only asks for it, and on a
    loaded machine the actor went on answering calls for seconds (a step meant to find it dead
    then succeeded with it)."""
    ray.kill(actor)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the actor was still alive {seconds:g} s after ray.kill")


def init_ray():
    # Ray pickles the losses below by reference to this module, so the workers must be able to
    # import it, as a cluster's hosts must import the module of a user's loss
    path = os.pathsep.join(p for p in [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]
                           if p)
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def adam_dp(local_ray):
    """One 2-worker Adam run shared by the tests that do not need their own loss; its first
    step fixes the parameters' structure. Its workers hold both CPUs of the local Ray until the
    module ends, so the tests using it come after every test starting its own run."""
    dp = DataParallel(mlp_loss, optim.adam(lr=0.05), 2)
    p = params()
    dp.step(p, dp.optimizer.init(p), *batches(1)[0])
    yield dp
    dp.close()


def run(dp, n_steps, data=None):
    p = params()
    s = dp.optimizer.init(p)
    values = []
    for x, t in data or batches(n_steps):
        value, p2, s2 = dp.step(p, s, x, t)
        assert p2 is p and s2 is s   # updated in place, like jit_train_step
        values.append((float(value[0]), value[1]) if dp.has_aux else float(value))
    return values, p, s


def test_sgd_momentum_steps_equal_single_process_one_worker():
    with DataParallel(mlp_loss, OPTIMIZERS["sgd_momentum"](), 1) as dp:
        got = run(dp, 10)
        assert dp.steps == 10
    want = reference(OPTIMIZERS["sgd_momentum"](), 10)
    np.testing.assert_allclose(got[0], want[0], rtol=TOL)
    assert_trees_close(got[1], want[1])
    assert_trees_close(got[2], want[2])
    assert got[0][-1] < got[0][0]


def test_sgd_momentum_steps_with_aux_equal_single_process_two_workers():
    """The aux of each shard, stacked on a leading worker axis."""
    with DataParallel(mlp_loss_aux, OPTIMIZERS["sgd_momentum"](), 2, has_aux=True) as dp:
        got = run(dp, 10)
        assert dp.steps == 10
    want = reference(OPTIMIZERS["sgd_momentum"](), 10, loss=mlp_loss_aux, has_aux=True)
    np.testing.assert_allclose([v[0] for v in got[0]], [v[0] for v in want[0]], rtol=TOL)
    assert_trees_close(got[1], want[1])
    assert_trees_close(got[2], want[2])
    for (_, aux), (_, want_aux) in zip(got[0], want[0]):
        assert aux["logits"].shape == (2, 4, N_CLASSES)
        np.testing.assert_allclose(aux["logits"].reshape(8, N_CLASSES), want_aux["logits"],
                                   rtol=TOL, atol=TOL)
        assert aux["sq"].shape == (2,)
        np.testing.assert_allclose(aux["sq"].mean(), want_aux["sq"], rtol=TOL)


def test_adam_steps_equal_single_process_one_worker():
    with DataParallel(mlp_loss, OPTIMIZERS["adam"](), 1) as dp:
        got = run(dp, 10)
    want = reference(OPTIMIZERS["adam"](), 10)
    np.testing.assert_allclose(got[0], want[0], rtol=TOL)
    assert_trees_close(got[1], want[1])
    assert_trees_close(got[2], want[2])


def test_integer_labels_two_workers_equal_single_process():
    """Traced int64 class labels are split like any batch argument."""
    rng = rng_for("dp-int-labels")
    data = [(rng.normal(size=(8, 6)), rng.integers(0, N_CLASSES, size=8)) for _ in range(10)]
    with DataParallel(mlp_loss, OPTIMIZERS["sgd_momentum"](), 2) as dp:
        got = run(dp, 10, data)
    want = reference(OPTIMIZERS["sgd_momentum"](), 10, data=data)
    np.testing.assert_allclose(got[0], want[0], rtol=TOL)
    assert_trees_close(got[1], want[1])
    assert_trees_close(got[2], want[2])


def test_worker_killed_during_a_step_is_replaced():
    x, t = batches(1)[0]
    with DataParallel(sleepy_loss, OPTIMIZERS["sgd_momentum"](), 2) as dp:
        victim = dp.workers[0]
        killer = threading.Timer(0.5, kill_and_wait, args=(victim,))
        killer.start()
        p = params()
        loss_value, p, s = dp.step(p, dp.optimizer.init(p), x, t)
        killer.join()
        assert dp.workers[0] is not victim
    want_loss, want_p, want_s = reference(OPTIMIZERS["sgd_momentum"](), 1, data=[(x, t)])
    np.testing.assert_allclose(float(loss_value), want_loss[0], rtol=TOL)
    assert_trees_close(p, want_p)
    assert_trees_close(s, want_s)


def test_checkpoint_close_restore_continues_the_trajectory(tmp_path):
    data = batches(6)
    path = tmp_path / "run.npz"
    with DataParallel(mlp_loss, OPTIMIZERS["adam"](), 1) as dp:
        run(dp, 3, data=data[:3])
        dp.checkpoint(path)
    # the whole run is gone (its workers killed, its driver objects dropped); it continues on
    # another number of workers, which changes the result by rounding only
    del dp
    dp = DataParallel.restore(path, mlp_loss, OPTIMIZERS["adam"](), 2)
    with dp:
        assert dp.steps == 3
        losses = [float(dp.step(dp.params, dp.state, x, t)[0]) for x, t in data[3:]]
        assert dp.steps == 6
    want_losses, want_p, want_s = reference(OPTIMIZERS["adam"](), 6, data=data)
    np.testing.assert_allclose(losses, want_losses[3:], rtol=TOL)
    assert_trees_close(dp.params, want_p)
    assert_trees_close(dp.state, want_s)


def test_loss_raising_in_a_worker_reaches_the_driver_naming_the_worker():
    p = params()
    before = p["w1"].copy()
    with DataParallel(raising_loss, OPTIMIZERS["adam"](), 2) as dp:
        with pytest.raises(WorkerError, match=r"loss_fn raised on worker [01] of 2") as e:
            dp.step(p, dp.optimizer.init(p), *batches(1)[0])
    message = str(e.value)
    assert "ValueError: labels out of range in this shard" in message
    assert "raising_loss" in message   # the worker's traceback names the user's function
    assert isinstance(e.value.cause, ValueError)
    np.testing.assert_array_equal(p["w1"], before)


def test_hung_worker_is_killed_and_replaced_then_a_clear_error_when_it_keeps_hanging(
        monkeypatch):
    """A worker that neither answers nor dies within `timeout`, computing its gradient or in the
    all-reduce, is killed and its shard recomputed by a replacement; when every replacement hangs
    too, the step fails naming the worker and the timeout, and nothing is written."""
    def clear():   # the flags, and the names the hanging workers renamed them to
        for flag in glob.glob(glob.escape(_FLAGS) + "-hang-*"):
            os.remove(flag)

    def replaced(before):
        return sum(a is not b for a, b in zip(before, dp.workers))

    clear()
    monkeypatch.setattr(tracejit.distributed, "_Worker", RingHangWorker)
    data = batches(2)
    opt = OPTIMIZERS["sgd_momentum"]
    try:
        with DataParallel(hanging_loss, opt(), 2, timeout=HANG_TIMEOUT, max_retries=1) as dp:
            p = params()
            s = dp.optimizer.init(p)
            for k, flag in enumerate((HANG_ONCE, HANG_RING)):
                open(flag, "w").close()
                before = list(dp.workers)
                t0 = time.monotonic()
                dp.step(p, s, *data[k])
                assert time.monotonic() - t0 >= HANG_TIMEOUT
                assert not os.path.exists(flag)
                assert replaced(before) == 1
                _, want_p, want_s = reference(opt(), k + 1, data=data[:k + 1])
                assert_trees_close(p, want_p)
                assert_trees_close(s, want_s)

            # a new batch shape is traced again, now hanging every worker (so the timeout need
            # not leave time for a healthy worker's compile)
            open(HANG_ALWAYS, "w").close()
            dp.max_retries, dp.timeout = 0, 1
            before = tracejit.tree.map(np.copy, (p, s))
            x, t = data[0]
            with pytest.raises(WorkerError, match=r"worker [01] of 2 hung \(no gradient within "
                                                  r"timeout=\d+ s\); it failed 1 time in") as e:
                dp.step(p, s, x[:4], t[:4])
            assert isinstance(e.value.cause, TimeoutError)
            assert_trees_close((p, s), before)
    finally:
        clear()


def test_adam_steps_equal_single_process_two_workers(adam_dp):
    got = run(adam_dp, 10)
    want = reference(OPTIMIZERS["adam"](), 10)
    np.testing.assert_allclose(got[0], want[0], rtol=TOL)
    assert_trees_close(got[1], want[1])
    assert_trees_close(got[2], want[2])


def test_worker_killed_before_a_step_is_replaced(adam_dp):
    data = batches(4)
    p = params()
    s = adam_dp.optimizer.init(p)
    adam_dp.step(p, s, *data[0])
    dead = adam_dp.workers[1]
    kill_and_wait(dead)
    for x, t in data[1:]:
        adam_dp.step(p, s, x, t)
    assert adam_dp.workers[1] is not dead
    _, want_p, want_s = reference(OPTIMIZERS["adam"](), 4, data=data)
    assert_trees_close(p, want_p)
    assert_trees_close(s, want_s)


def test_worker_that_keeps_dying_fails_the_step_and_writes_nothing(adam_dp, monkeypatch):
    start = adam_dp._start_worker

    def start_and_kill(i):
        start(i)
        kill_and_wait(adam_dp.workers[i])

    p = params()
    s = adam_dp.optimizer.init(p)
    adam_dp.step(p, s, *batches(1)[0])
    p_before = {k: v.copy() for k, v in p.items()}
    s_before = tracejit.tree.map(np.copy, s)
    monkeypatch.setattr(adam_dp, "_start_worker", start_and_kill)
    kill_and_wait(adam_dp.workers[1])
    with pytest.raises(WorkerError, match=r"worker 1 of 2 died.*; it failed 4 times in this "
                                          r"step and was replaced 3 times.*ActorDiedError") as e:
        adam_dp.step(p, s, *batches(2)[1])
    assert e.value.worker == 1
    assert isinstance(e.value.cause, ray.exceptions.RayActorError)
    assert_trees_close(p, p_before)
    assert_trees_close(s, s_before)
    np.testing.assert_array_equal(p["w1"], p_before["w1"])
    # with the restart working again, the run goes on from the untouched values
    monkeypatch.undo()
    adam_dp.step(p, s, *batches(2)[1])
    assert not np.array_equal(p["w1"], p_before["w1"])


def test_uneven_batch_is_a_value_error_naming_the_sizes(adam_dp):
    p = params()
    x, t = batches(1, rows=7)[0]
    with pytest.raises(ValueError, match=r"batch\[0\] of shape \[7, 6\] has 7 rows on axis 0, "
                                         r"which does not split into 2 equal shards"):
        adam_dp.step(p, adam_dp.optimizer.init(p), x, t)


def test_params_of_another_structure_are_refused(adam_dp):
    p = params()
    s = adam_dp.optimizer.init(p)
    del p["b2"]
    with pytest.raises(ValueError, match=r"params do not match .*keys \['w1', 'b1', 'w2', 'b2'\]"):
        adam_dp.step(p, s, *batches(1)[0])
    p = params()
    p["w1"] = p["w1"][:3].copy()
    with pytest.raises(ValueError, match=r"params\['w1'\] is float64\[3, 10\], expected "
                                         r"float64\[6, 10\]"):
        adam_dp.step(p, adam_dp.optimizer.init(p), *batches(1)[0])

@pytest.mark.parametrize("kind, victim", [("ring", 1), ("tree", 0)])
def test_worker_dying_before_the_all_reduce_is_replaced_and_the_ring_rerun(adam_dp,
                                                                          monkeypatch, kind,
                                                                          victim):
    """A worker lost after computing its gradient, before the all-reduce (in the tree of two,
    the one that receives): its partner does not wait for it forever; it is replaced,
    recomputes its shard, and the all-reduce runs again."""
    monkeypatch.setattr(adam_dp, "allreduce", kind)
    data = batches(2)
    p = params()
    s = adam_dp.optimizer.init(p)
    adam_dp.step(p, s, *data[0])
    ring = adam_dp._allreduce
    victims = []

    def kill_then_ring(ray_, chunk_refs):
        if not victims:
            victims.append(adam_dp.workers[victim])
            kill_and_wait(victims[0])
        return ring(ray_, chunk_refs)

    monkeypatch.setattr(adam_dp, "_allreduce", kill_then_ring)
    adam_dp.step(p, s, *data[1])
    assert victims and adam_dp.workers[victim] is not victims[0]
    _, want_p, want_s = reference(OPTIMIZERS["adam"](), 2, data=data)
    assert_trees_close(p, want_p)
    assert_trees_close(s, want_s)


def test_parameters_are_sent_only_when_they_changed(adam_dp):
    """Sent as one contiguous buffer, once per version per worker; the driver receives the
    mean gradient once (the workers reduce among themselves)."""
    x, t = batches(1)[0]
    got_before = ray.get([w.received.remote() for w in adam_dp.workers])
    results = []
    versions = []
    for _ in range(2):
        p = params()   # equal values in new arrays: the workers hold them after the first call
        loss_value, p, s = adam_dp.step(p, adam_dp.optimizer.init(p), x, t)
        results.append((float(loss_value), p))
        versions.append(adam_dp._version)
    assert versions[1] == versions[0]
    assert results[0][0] == results[1][0]
    assert_trees_close(results[0][1], results[1][1])
    # the updated parameters are new values: sent once more
    adam_dp.step(p, s, x, t)
    assert adam_dp._version == versions[0] + 1
    assert adam_dp.last_step_bytes == {"params": adam_dp._layout.nbytes,
                                       "gradients": adam_dp._layout.nbytes}
    got = ray.get([w.received.remote() for w in adam_dp.workers])
    for (count_before, _), (count, last) in zip(got_before, got):
        # the first call may send the fixture's updated values; the second sends nothing
        assert 1 <= count - count_before <= 2
        assert last == ("uint8", (adam_dp._layout.nbytes,), True)
    adam_dp.step(p, s, x, t)
    assert [r[0] for r in ray.get([w.received.remote() for w in adam_dp.workers])] == \
        [r[0] + 1 for r in got]


def test_bad_timeout_and_allreduce_are_refused_before_starting_workers():
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds or "
                                         r"None, got 0"):
        DataParallel(mlp_loss, optim.adam(), 2, timeout=0)
    with pytest.raises(ValueError, match=r"allreduce must be one of \('ring', 'tree'\), got "
                                         r"'star'"):
        DataParallel(mlp_loss, optim.adam(), 2, allreduce="star")


def test_import_tracejit_does_not_import_ray():
    code = ("import sys, tracejit; assert 'ray' not in sys.modules; "
            "assert tracejit.distributed.DataParallel; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_packed_layout_keeps_each_dtype_and_sums_per_dtype():
    from tracejit.distributed import _Layout
    tree_a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.1, 0.2]),
              "s": np.float32(3.0) * np.ones((), np.float32)}
    tree_b = tracejit.tree.map(lambda x: x * 2 + 1, tree_a)
    layout = _Layout(tracejit.tree.structure(tree_a), tracejit.tree.leaves(tree_a))
    assert [d for d, _, _ in layout.segments] == [np.float32, np.float64]
    assert all(o % 64 == 0 for o in layout.offsets)
    acc = layout.pack(tracejit.tree.leaves(tree_a))
    layout.add_into(acc, layout.pack(tracejit.tree.leaves(tree_b)))
    layout.scale(acc, 0.5)
    got = layout.unflatten(acc)
    for k in tree_a:
        assert got[k].dtype == tree_a[k].dtype and got[k].shape == tree_a[k].shape
        np.testing.assert_array_equal(got[k], (tree_a[k] + tree_b[k]) * tree_a[k].dtype.type(0.5))


@pytest.mark.parametrize("kind", ["ring", "tree"])
def test_all_reduce_schedule_gives_the_mean_for_any_number_of_workers(kind):
    """The all-reduce's rounds and chunks, run in process: every chunk is summed over all
    workers once, mixed dtypes keep their own, and the finished pieces put together are the
    mean."""
    from tracejit.distributed import _Layout, _schedule
    rng = rng_for("dp-allreduce", kind)
    shapes = {"a": ((3, 7), np.float32), "b": ((5,), np.float64), "c": ((), np.float32),
              "d": ((40,), np.float64)}
    for n in range(1, 7):
        grads = [{k: rng.normal(size=s).astype(d) for k, (s, d) in shapes.items()}
                 for _ in range(n)]
        layout = _Layout(tracejit.tree.structure(grads[0]), tracejit.tree.leaves(grads[0]))
        workers = []
        for g in grads:
            w = object.__new__(_Worker)
            w._layout, w._chunks, w._token = layout, {}, 7
            w._grads = layout.pack(tracejit.tree.leaves(g))
            workers.append(w)
        n_chunks, first, rounds, finals = _schedule(kind, n)
        chunks = layout.chunks(n_chunks)
        latest = [layout.take(w._grads, chunks[first[i]]) for i, w in enumerate(workers)]
        for rnd in rounds:
            new = {j: workers[j].reduce(7, c, n_chunks, n if last else None, latest[src],
                                        latest[j] if own else None)
                   for j, src, c, own, last in rnd}
            latest = [new.get(j, x) for j, x in enumerate(latest)]
        assert sorted(c for _, c in finals) == list(range(n_chunks))
        mean = np.zeros(layout.nbytes, np.uint8)
        for j, c in finals:
            layout.put(mean, chunks[c], latest[j])
        got = layout.unflatten(mean)
        for k, (_, d) in shapes.items():
            want = np.mean([g[k].astype(np.float64) for g in grads], axis=0)
            assert got[k].dtype == d
            tol = 1e-6 if d == np.float32 else 1e-13
            np.testing.assert_allclose(got[k], want, rtol=tol, atol=tol)
        # the chunks tile the buffer: each byte is reduced exactly once
        covered = sorted((a, b) for r in chunks for _, a, b in r if b > a)
        assert [a for a, _ in covered[1:]] == [b for _, b in covered[:-1]]
        assert covered[0][0] == 0 and covered[-1][1] == layout.nbytes
        assert len(rounds) == (n - 1 if kind == "ring" else math.ceil(math.log2(n)))
