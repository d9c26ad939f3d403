"""Loop-nest kernels for the primitives that need their own loop nests (matmul, convolution,
pooling and their backward passes). Elementwise ops, reductions and layout ops are lowered by the
fusion code in codegen/fused.py instead.

Contract of a kernel (one per primitive, registered with `@register(prim_p, ...)` stating the
facts the scheduler needs, see `register`):

    lower(module: llvmlite.ir.Module, name: str, ins: ir.core.Instr) -> None

defines in `module` the function

    void name(ptr out, ptr in0, ..., ptr in{k-1}, ptr scratch, i64 tid, i64 nthreads)

that computes `ins.out` from `ins.inputs`. All buffers are dense, row-major (C order), of the IR
types (f32 -> float, f64 -> double, i32 -> i32); `out` never aliases an input; inputs are read-only.
Call `tid` of `nthreads` (0 <= tid < nthreads) writes a disjoint part of `out`; the parts of all
calls together cover `out` entirely and overwrite it (out is not zeroed beforehand). The runtime
makes these calls on its thread pool as chunks (codegen/parallel.py): `tid` is a chunk, `nthreads`
the chunk count (more than the threads), and a thread may run several chunks of one call one after
the other, so a call must not assume anything about the others beyond the partition
(toolkit.thread_range). `scratch_bytes(ins, n)` is the scratch of n threads, n equal regions of
`scratch_bytes(ins, 1)` bytes (a multiple of 64); `scratch` points to the executing thread's own
region (64-byte aligned, uninitialised at each call: its contents do not survive from one chunk
to the next).

Epilogues: a kernel registered with `epilogue=True` is called as
`lower(module, name, ins, epilogue=e)` where `e` is None or a `codegen.fused.Epilogue`. With one,
the function takes `e.n_args` more pointers right after its inputs, and after writing each block of
its output it calls `e.call(builder, out, extra_args, start, count)` for that block's flat range
(whole multiples of the last dimension); the epilogue rewrites the block in place.

Checks: a kernel registered with `checks=True` (gathers: indices read from data) is called as
`lower(module, name, ins, status_code=k)` with a code k > 0, and the function takes one more
pointer `status` right after its inputs: two i64 words, zero before the call. On a failed check
it skips the access and, unless status[0] is already set, sets status[0] = k (compare-and-swap,
so concurrent failures leave one consistent pair) and status[1] = the offending value; the runtime
raises after the call (codegen/runtime.py, `NativeFunction._check_status`).
"""
from __future__ import annotations

from typing import Callable

from .. import record
from ...ir.core import Primitive, Registry


@record(frozen=True)
class Kernel:
    """A loop-nest kernel and what the scheduler and the runtime need to know about it."""
    lower: Callable                  # lower(module, name, ins[, epilogue=e]) (see above)
    scratch_bytes: Callable          # scratch_bytes(ins, nthreads) -> int, nthreads equal regions
    epilogue: bool                   # may absorb the fused loop that consumes its result
    parallel: bool                   # splits its work by tid (else only thread 0 works)
    cost: Callable                   # cost(ins) -> estimated single-thread run time in ns
    compile_weight: int              # rough LLVM compile cost, to balance modules (runtime)
    checks: bool = False             # reports a bad index through the status words (runtime)
    # shared_weights(ins) -> {key: weight}: the shape-generic functions the lowering defines once
    # per LLVM module (matmul's tile functions), compiled once whatever the kernels calling them
    shared_weights: Callable | None = None
    # epilogue_apart(ins) -> bool: whether an epilogue applied apart (an optimizer's update of the
    # parameter whose gradient the kernel makes: schedule._fuse_epilogues_apart) pays on `ins`
    # rather than the update running as a loop of its own; None: wherever `epilogue`
    epilogue_apart: Callable | None = None
    # most_chunks(ins) -> int | None: the most chunks the thread pool splits `ins` into, below
    # threadpool.chunk_limit's (a kernel each of whose chunks passes over all of its input: the
    # weight gradient with few items); None: chunk_limit's alone
    most_chunks: Callable | None = None

    def takes_epilogue(self, ins, apart: bool = False) -> bool:
        """Whether the kernel of `ins` absorbs an epilogue (`apart`: one applied apart)."""
        if not self.epilogue:
            return False
        return not apart or self.epilogue_apart is None or self.epilogue_apart(ins)


kernels = Registry("kernel lowering")

_FACTS = ("epilogue", "parallel", "cost", "compile_weight")


def register(prim: Primitive, *, scratch_bytes: Callable | None = None, checks: bool = False,
             shared_weights: Callable | None = None, epilogue_apart: Callable | None = None,
             most_chunks: Callable | None = None, **facts):
    """Register the decorated `lower` as `prim`'s kernel. Every fact of `_FACTS` must be stated
    (`epilogue=`, `parallel=`, `cost=`, `compile_weight=`): the scheduler has no defaults to fall
    back on silently. `scratch_bytes` defaults to no scratch; `checks=True` for a kernel that
    validates its indices and takes the status pointer (see the contract above);
    `shared_weights`, `epilogue_apart`, `most_chunks`: see Kernel (then `compile_weight` is
    the kernel's own code only)."""
    if not isinstance(prim, Primitive):
        raise TypeError(f"register: expected a primitive object, got {prim!r}")
    missing = [f for f in _FACTS if f not in facts]
    unknown = sorted(set(facts) - set(_FACTS))
    if missing or unknown:
        raise TypeError(f"kernel for '{prim.name}': "
                        + (f"missing {', '.join(missing)}" if missing else "")
                        + ("; " if missing and unknown else "")
                        + (f"unknown {', '.join(unknown)}" if unknown else ""))

    def deco(fn):
        kernels[prim] = Kernel(fn, scratch_bytes or _no_scratch, **facts, checks=checks,
                               shared_weights=shared_weights, epilogue_apart=epilogue_apart,
                               most_chunks=most_chunks)
        return fn
    return deco


def _no_scratch(ins, nthreads):
    return 0


# ------------------------------------------------------------------------------------------------
# cost models (single-thread nanoseconds on the target), for deciding whether a kernel is worth
# running on several threads (parallel.PARALLEL_MIN_NS) and into how many chunks
# (threadpool.chunk_limit). They scale with the f32 lanes of the target's vectors (LANES: 16 with
# AVX-512, 8 with AVX2), which is what the kernels' speed per cycle follows.
# - flop-bound loop nests (matmul, convolutions): FLOPS_PER_LANE_NS = 6 flop per lane per ns.
#   Measured single-thread on the AVX-512 Xeon (2 cores, ~3 GHz, 227 GFLOP/s FMA peak), LeNet-5's
#   gradient at batch 1..256 and the conv block (TRACEJIT_PROFILE cycles, minima): convolutions
#   83-177 flop/ns (forward 113-177, input gradient 83, weight gradients 91-155), matmuls
#   70-115 with K >= 84: 96 flop/ns, where the former flat 50 overestimated them 2-3x and sent
#   ~10 us kernels to the pool. On AMD znver1 (AVX2) the same rule gives 48, the ~50 it was tuned
#   at there.
# - memory-bound loop nests (pooling and its gradients): one element per lane per ns; measured
#   13-17 elements/ns here (max_pool2d and max_pool2d_grad, LeNet-5, batch 16-64), not the former
#   4, which sent a 5 us pooling kernel to the pool (7 us there).
# - fused elementwise loops (schedule.Group.cost_ns): ELEMENT_OPS_PER_NS = one element-op per
#   lane per ns; measured 15-35 here for vector loops ([N,16,4,4] relu-gradient selects: 0.64 /
#   1.8 / 7.7 us at N = 16 / 64 / 256 where 1 ns per element-op estimated 16 / 66 / 262 us).
# - all of these read from cache; a memory-bound kernel or loop whose buffers exceed one core's L2
#   (CACHED_BYTES, 2 MiB on that Xeon) streams them from L3 or memory at STREAM_BYTES_PER_NS on
#   one thread, which bounds its time from below (`streaming_ns`). Measured 25-31 bytes/ns on
#   the AVX-512 Xeon (the conv block at image size 32: avg_pool2d over 4 MiB 186 us, a 4 MiB sum
#   143 us, a 2 MiB elementwise product 67 us, each 2-4x the in-cache estimate); a machine
#   constant, not derived from the target.
# ------------------------------------------------------------------------------------------------
def _lanes() -> int:
    from ..target import vector_width
    return vector_width(32)


LANES = _lanes()
FLOPS_PER_LANE_NS = 6
FLOPS_PER_NS = FLOPS_PER_LANE_NS * LANES
ELEMENTS_PER_NS = LANES
ELEMENT_OPS_PER_NS = LANES


def _l2_bytes(default: int = 1 << 20) -> int:
    """One core's L2 (Linux sysfs; `default` where it cannot be read)."""
    import glob
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{d}/level") as f:
                level = f.read().strip()
            with open(f"{d}/type") as f:
                kind = f.read().strip()
            with open(f"{d}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data") and size[:-1].isdigit():
            return int(size[:-1]) << {"K": 10, "M": 20}.get(size[-1], 0)
    return default


CACHED_BYTES = _l2_bytes()
STREAM_BYTES_PER_NS = 28


def streaming_ns(nbytes: int) -> float:
    """The least single-thread time to read and write `nbytes` of buffers: 0 when one core's L2
    holds them (the compute estimate rules), else their time streamed from L3 or memory."""
    return nbytes / STREAM_BYTES_PER_NS if nbytes > CACHED_BYTES else 0.0


def matmul_cost(ins) -> float:
    a = ins.inputs[0]
    k = a.shape[-2] if ins.params.get("trans_a") else a.shape[-1]
    return 2 * ins.out.type.size * k / FLOPS_PER_NS


def _conv_cost(forward_out, weight) -> float:
    """2 * (forward output size) * C * KH * KW flops, the same for all three convolutions."""
    per_out = weight.type.size // max(weight.shape[0], 1)
    return 2 * forward_out.type.size * per_out / FLOPS_PER_NS


def conv2d_cost(ins) -> float:                # (x, w) -> y
    return _conv_cost(ins.out, ins.inputs[1])


def conv2d_input_grad_cost(ins) -> float:     # (ct of y, w) -> ct of x
    return _conv_cost(ins.inputs[0], ins.inputs[1])


def conv2d_weight_grad_cost(ins) -> float:    # (ct of y, x) -> ct of w
    return _conv_cost(ins.inputs[0], ins.out)


def memory_cost(ins) -> float:
    """A kernel that reads its inputs and writes its output about once (pooling)."""
    values = list(ins.inputs) + [ins.out]
    return max(sum(v.type.size for v in values) / ELEMENTS_PER_NS,
               streaming_ns(sum(v.type.nbytes for v in values)))


# Compile weights (see runtime._modules), in units of ~5 ms of LLVM (AVX-512 Xeon, LeNet-5's
# gradient, loop-nest kernels' pipeline): a convolution's kernel ~60 ms, a pooling kernel's ~17. A
# matmul kernel is a small wrapper (MATMUL_WEIGHT) around tile functions shared by the module's
# matmuls (matmul.py, shared_weights): the outer form's ~55 ms, its packing ~15, the others less.
# (On AMD znver1 the outer tile function weighed 20: the AVX-512 one compiles faster.)
CONV_WEIGHT, MATMUL_WEIGHT, POOL_WEIGHT = 12, 2, 4
MATMUL_TILE_WEIGHTS = {"outer": 11, "dot": 6, "mv_dot": 4, "mv_axpy": 4, "pack": 3}


def _load_all():
    import importlib
    import pkgutil
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")
