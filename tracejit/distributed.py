"""Data-parallel training on a Ray cluster: one batch split over worker processes (and hosts).

    opt = tracejit.optim.adam(lr=1e-3)
    with tracejit.distributed.DataParallel(loss, opt, num_workers=4) as dp:
        params, state = init_params(), opt.init(init_params())
        for x, t in batches:
            l, params, state = dp.step(params, state, x, t)
        dp.checkpoint("run.npz")

How a step runs. The driver (the process calling `step`) holds the parameters and the optimizer
state; the workers are Ray actors, each holding a copy of the parameters and the compiled
`jit_value_and_grad(loss_fn)` of its shard's shapes (compiled on its first step; workers on one
host share tracejit's persistent compile cache). `step(params, state, *batch)`:
1. splits every batch array on axis 0 into `num_workers` equal shards;
2. if the parameters differ from those the workers hold, packs them into one contiguous buffer
   (`_Layout`), puts it into Ray's object store once and passes the reference to every worker
   (a version counter says which worker holds which version; unchanged parameters are not sent);
3. each worker returns its shard's loss and its gradients packed into one contiguous buffer;
4. the driver sums the buffers (a reduce through the object store: every worker's buffer travels
   to the driver once), divides by `num_workers` and applies `optimizer.update` compiled with
   `tracejit.jit`, then writes the new values into the arrays of `params` and `state`.
For a loss that is a mean over the batch's rows, the mean of the shards' gradients is the
gradient of the whole batch, so a step equals `jit_train_step(loss_fn, optimizer)` on the whole
batch to float rounding.

Faults. A worker that dies (killed process, lost node: Ray's actor-died, worker-crashed,
node-died and object-lost errors) is replaced by a new actor, which receives the parameters and
recomputes the shard; each worker may be replaced `max_retries` times in one step. A step that
cannot complete raises WorkerError naming the worker and the cause, after which `params` and
`state` are exactly as they were (nothing is written before every shard's gradient is in). An
exception raised by `loss_fn` in a worker is not retried: it is re-raised on the driver as a
WorkerError naming the worker, with the worker's traceback in its message and the original
exception as `.cause`.

Ray is imported on first use of this module's classes, so `import tracejit` does not need it
(`pip install 'tracejit[distributed]'`). Every host of the cluster must be able to import
tracejit and the module defining `loss_fn` (Ray pickles functions of importable modules by name).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from . import tree

__all__ = ["DataParallel", "WorkerError"]

_ALIGN = 64  # bytes; every leaf of a packed buffer starts on a cache line


class WorkerError(RuntimeError):
    """A step failed on a worker: `worker` is its index, `cause` the exception behind it (the
    loss's own exception, or Ray's error for a worker that kept dying)."""

    def __init__(self, message: str, worker: int, cause: BaseException | None):
        super().__init__(message)
        self.worker = worker
        self.cause = cause


class _Layout:
    """Where each leaf of a parameter tree lives in one contiguous byte buffer.

    Leaves are grouped by dtype into segments (in order of the dtype's first appearance), so that
    summing two buffers is one vectorized add per segment; inside a segment every leaf starts on
    a 64-byte boundary and the padding is zero (so it sums to zero). Picklable: the workers get it
    with the parameters and pack their gradients with it."""

    def __init__(self, structure: tree.Structure, leaves):
        self.structure = structure
        self.specs = [(tuple(x.shape), np.dtype(x.dtype)) for x in leaves]
        self.offsets = [0] * len(leaves)
        self.segments = []  # (dtype, start, stop) in bytes
        pos = 0
        for dtype in dict.fromkeys(d for _, d in self.specs):
            start = pos
            for i, (shape, d) in enumerate(self.specs):
                if d == dtype:
                    self.offsets[i] = pos
                    pos += -(-math.prod(shape) * d.itemsize // _ALIGN) * _ALIGN
            self.segments.append((dtype, start, pos))
        self.nbytes = pos

    def pack(self, leaves) -> np.ndarray:
        buf = np.zeros(self.nbytes, np.uint8)
        for view, x in zip(self.views(buf), leaves):
            view[...] = x
        return buf

    def views(self, buf: np.ndarray) -> list:
        """The leaves as views of `buf` (read-only if `buf` is)."""
        return [buf[o:o + math.prod(s) * d.itemsize].view(d).reshape(s)
                for o, (s, d) in zip(self.offsets, self.specs)]

    def unflatten(self, buf: np.ndarray):
        return tree.unflatten(self.structure, self.views(buf))

    def add_into(self, acc: np.ndarray, buf: np.ndarray) -> None:
        """acc += buf, elementwise in each segment's dtype."""
        for dtype, start, stop in self.segments:
            a = acc[start:stop].view(dtype)
            a += buf[start:stop].view(dtype)

    def scale(self, buf: np.ndarray, s: float) -> None:
        for dtype, start, stop in self.segments:
            a = buf[start:stop].view(dtype)
            a *= dtype.type(s)


class _Worker:
    """The body of a worker actor: the compiled gradient of `loss_fn` and the parameters of the
    latest version it was sent."""

    def __init__(self, loss_fn, has_aux: bool):
        from .api import jit_value_and_grad
        self._grad = jit_value_and_grad(loss_fn, has_aux=has_aux)
        self._has_aux = has_aux
        self._version = None
        self._layout = None
        self._params = None

    def ready(self):
        import ray
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def compute(self, version, layout, flat, *shard):
        """(loss, packed gradient, aux, seconds spent) of this worker's shard. `flat` is the packed
        parameters of `version` (resolved by Ray from the object store), or None when the driver
        knows this worker holds that version already."""
        if flat is not None:
            self._version, self._layout = version, layout
            self._params = layout.unflatten(flat)
        elif version != self._version:
            raise RuntimeError(f"internal error: the driver skipped sending parameters version "
                               f"{version}, but this worker holds version {self._version}")
        t0 = time.perf_counter()
        value, grads = self._grad(self._params, *shard)
        loss, aux = value if self._has_aux else (value, None)
        packed = self._layout.pack(tree.leaves(grads))
        return np.asarray(loss), packed, aux, time.perf_counter() - t0


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("tracejit.distributed needs Ray: pip install 'tracejit[distributed]' "
                          "(or pip install ray)") from e
    return ray


def _retryable_errors(ray):
    """Errors that mean the worker (or its node, or an object it held) is gone, not that the
    user's code failed: the shard is recomputed on a new worker."""
    ex = ray.exceptions
    names = ("RayActorError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


class DataParallel:
    """Data-parallel training of `loss_fn(params, *batch)` (a scalar, the mean over the batch's
    rows) with `optimizer` (a tracejit.optim optimizer) on `num_workers` Ray actors.

    `address`: the Ray cluster to join (as `ray.init(address=...)`); None joins the cluster this
    process is connected to (`ray.is_initialized()`) or the one named by RAY_ADDRESS, and else
    starts a local one, which `close()` shuts down again. `threads_per_worker`: TRACEJIT_NUM_THREADS
    of each worker; None gives each worker an equal share of its host's CPUs (the fewest CPUs of
    any host, divided by the workers per host when spread evenly), at least 1. `max_retries`: how
    often one step may replace each worker that died. `has_aux`: `loss_fn` returns (loss, aux);
    `step` then returns ((loss, aux), params, state) where every leaf of aux gets a leading axis
    of length num_workers, one entry per shard in batch order (for per-row aux,
    `a.reshape(-1, *a.shape[2:])` is the aux of the whole batch).

    Attributes: `params`, `state` (the latest step's results, or a checkpoint's values after
    `restore`), `steps` (steps done), `workers` (the actor handles), `last_step_times` (seconds of
    the last step: "total", "compute" (the slowest worker's gradient), "reduce", "update").
    """

    start_timeout = 120.0  # seconds for the workers to start (a full cluster never frees CPUs)

    def __init__(self, loss_fn, optimizer, num_workers: int = 2, *, has_aux: bool = False,
                 address=None, threads_per_worker=None, max_retries: int = 3):
        if not callable(loss_fn):
            raise TypeError(f"DataParallel: loss_fn must be callable, got "
                            f"{type(loss_fn).__name__}")
        if not callable(getattr(optimizer, "update", None)) or \
                not callable(getattr(optimizer, "init", None)):
            raise TypeError(f"DataParallel: optimizer must have init(params) and update(grads, "
                            f"state, params) methods (see tracejit.optim), got "
                            f"{type(optimizer).__name__}")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"DataParallel: num_workers must be a positive int, got "
                             f"{num_workers!r}")
        if threads_per_worker is not None and (not isinstance(threads_per_worker, int)
                                               or threads_per_worker < 1):
            raise ValueError(f"DataParallel: threads_per_worker must be a positive int or None, "
                             f"got {threads_per_worker!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"DataParallel: max_retries must be an int >= 0, got "
                             f"{max_retries!r}")
        ray = _ray()
        self.loss_fn, self.optimizer, self.has_aux = loss_fn, optimizer, has_aux
        self.num_workers, self.max_retries = num_workers, max_retries
        self.params = self.state = None
        self.steps = 0
        self.last_step_times = {}
        self._closed = False
        self._started_ray = False
        if not ray.is_initialized():
            if address is not None or os.environ.get("RAY_ADDRESS"):
                ray.init(address=address)
            else:
                ray.init(num_cpus=max(num_workers, os.cpu_count() or 1), include_dashboard=False)
            self._started_ray = True
        self.threads_per_worker = threads_per_worker or self._default_threads(ray)
        self._actor_class = ray.remote(_Worker)
        self._layout = None
        self._state_structure = None
        self._update = None
        self._flat = self._flat_ref = None  # the packed parameters last put, and their reference
        self._version = 0
        self._worker_version = [None] * num_workers
        self.workers = [None] * num_workers
        try:
            for i in range(num_workers):
                self._start_worker(i)
            # wait here, so that a worker that cannot start fails the constructor, not a step
            try:
                ray.get([w.ready.remote() for w in self.workers], timeout=self.start_timeout)
            except ray.exceptions.GetTimeoutError:
                free = ray.available_resources().get("CPU", 0)
                raise RuntimeError(
                    f"DataParallel: {num_workers} workers did not start within "
                    f"{self.start_timeout:g} s; each reserves 1 CPU of the Ray cluster and "
                    f"{free:g} are free now (another DataParallel still open?)") from None
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------
    def _default_threads(self, ray) -> int:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
        if not nodes:
            return 1
        per_host = -(-self.num_workers // len(nodes))
        return max(1, int(min(n["Resources"]["CPU"] for n in nodes)) // per_host)

    def _start_worker(self, i: int) -> None:
        """Start (or replace) worker `i`; it holds no parameters until its next shard."""
        actor = self._actor_class.options(
            num_cpus=1, max_restarts=0, scheduling_strategy="SPREAD",
            runtime_env={"env_vars": {"TRACEJIT_NUM_THREADS": str(self.threads_per_worker)}},
        ).remote(self.loss_fn, self.has_aux)
        self.workers[i] = actor
        self._worker_version[i] = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop the workers (and the local Ray this object started). Idempotent."""
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        if ray.is_initialized():
            for w in self.workers:
                if w is not None:
                    try:
                        ray.kill(w)
                    except Exception:  # noqa: BLE001  (already gone: nothing to stop)
                        pass
        self.workers = []
        self._flat_ref = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    # ------------------------------------------------------------------------------------------
    def step(self, params, state, *batch):
        """One training step on `batch` (see the module docstring): `(loss, params, state)`, the
        mean of the shards' losses and the same `params` and `state` objects with the new values
        written into their arrays (as jit_train_step does); with has_aux `((loss, aux), params,
        state)`. On any error nothing is written."""
        if self._closed:
            raise RuntimeError("DataParallel.step: this DataParallel is closed")
        ray = _ray()
        t_start = time.perf_counter()
        leaves = self._check_params(params, state)
        shards = self._split(batch)
        # one pass over the parameters decides whether the workers have them already: after an
        # optimizer step they differ, but evaluating or re-running from the same values does not
        # send them again (comparing costs far less than sending to every worker)
        if self._flat is None or not all(np.array_equal(a, b) for a, b in
                                         zip(self._layout.views(self._flat), leaves)):
            self._flat = self._layout.pack(leaves)
            self._flat_ref = ray.put(self._flat)
            self._version += 1
        results = self._run_shards(ray, shards)
        t_computed = time.perf_counter()

        acc = np.array(results[0][1])  # a writable copy of the first buffer
        for r in results[1:]:
            self._layout.add_into(acc, r[1])
        if self.num_workers > 1:
            self._layout.scale(acc, 1.0 / self.num_workers)
        grads = self._layout.unflatten(acc)
        t_reduced = time.perf_counter()

        if self._update is None:
            from .api import jit
            optimizer = self.optimizer

            def update(grads, state, params):
                return optimizer.update(grads, state, params)

            update.__name__ = update.__qualname__ = "DataParallel.update"
            self._update = jit(update)
        new_params, new_state = self._update(grads, state, params)
        loss = np.asarray(np.mean([r[0] for r in results]), results[0][0].dtype)
        # every value is computed: now write them (an error above leaves params and state as
        # they were)
        for dst, src in zip(tree.leaves((params, state)), tree.leaves((new_params, new_state))):
            np.copyto(dst, src)
        self.params, self.state = params, state
        self.steps += 1
        t_end = time.perf_counter()
        self.last_step_times = {"total": t_end - t_start,
                                "compute": max(r[3] for r in results),
                                "wait": t_computed - t_start,
                                "reduce": t_reduced - t_computed,
                                "update": t_end - t_reduced}
        if self.has_aux:
            aux = tree.map(lambda *xs: np.stack(xs), *[r[2] for r in results])
            return (loss, aux), params, state
        return loss, params, state

    def _check_params(self, params, state) -> list:
        """The leaves of `params` after checking them (and `state`'s structure) against the
        parameters of the first step; the first step fixes the layout."""
        from .train import _check_in_place
        paths, (leaves,), struct = tree.flatten_same([params], ["params"], "DataParallel.step")
        if self._layout is None:
            for p, x in zip(paths, leaves):
                if np.dtype(x.dtype).kind != "f":
                    raise TypeError(f"DataParallel.step: {p} is an array of dtype {x.dtype}; "
                                    f"parameters must be float arrays")
            self._layout = _Layout(struct, leaves)
            self._state_structure = tree.structure(self.optimizer.init(params))
        elif struct != self._layout.structure or \
                [(x.shape, x.dtype) for x in leaves] != self._layout.specs:
            expected = self._layout.unflatten(np.zeros(self._layout.nbytes, np.uint8))
            why = tree.difference(expected, params, "expected", "params") or \
                "the shapes or dtypes of its arrays differ: " + ", ".join(
                    f"{p} is {x.dtype}{list(x.shape)}, expected {d}{list(s)}"
                    for p, x, (s, d) in zip(paths, leaves, self._layout.specs)
                    if (tuple(x.shape), x.dtype) != (s, d))
            raise ValueError(f"DataParallel.step: params do not match the parameters of this "
                             f"run's first step: {why}")
        if tree.structure(state) != self._state_structure:
            expected = self.optimizer.init(params)
            raise ValueError(f"DataParallel.step: state does not have the structure of "
                             f"optimizer.init(params) for {self.optimizer!r}: "
                             f"{tree.difference(expected, state, 'expected', 'state')}")
        s_paths, (s_leaves,), _ = tree.flatten_same([state], ["state"], "DataParallel.step")
        _check_in_place("DataParallel.step", [(p, None, x) for p, x in
                                              zip(paths + s_paths, leaves + s_leaves)], [])
        return leaves

    def _split(self, batch) -> list:
        """[shard of worker i] of tuples of views of the batch arrays."""
        n = self.num_workers
        arrays = []
        for k, x in enumerate(batch):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"DataParallel.step: batch[{k}] must be a numpy array (it is "
                                f"split on axis 0 over the workers), got {type(x).__name__}")
            if x.ndim == 0 or x.shape[0] % n:
                rows = "a 0-d array" if x.ndim == 0 else f"{x.shape[0]} rows on axis 0"
                raise ValueError(f"DataParallel.step: batch[{k}] of shape {list(x.shape)} has "
                                 f"{rows}, which does not split into {n} equal shards "
                                 f"(num_workers={n}); use a batch size that is a multiple of {n}")
            arrays.append(np.split(x, n, axis=0))
        return [tuple(a[i] for a in arrays) for i in range(n)]

    def _submit(self, i: int, shard):
        fresh = self._worker_version[i] != self._version
        ref = self.workers[i].compute.remote(self._version, self._layout if fresh else None,
                                             self._flat_ref if fresh else None, *shard)
        self._worker_version[i] = self._version
        return ref

    def _run_shards(self, ray, shards) -> list:
        """Every shard's worker result, replacing workers that die; WorkerError if a worker's
        loss raised or it died more than max_retries times."""
        retryable = _retryable_errors(ray)
        pending = {self._submit(i, s): i for i, s in enumerate(shards)}
        restarts = [0] * self.num_workers
        results = [None] * self.num_workers
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except retryable as e:
                if restarts[i] >= self.max_retries:
                    raise WorkerError(
                        f"DataParallel.step: worker {i} of {self.num_workers} died "
                        f"{restarts[i] + 1} times in this step and was replaced "
                        f"{restarts[i]} times (max_retries={self.max_retries}); the step is "
                        f"abandoned and params and state are unchanged. Last cause: "
                        f"{type(e).__name__}: {e}", i, e) from e
                restarts[i] += 1
                self._start_worker(i)
                pending[self._submit(i, shards[i])] = i
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                what = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
                raise WorkerError(
                    f"DataParallel.step: loss_fn raised on worker {i} of {self.num_workers} "
                    f"(shard {i} of the batch): {what}\nThe worker's traceback:\n{e}", i,
                    cause if cause is not None else e) from e
        return results

    # ------------------------------------------------------------------------------------------
    def checkpoint(self, path) -> None:
        """Write params, optimizer state and the step count to `path` atomically (tracejit.save:
        a crash mid-write leaves the previous checkpoint intact)."""
        if self.params is None:
            raise ValueError("DataParallel.checkpoint: nothing to save before the first step "
                             "(or restore)")
        from .io import save
        save(path, {"format": "tracejit.distributed.DataParallel", "steps": self.steps,
                    "params": self.params, "state": self.state})

    @classmethod
    def restore(cls, path, loss_fn, optimizer, num_workers: int = 2, **kwargs) -> "DataParallel":
        """A new DataParallel (kwargs as the constructor's) whose `.params`, `.state` and `.steps`
        are the checkpoint's: `dp.step(dp.params, dp.state, ...)` continues its trajectory."""
        from .io import load
        ckpt = load(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != "tracejit.distributed.DataParallel":
            raise ValueError(f"DataParallel.restore: {path} is not a DataParallel checkpoint "
                             f"(written by DataParallel.checkpoint)")
        dp = cls(loss_fn, optimizer, num_workers, **kwargs)
        dp.params, dp.state, dp.steps = ckpt["params"], ckpt["state"], int(ckpt["steps"])
        return dp
