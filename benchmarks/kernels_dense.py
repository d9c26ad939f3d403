"""Micro-benchmark of the dense kernels (codegen/kernels/matmul.py, conv2d.py) called alone.

    python benchmarks/kernels_dense.py            # the conv block, MLP and LeNet-5 kernels
    python benchmarks/kernels_dense.py --quick    # fewer runs
    python benchmarks/kernels_dense.py --peak     # also the machine's FMA peak (benchmarks/peak.py)

For each kernel: time and GFLOP/s on one thread and on `--threads` threads, and the compile time of
the kernel alone in a module (LLVM work: parse, optimize, emit; CPU seconds). The threads are
Python threads calling the kernel through ctypes (which releases the GIL), tids 0..n-1 of one call,
released together by a barrier; a figure is the best of many short runs (as in peak.py: on a shared
machine a short run is the likeliest to have its cores to itself). On a machine busy with other
processes the wall time of n threads says little, so a third figure divides the threads' CPU time
(each thread calling its tid in a loop) by the calls. Flops: 2*M*N*K for a matmul,
2*N*O*OH*OW*C*KH*KW for each of a convolution's three kernels.

Also the compile time of all of LeNet-5's dense kernels in one module (they share loop functions
there, as in the generated gradient).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import llvmlite.binding as llvm  # noqa: E402
import llvmlite.ir as llir  # noqa: E402

from tracejit.codegen.kernels import _load_all, kernels  # noqa: E402
from tracejit.codegen.target import JITModule, cfunc, optimize_module, target_machine  # noqa: E402
from tracejit.ir import lax  # noqa: E402
from tracejit.ir.builder import Builder, building  # noqa: E402
from tracejit.ir.core import TensorType  # noqa: E402

_load_all()


def make_instr(prim, in_shapes, dtype="f32", **params):
    with building(Builder("bench")) as b:
        xs = [b.add_param(TensorType(dtype, s)) for s in in_shapes]
        return getattr(lax, prim)(*xs, **params).instr


def conv_specs(x, w, stride, padding, prims=("conv2d", "conv2d_input_grad",
                                               "conv2d_weight_grad")):
    """(label, instr, flops) of a convolution's kernels."""
    fwd = make_instr("conv2d", [x, w], stride=stride, padding=padding)
    ct = fwd.out.shape
    flops = 2 * ct[0] * ct[1] * ct[2] * ct[3] * x[1] * w[2] * w[3]
    make = {"conv2d": lambda: fwd,
            "conv2d_input_grad": lambda: make_instr("conv2d_input_grad", [ct, w], in_hw=x[2:],
                                                    stride=stride, padding=padding),
            "conv2d_weight_grad": lambda: make_instr("conv2d_weight_grad", [ct, x],
                                                     kernel=w[2:], stride=stride,
                                                     padding=padding)}
    return [(f"{p} x{list(x)} w{list(w)}", make[p](), flops) for p in prims]


def matmul_spec(a, b, trans_a=False, trans_b=False):
    ins = make_instr("matmul", [a, b], trans_a=trans_a, trans_b=trans_b)
    m, n = ins.out.shape
    k = a[0] if trans_a else a[1]
    label = f"matmul {list(a)}{'^T' if trans_a else ''} x {list(b)}{'^T' if trans_b else ''}"
    return label, ins, 2 * m * n * k


def cases():
    out = conv_specs((16, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1))
    out += [matmul_spec((64, 784), (256, 784), trans_b=True),
            matmul_spec((64, 256), (64, 784), trans_a=True),
            matmul_spec((64, 256), (256, 784)),
            matmul_spec((64, 256), (10, 256), trans_b=True)]
    out += conv_specs((64, 1, 28, 28), (6, 1, 5, 5), (1, 1), (0, 0),
                      ("conv2d", "conv2d_weight_grad"))
    out += conv_specs((64, 6, 12, 12), (16, 6, 5, 5), (1, 1), (0, 0))
    return out


def lenet_instrs():
    """The dense kernels of LeNet-5's gradient at batch 64."""
    instrs = [ins for _, ins, _ in conv_specs((64, 1, 28, 28), (6, 1, 5, 5), (1, 1), (0, 0),
                                              ("conv2d", "conv2d_weight_grad"))]
    instrs += [ins for _, ins, _ in conv_specs((64, 6, 12, 12), (16, 6, 5, 5), (1, 1), (0, 0))]
    for m, k, n in [(64, 256, 120), (64, 120, 84), (64, 84, 10)]:
        instrs += [make_instr("matmul", [(m, k), (n, k)], trans_b=True),
                   make_instr("matmul", [(m, n), (m, k)], trans_a=True),
                   make_instr("matmul", [(m, n), (n, k)])]
    return instrs


def llvm_seconds(instrs) -> dict:
    """CPU seconds to lower `instrs` into one module (Python), and LLVM's parse, optimize, emit."""
    t0 = time.process_time()
    mod = llir.Module()
    for i, ins in enumerate(instrs):
        kernels[ins.prim].lower(mod, f"k{i}", ins)
    text = str(mod)
    t1 = time.process_time()
    tm = target_machine()
    m = llvm.parse_assembly(text)
    m.triple = llvm.get_process_triple()
    m.data_layout = str(tm.target_data)
    t2 = time.process_time()
    optimize_module(m)
    t3 = time.process_time()
    tm.emit_object(m)
    t4 = time.process_time()
    return {"lower": t1 - t0, "parse": t2 - t1, "optimize": t3 - t2, "emit": t4 - t3,
            "llvm": t4 - t1}


class Bench:
    """One kernel compiled alone, with its buffers, callable on n threads."""

    def __init__(self, ins, max_threads):
        mod = llir.Module()
        kernels[ins.prim].lower(mod, "kernel", ins)
        self.jit = JITModule(str(mod), ["kernel"])
        self.fn = cfunc(self.jit.addresses["kernel"],
                        [ctypes.c_void_p] * (len(ins.inputs) + 2) + [ctypes.c_int64] * 2)
        rng = np.random.default_rng(0)
        self.arrays = [rng.standard_normal(v.shape).astype(np.float32) for v in ins.inputs]
        self.out = np.zeros(ins.out.shape, np.float32)
        nbytes = max(kernels[ins.prim].scratch_bytes(ins, n) for n in range(1, max_threads + 1))
        self.scratch = np.zeros(nbytes + 64, np.uint8)
        self.args = ([self.out.ctypes.data] + [a.ctypes.data for a in self.arrays]
                     + [self.scratch.ctypes.data + (-self.scratch.ctypes.data) % 64])
        # a thread's own scratch region, as the pool passes it (a shared one made two threads
        # pack their B panels into the same lines: wrong panels and false sharing)
        self.region = kernels[ins.prim].scratch_bytes(ins, 1)

    def thread_args(self, tid: int) -> list:
        return self.args[:-1] + [self.args[-1] + tid * self.region]

    def run(self, threads: int, calls: int) -> float:
        """Seconds for `calls` calls, each on `threads` threads (a barrier between calls)."""
        if threads == 1:
            t0 = time.perf_counter()
            for _ in range(calls):
                self.fn(*self.args, 0, 1)
            return time.perf_counter() - t0
        barrier = threading.Barrier(threads)
        times = []

        def work(tid):
            for _ in range(calls):
                barrier.wait()
                if tid == 0:
                    times.append(time.perf_counter())
                self.fn(*self.thread_args(tid), tid, threads)
            barrier.wait()
            if tid == 0:
                times.append(time.perf_counter())

        ts = [threading.Thread(target=work, args=(k,)) for k in range(1, threads)]
        for t in ts:
            t.start()
        work(0)
        for t in ts:
            t.join()
        return times[-1] - times[0]

    def cpu(self, threads: int, calls: int) -> float:
        """Seconds per call by the CPU time of the calling threads (each thread calls its tid
        `calls` times, no barrier; the slowest thread counts): what a call would take with the
        cores to itself, on a machine where other processes take turns on them."""
        spent = [0.0] * threads

        def work(tid):
            t0 = time.thread_time()
            for _ in range(calls):
                self.fn(*self.thread_args(tid), tid, threads)
            spent[tid] = time.thread_time() - t0

        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return max(spent) / calls

    def best(self, threads: int, seconds: float, repeats: int) -> float:
        """Best seconds per call over `repeats` runs of about `seconds` each."""
        self.run(threads, 2)
        dt = self.run(threads, 3) / 3
        calls = max(1, int(seconds / max(dt, 1e-7)))
        return min(self.run(threads, calls) / calls for _ in range(repeats))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peak", action="store_true", help="also measure the FMA peak")
    ap.add_argument("--force", default="{}",
                    help="blocking overrides, a Python dict: matmul's 'dot': (MR, NR) and 'outer': "
                         "(MR, NV); conv2d's 'core': (R, PR, PV), 'wgrad': (R, GR), 'ng': images")
    args = ap.parse_args(argv)
    import ast
    from tracejit.codegen.kernels import conv2d, matmul
    for key, value in ast.literal_eval(args.force).items():
        (matmul.FORCE if key in ("dot", "outer") else conv2d.FORCE)[key] = value
    seconds, repeats = (0.01, 5) if args.quick else (0.02, 20)
    llvm_seconds(lenet_instrs()[:1])   # initialise LLVM
    if args.peak:
        from benchmarks.peak import measure
        pk = measure(args.threads)
        print(f"FMA peak: {pk['single']:.0f} GFLOP/s on 1 thread, {pk['all']:.0f} on "
              f"{args.threads}")
    n = args.threads
    print(f"{'kernel':52s} {'1 thread':>16s} {f'{n} threads':>16s} {f'{n} thr. CPU time':>16s}"
          f" {'compile':>8s}")
    for label, ins, flops in cases():
        c = llvm_seconds([ins])
        bench = Bench(ins, n)
        t1 = bench.best(1, seconds, repeats)
        tn = bench.best(n, seconds, repeats)
        calls = max(1, int(seconds * 5 / t1))
        tc = min(bench.cpu(n, calls) for _ in range(3))
        print(f"{label:52s}" + "".join(f" {t * 1e6:8.1f}us{flops / t / 1e9:4.0f}GF"
                                       for t in (t1, tn, tc))
              + f" {c['llvm'] * 1e3:5.1f}ms", flush=True)
    lenet = lenet_instrs()
    c = min((llvm_seconds(lenet) for _ in range(3)), key=lambda d: d["llvm"])
    print(f"\nLeNet-5's {len(lenet)} dense kernels in one module: lowering {c['lower'] * 1e3:.0f} ms"
          f", LLVM {c['llvm'] * 1e3:.0f} ms (optimize {c['optimize'] * 1e3:.0f}, emit "
          f"{c['emit'] * 1e3:.0f}) CPU")


if __name__ == "__main__":
    main()
