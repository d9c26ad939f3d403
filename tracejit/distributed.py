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
3. each worker computes its shard's gradient, packs it into one contiguous buffer that it keeps,
   and returns its loss (and aux);
4. the workers average the buffers among themselves with a ring all-reduce through Ray's object
   store (`_schedule`): the buffer is cut into `num_workers` chunks, and in n - 1 rounds each
   worker adds its own chunk to the one its ring neighbour passed it and passes the sum on (the
   driver submits every round at once, handing each call's result reference to the next call,
   so the chunks travel worker to worker); after the last round, which divides by n, each
   worker holds one chunk of the mean, and the driver fetches those n chunks: one buffer, not
   n. (Ray's collective library needs torch.distributed for its CPU backend, gloo, and its
   groups must be rebuilt whenever a worker is replaced; the object store needs neither.)
5. the driver applies `optimizer.update` compiled with `tracejit.jit` to the mean and writes the
   new values into the arrays of `params` and `state`.
For a loss that is a mean over the batch's rows, the mean of the shards' gradients is the
gradient of the whole batch, so a step equals `jit_train_step(loss_fn, optimizer)` on the whole
batch to float rounding.

Faults. A worker that dies (killed process, lost node: Ray's actor-died, worker-crashed,
node-died and object-lost errors) or hangs (no result within `timeout` seconds: it is killed) is
replaced by a new actor, which receives the parameters and recomputes the shard; each worker may
be replaced `max_retries` times in one step. A failure inside the ring is pinned on the worker
whose own call failed or hangs while its input had arrived; it is replaced, recomputes its shard
(the others keep theirs) and the ring runs again, so no worker waits forever for a dead partner.
A step that cannot complete raises WorkerError naming the worker and the cause, after which
`params` and `state` are exactly as they were (nothing is written before the mean gradient is
in). An exception raised by `loss_fn` in a worker is not retried: it is re-raised on the driver
as a WorkerError naming the worker, with the worker's traceback in its message and the original
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
    """A step failed on a worker: `worker` is its index (-1 when no single worker is at fault),
    `cause` the exception behind it (the loss's own exception, Ray's error for a worker that
    kept dying, a TimeoutError for one that kept hanging)."""

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

    def add_into(self, acc: np.ndarray, buf: np.ndarray, segments=None) -> None:
        """acc += buf, elementwise in each segment's dtype (`segments`: the layout's, or a
        chunk's from `chunk_segments`)."""
        for dtype, start, stop in self.segments if segments is None else segments:
            a = acc[start:stop].view(dtype)
            a += buf[start:stop].view(dtype)

    def scale(self, buf: np.ndarray, s: float, segments=None) -> None:
        for dtype, start, stop in self.segments if segments is None else segments:
            a = buf[start:stop].view(dtype)
            a *= dtype.type(s)

    def chunks(self, n: int) -> list:
        """The byte ranges [(dtype, start, stop), ...] of chunk c = 0..n-1 of a packed buffer,
        for the ring all-reduce: every dtype segment is cut into n pieces of nearly equal size
        on 64-byte boundaries (so a piece is whole elements and stays aligned), and chunk c is
        piece c of every segment. Pieces may be empty."""
        out = [[] for _ in range(n)]
        for dtype, start, stop in self.segments:
            lines = (stop - start) // _ALIGN
            for c in range(n):
                a = start + lines * c // n * _ALIGN
                b = start + lines * (c + 1) // n * _ALIGN
                out[c].append((dtype, a, b))
        return out

    @staticmethod
    def chunk_segments(ranges) -> list:
        """The segments of a chunk's own contiguous buffer (its pieces placed end to end)."""
        segs, pos = [], 0
        for dtype, a, b in ranges:
            segs.append((dtype, pos, pos + b - a))
            pos += b - a
        return segs

    @staticmethod
    def take(buf: np.ndarray, ranges) -> np.ndarray:
        """A new contiguous buffer holding the pieces `ranges` of `buf` end to end."""
        return np.concatenate([buf[a:b] for _, a, b in ranges]) if ranges else \
            np.zeros(0, np.uint8)

    @staticmethod
    def put(buf: np.ndarray, ranges, chunk: np.ndarray) -> None:
        """The inverse of `take`: write `chunk`'s pieces back into their ranges of `buf`."""
        pos = 0
        for _, a, b in ranges:
            buf[a:b] = chunk[pos:pos + b - a]
            pos += b - a


class _Worker:
    """The body of a worker actor: the compiled gradient of `loss_fn`, the parameters of the
    latest version it was sent, and its packed gradient of the latest step (which the ring
    all-reduce reads chunk by chunk)."""

    def __init__(self, loss_fn, has_aux: bool):
        from .api import jit_value_and_grad
        self._grad = jit_value_and_grad(loss_fn, has_aux=has_aux)
        self._has_aux = has_aux
        self._version = None
        self._layout = None
        self._params = None
        self._token = None      # the step whose gradient self._grads is
        self._grads = None
        self._chunks = {}       # n -> the layout's chunks for a ring of n workers
        self._received = (0, None)  # parameter buffers received; (dtype, shape, C-contiguous)
                                    # of the last

    def ready(self):
        import ray
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def received(self) -> tuple:
        """(how many parameter buffers this worker was sent, (dtype, shape, C-contiguous) of
        the last), for tests."""
        return self._received

    def _ring_chunks(self, n: int) -> list:
        if n not in self._chunks:
            self._chunks[n] = self._layout.chunks(n)
        return self._chunks[n]

    def compute(self, token, version, layout, flat, n_chunks, first, *shard):
        """((loss, aux, seconds spent), chunk `first` of `n_chunks` of the packed gradient) of
        this worker's shard, the gradient kept for `reduce` calls of step `token`. `flat` is the
        packed parameters of `version` (resolved by Ray from the object store), or None when the
        driver knows this worker holds that version already."""
        if flat is not None:
            self._received = (self._received[0] + 1,
                              (str(flat.dtype), flat.shape, flat.flags.c_contiguous))
            self._version, self._layout = version, layout
            self._chunks = {}
            self._params = layout.unflatten(flat)
        elif version != self._version:
            raise RuntimeError(f"internal error: the driver skipped sending parameters version "
                               f"{version}, but this worker holds version {self._version}")
        t0 = time.perf_counter()
        value, grads = self._grad(self._params, *shard)
        loss, aux = value if self._has_aux else (value, None)
        self._grads = self._layout.pack(tree.leaves(grads))
        self._token = token
        out = self._layout.take(self._grads, self._ring_chunks(n_chunks)[first])
        return (np.asarray(loss), aux, time.perf_counter() - t0), out

    def reduce(self, token, c: int, n_chunks: int, divide, incoming: np.ndarray,
               own: np.ndarray | None = None) -> np.ndarray:
        """One step of an all-reduce (see `_schedule`): `own` (this worker's partial sum of
        chunk c, from an earlier step) or else chunk c of this worker's gradient, plus
        `incoming`, divided by `divide` unless it is None."""
        if token != self._token:
            raise RuntimeError(f"internal error: the all-reduce of step {token} reached a "
                               f"worker holding the gradient of step {self._token}")
        ranges = self._ring_chunks(n_chunks)[c]
        segments = self._layout.chunk_segments(ranges)
        out = self._layout.take(self._grads, ranges) if own is None else np.array(own)
        self._layout.add_into(out, incoming, segments)
        if divide is not None:
            self._layout.scale(out, 1.0 / divide, segments)
        return out


ALLREDUCE = ("ring", "tree")


def _schedule(kind: str, n: int):
    """How n workers average their gradients: (chunks, first, rounds, finals).

    The buffer is cut into `chunks` chunks; worker j's `compute` returns chunk first[j]. Each
    round is a list of calls (receiver j, sender, chunk c, own?, last?) run at once: j adds
    the sender's latest result (its `compute` chunk or its result of an earlier round) to its
    own partial sum of chunk c if `own` (its own latest result) or else to chunk c of its
    gradient; the last call on a chunk divides by n. `finals` [(worker, chunk)]: whose latest
    result is which chunk of the mean.

    "ring" (reduce-scatter): n chunks; in round s = 1..n-1 worker j adds its chunk (j - s) mod
    n to what worker j - 1 sent, so after n - 1 rounds worker j holds chunk (j + 1) mod n of
    the sum. Each worker sends and receives (n - 1)/n of the buffer: the fewest bytes, in the
    most rounds. "tree": one chunk, the whole buffer; in round k worker j (a multiple of 2^(k+1))
    adds worker j + 2^k's sum to its own: ceil(log2 n) rounds of a whole buffer, worker 0
    ending with the sum. Fewer rounds, more bytes: better for small buffers on many workers."""
    if kind == "ring":
        rounds = [[(j, (j - 1) % n, (j - s) % n, False, s == n - 1) for j in range(n)]
                  for s in range(1, n)]
        return n, list(range(n)), rounds, [(j, (j + 1) % n) for j in range(n)]
    rounds, stride = [], 1
    while stride < n:
        pairs = [(j, j + stride) for j in range(0, n, 2 * stride) if j + stride < n]
        rounds.append([(j, src, 0, True, 2 * stride >= n) for j, src in pairs])
        stride *= 2
    return 1, [0] * n, rounds, [(0, 0)]


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
    often one step may replace each worker that died or hung. `timeout`: seconds a worker may
    take for its shard's gradient (the first step's includes tracing and compiling), and the
    ring all-reduce may take, before the worker is taken for hung, killed and replaced; None
    waits forever. `allreduce`: "ring" (fewest bytes per worker, n - 1 rounds) or "tree"
    (log2 n rounds of whole buffers; for small gradients on many workers), see `_schedule`.
    `has_aux`: `loss_fn` returns (loss, aux);
    `step` then returns ((loss, aux), params, state) where every leaf of aux gets a leading axis
    of length num_workers, one entry per shard in batch order (for per-row aux,
    `a.reshape(-1, *a.shape[2:])` is the aux of the whole batch).

    Attributes: `params`, `state` (the latest step's results, or a checkpoint's values after
    `restore`), `steps` (steps done), `workers` (the actor handles), `last_step_times` (seconds of
    the last step: "total", "compute" (the slowest worker's gradient), "wait" (until every
    gradient was computed), "reduce" (the all-reduce, until the driver holds the mean),
    "update"), `last_step_bytes` (bytes the driver sent and received in the last step: "params"
    (0 when the workers held them already), "gradients" (the mean, once)).
    """

    start_timeout = 120.0  # seconds for the workers to start (a full cluster never frees CPUs)

    def __init__(self, loss_fn, optimizer, num_workers: int = 2, *, has_aux: bool = False,
                 address=None, threads_per_worker=None, max_retries: int = 3,
                 timeout: float | None = 300.0, allreduce: str = "ring"):
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
        if timeout is not None and (isinstance(timeout, bool) or
                                    not isinstance(timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"DataParallel: timeout must be a positive number of seconds or "
                             f"None, got {timeout!r}")
        if allreduce not in ALLREDUCE:
            raise ValueError(f"DataParallel: allreduce must be one of {ALLREDUCE}, got "
                             f"{allreduce!r}")
        ray = _ray()
        self.timeout, self.allreduce = timeout, allreduce
        self.loss_fn, self.optimizer, self.has_aux = loss_fn, optimizer, has_aux
        self.num_workers, self.max_retries = num_workers, max_retries
        self.params = self.state = None
        self.steps = 0
        self.last_step_times = {}
        self.last_step_bytes = {}
        self._plan = None  # this step's _schedule
        self._token = 0  # numbers the steps, so a worker's gradient is known to be this step's
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
        sent = 0
        if self._flat is None or not all(np.array_equal(a, b) for a, b in
                                         zip(self._layout.views(self._flat), leaves)):
            self._flat = self._layout.pack(leaves)
            self._flat_ref = ray.put(self._flat)
            self._version += 1
            sent = self._flat.nbytes
        self._token += 1
        self._plan = _schedule(self.allreduce, self.num_workers)
        restarts = [0] * self.num_workers
        results = [None] * self.num_workers
        self._compute(ray, shards, range(self.num_workers), results, restarts)
        t_computed = time.perf_counter()
        late_rings = 0
        while True:
            mean = self._allreduce(ray, [r[1] for r in results])
            if isinstance(mean, np.ndarray):
                break
            blamed = mean
            if not blamed:
                late_rings += 1
                if late_rings > self.max_retries:
                    raise WorkerError(
                        f"DataParallel.step: the all-reduce did not finish within "
                        f"timeout={self.timeout:g} s {late_rings} times, though no worker "
                        f"failed or hung in it; params and state are unchanged", -1,
                        TimeoutError("all-reduce"))
            for i, (what, cause) in blamed.items():
                self._replace(ray, i, restarts, what, cause)
                results[i] = None
            self._compute(ray, shards, blamed, results, restarts)
        grads = self._layout.unflatten(mean)
        t_reduced = time.perf_counter()

        if self._update is None:
            from .api import jit
            optimizer = self.optimizer

            def update(grads, state, params):
                return optimizer.update(grads, state, params)

            update.__name__ = update.__qualname__ = "DataParallel.update"
            self._update = jit(update)
        new_params, new_state = self._update(grads, state, params)
        metas = [r[0] for r in results]
        loss = np.asarray(np.mean([m[0] for m in metas]), metas[0][0].dtype)
        # every value is computed: now write them (an error above leaves params and state as
        # they were)
        for dst, src in zip(tree.leaves((params, state)), tree.leaves((new_params, new_state))):
            np.copyto(dst, src)
        self.params, self.state = params, state
        self.steps += 1
        t_end = time.perf_counter()
        self.last_step_times = {"total": t_end - t_start,
                                "compute": max(m[2] for m in metas),
                                "wait": t_computed - t_start,
                                "reduce": t_reduced - t_computed,
                                "update": t_end - t_reduced}
        self.last_step_bytes = {"params": sent, "gradients": self._layout.nbytes}
        if self.has_aux:
            aux = tree.map(lambda *xs: np.stack(xs), *[m[1] for m in metas])
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
        """Worker i's gradient of `shard`: (reference to (loss, aux, seconds), reference to the
        first chunk it sends on the ring)."""
        fresh = self._worker_version[i] != self._version
        meta, chunk = self.workers[i].compute.options(num_returns=2).remote(
            self._token, self._version, self._layout if fresh else None,
            self._flat_ref if fresh else None, self._plan[0], self._plan[1][i], *shard)
        self._worker_version[i] = self._version
        return meta, chunk

    def _compute(self, ray, shards, which, results, restarts) -> None:
        """Fill results[i] = ((loss, aux, seconds), reference to its first all-reduce chunk)
        for every worker i in `which`, replacing workers that die or take longer than
        `timeout`; WorkerError if the loss raised or a worker failed more than max_retries
        times."""
        retryable = _retryable_errors(ray)
        pending = {}  # meta reference -> (worker, chunk reference, deadline)

        def submit(i):
            meta, chunk = self._submit(i, shards[i])
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            pending[meta] = (i, chunk, deadline)

        for i in which:
            submit(i)
        while pending:
            deadlines = [d for _, _, d in pending.values() if d is not None]
            wait = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:
                ref = min(pending, key=lambda r: pending[r][2])
                i = pending.pop(ref)[0]
                what = f"hung (no gradient within timeout={self.timeout:g} s)"
                self._replace(ray, i, restarts, what, TimeoutError(what))
                submit(i)
                continue
            i, chunk, _ = pending.pop(ready[0])
            try:
                results[i] = (ray.get(ready[0]), chunk)
            except retryable as e:
                self._replace(ray, i, restarts, "died", e)
                submit(i)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                what = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
                raise WorkerError(
                    f"DataParallel.step: loss_fn raised on worker {i} of {self.num_workers} "
                    f"(shard {i} of the batch): {what}\nThe worker's traceback:\n{e}", i,
                    cause if cause is not None else e) from e

    def _replace(self, ray, i: int, restarts, what: str, cause: BaseException) -> None:
        """Kill worker i (which `what`: died, hung) and start a new one, waiting until it runs;
        WorkerError if worker i failed more than max_retries times in this step or its
        replacement cannot start."""
        retryable = _retryable_errors(ray)
        n = self.num_workers
        while True:
            # a hung worker still runs: stop it, freeing its CPU for the replacement (or, when
            # the step gives up, for anything else; the next step replaces it)
            try:
                ray.kill(self.workers[i])
            except Exception:  # noqa: BLE001  (already gone)
                pass
            if restarts[i] >= self.max_retries:
                times = restarts[i] + 1
                raise WorkerError(
                    f"DataParallel.step: worker {i} of {n} {what}; it failed {times} "
                    f"time{'s' * (times != 1)} in this step and was replaced {restarts[i]} "
                    f"time{'s' * (restarts[i] != 1)} (max_retries={self.max_retries}); the step "
                    f"is abandoned and params and state are unchanged. Last cause: "
                    f"{type(cause).__name__}: {cause}", i, cause) from cause
            restarts[i] += 1
            self._start_worker(i)
            try:
                ray.get(self.workers[i].ready.remote(), timeout=self.start_timeout)
                return
            except ray.exceptions.GetTimeoutError:
                free = ray.available_resources().get("CPU", 0)
                raise WorkerError(
                    f"DataParallel.step: the replacement of worker {i} of {n} (which {what}) "
                    f"did not start within {self.start_timeout:g} s; it needs 1 free CPU of "
                    f"the Ray cluster and {free:g} are free now", i, cause) from None
            except retryable as e:
                what, cause = "died while starting", e

    def _allreduce(self, ray, chunk_refs):
        """The mean of the workers' gradients as one packed buffer, by the all-reduce
        `_schedule` plans, among the workers through the object store: the driver submits every
        round at once, passing each call's result reference on to the next call, so the chunks
        travel from worker to worker, and fetches only the finished chunks of the mean, one
        buffer's worth in all. If it fails (a worker died, or the reduce did not finish within
        `timeout`), {worker: (what, cause)} of the workers to blame: those whose own call
        failed or hangs although its inputs arrived."""
        n_chunks, _, rounds, finals = self._plan
        latest = list(chunk_refs)
        calls = [(j, ref, ()) for j, ref in enumerate(chunk_refs)]  # (worker, result, inputs)
        for rnd in rounds:
            new = {}
            for j, src, c, own, last in rnd:
                inputs = (latest[src], latest[j]) if own else (latest[src],)
                new[j] = self.workers[j].reduce.remote(
                    self._token, c, n_chunks, self.num_workers if last else None, *inputs)
                calls.append((j, new[j], inputs))
            for j, ref in new.items():
                latest[j] = ref
        refs = [latest[j] for j, _ in finals]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout)
        if len(ready) == len(refs):
            try:
                chunks = ray.get(refs)
            except Exception:  # noqa: BLE001  (_blame tells a fault from a bug, and names it)
                pass
            else:
                mean = np.zeros(self._layout.nbytes, np.uint8)
                ranges = self._layout.chunks(n_chunks)
                for (_, c), chunk in zip(finals, chunks):
                    self._layout.put(mean, ranges[c], chunk)
                return mean
        return self._blame(ray, calls)

    def _blame(self, ray, calls) -> dict:
        """{worker: (what, cause)} for a failed all-reduce, given its calls in the order they
        were submitted (the `compute` chunks first) as (worker, result, inputs): a call that
        failed or is still pending while its inputs are fine points at the worker that ran it.
        Fetches chunks: only for failures."""
        n = self.num_workers
        refs = [ref for _, ref, _ in calls]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        status = {}   # None: fine; "pending"; or the exception
        for ref in refs:
            if ref not in ready:
                status[ref] = "pending"
                continue
            try:
                ray.get(ref)
                status[ref] = None
            except Exception as e:  # noqa: BLE001  (judged below, where its input is known)
                status[ref] = e
        blamed = {}
        for k, (j, ref, inputs) in enumerate(calls):
            if j in blamed or status[ref] is None or \
                    any(status[r] is not None for r in inputs):
                continue
            if status[ref] == "pending":
                what = f"hung in the all-reduce (no result within timeout={self.timeout:g} s)"
                blamed[j] = (what, TimeoutError(what))
            elif isinstance(status[ref], _retryable_errors(ray)):
                blamed[j] = ("died in the all-reduce" if k >= n else "lost its gradient",
                             status[ref])
            else:   # not a fault of the cluster: a bug, reported as it is
                raise WorkerError(f"DataParallel.step: the all-reduce failed on worker {j} of "
                                  f"{n}: {status[ref]}", j, status[ref]) from status[ref]
        # empty only when every call had succeeded by now (a ring that finished just after
        # its timeout): the caller runs it again
        return blamed

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
