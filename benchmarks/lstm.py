"""LSTM with tracejit.scan: compile time against the sequence length, and forward+backward time
per step against PyTorch's nn.LSTM (oneDNN/MKL), float32, hidden 128, batch 32.

    python benchmarks/lstm.py                 # compile at T = 10 and 1000, run time at T = 100
    python benchmarks/lstm.py --run-steps 1000 --repeats 5
    python benchmarks/lstm.py --compile-steps "" --threads 1 --clock cpu   # run time only

Compile time is tracejit's compile_stats() total for the gradient (trace, adjoint, passes, plan,
lowering, LLVM) with the persistent compile cache off, so the two lengths compile from scratch. Run time is the median of
`--repeats` calls (after a warm-up call) divided by the number of steps; PyTorch runs the same
weights and loss (sum of squares of every hidden state) in the same process, its calls interleaved
with ours so that a change in the machine's load hits both. `--threads` caps both libraries' threads;
`--clock cpu` times the process's CPU seconds instead of wall seconds (steadier on a loaded machine,
meaningful with --threads 1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tracejit  # noqa: E402

HIDDEN, BATCH, INPUT = 128, 32, 128


def lstm_loss(params, xs):
    """Sum of squares of every hidden state of a one-layer LSTM (gates i, f, g, o as torch)."""
    Wx, Wh, b = params["Wx"], params["Wh"], params["b"]
    H = Wh.shape[0]
    sig = tracejit.nn.sigmoid

    def step(carry, x):
        h, c = carry
        z = x @ Wx + h @ Wh + b
        i, f = sig(z[:, :H]), sig(z[:, H:2 * H])
        g, o = tracejit.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
        c = f * c + i * g
        h = o * tracejit.tanh(c)
        return (h, c), h
    zeros = np.zeros((xs.shape[1], H), np.float32)
    _, hs = tracejit.scan(step, (zeros, zeros), xs)
    return (hs * hs).sum()


def make_params(rng):
    k = 1 / np.sqrt(HIDDEN)
    u = lambda *shape: rng.uniform(-k, k, size=shape).astype(np.float32)  # noqa: E731
    return {"Wx": u(INPUT, 4 * HIDDEN), "Wh": u(HIDDEN, 4 * HIDDEN), "b": u(4 * HIDDEN)}


def median_seconds(fns, repeats, clock):
    """Median seconds of each of `fns` over `repeats` rounds that call each once, in turn."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            t0 = clock()
            fn()
            spent.append(clock() - t0)
    return [float(np.median(t)) for t in times]


def compile_seconds(steps, rng):
    """Seconds to trace, differentiate, optimize and compile the gradient for `steps` steps
    (without running it), and the split of compile_stats()."""
    params = make_params(rng)
    xs = rng.normal(size=(steps, BATCH, INPUT)).astype(np.float32)
    grad = tracejit.jit_grad(lstm_loss)
    grad.ir(params, xs, stage="llvm-opt")   # compiles the native code, does not run it
    stats = grad.compile_stats()
    return stats["total"], stats


def torch_step(params, xs, threads=None):
    import torch
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = torch.nn.LSTM(INPUT, HIDDEN)
    with torch.no_grad():
        net.weight_ih_l0.copy_(torch.from_numpy(params["Wx"].T.copy()))
        net.weight_hh_l0.copy_(torch.from_numpy(params["Wh"].T.copy()))
        net.bias_ih_l0.copy_(torch.from_numpy(params["b"]))
        net.bias_hh_l0.zero_()
    x = torch.from_numpy(xs)

    def run():
        net.zero_grad()
        hs, _ = net(x)
        (hs * hs).sum().backward()
        return net.weight_hh_l0.grad
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile-steps", default="10,1000")
    ap.add_argument("--run-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads per call, both libraries")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args(argv)
    tracejit.config.cache = False
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads is not None:
        tracejit.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"LSTM hidden {HIDDEN}, batch {BATCH}, input {INPUT}, float32; "
          f"{tracejit.get_num_threads()} threads")
    for steps in [int(s) for s in args.compile_steps.split(",") if s]:
        seconds, stats = compile_seconds(steps, rng)
        print(f"compile of the gradient at T = {steps:5d}: {seconds:6.2f} s "
              f"(llvm {stats['llvm']:.2f} s, lower {stats['lower']:.2f} s)")
    steps = args.run_steps
    params = make_params(rng)
    xs = rng.normal(size=(steps, BATCH, INPUT)).astype(np.float32)
    grad = tracejit.jit_grad(lstm_loss)
    ours = grad(params, xs)
    try:
        run = torch_step(params, xs, args.threads)
    except ImportError:
        [t_ours] = median_seconds([lambda: grad(params, xs)], args.repeats, clock)
        print(f"tracejit forward+backward at T = {steps}: {1e6 * t_ours / steps:8.1f} us per step")
        print("PyTorch: not installed")
        return
    theirs = run().numpy().T
    err = np.abs(ours["Wh"] - theirs).max() / max(1e-12, np.abs(theirs).max())
    t_ours, t_torch = median_seconds([lambda: grad(params, xs), run], args.repeats, clock)
    print(f"tracejit forward+backward at T = {steps}: {1e6 * t_ours / steps:8.1f} us per step "
          f"({args.clock} clock)")
    print(f"torch.nn.LSTM forward+backward at T = {steps}: {1e6 * t_torch / steps:8.1f} us per "
          f"step (ratio tracejit / torch {t_ours / t_torch:.2f}; gradients agree to {err:.1e})")


if __name__ == "__main__":
    main()
