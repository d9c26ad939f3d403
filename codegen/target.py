"""The host target: LLVM initialisation, the target machine, the optimisation pipeline and the JIT.

Every LLVM C-API call is serialised behind `LLVM_LOCK` (llvmlite is not thread-safe); compile from
one thread at a time.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import threading

import llvmlite.binding as llvm

LLVM_LOCK = threading.RLock()
_names = itertools.count()


@functools.lru_cache(maxsize=None)
def _init():
    with LLVM_LOCK:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
    return True


@functools.lru_cache(maxsize=None)
def target_machine():
    """The host's target machine: its CPU name and features, with 512-bit vectors preferred."""
    _init()
    with LLVM_LOCK:
        features = llvm.get_host_cpu_features().flatten()
        if "+avx512f" in features:
            features += ",-prefer-256-bit"
        target = llvm.Target.from_default_triple()
        return target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=features,
                                            opt=3, jit=True, codemodel="jitdefault")


@functools.lru_cache(maxsize=None)
def host_info() -> dict:
    _init()
    features = llvm.get_host_cpu_features()
    return {"cpu": llvm.get_host_cpu_name(), "avx512": bool(features.get("avx512f")),
            "avx2": bool(features.get("avx2")), "fma": bool(features.get("fma")),
            "triple": llvm.get_process_triple()}


def vector_width(dtype_bits: int) -> int:
    """Elements in one vector register for the host (512-bit with AVX-512, else 256-bit)."""
    bits = 512 if host_info()["avx512"] else 256
    return bits // dtype_bits


def optimize_module(mod_ref, speed_level: int = 3):
    tm = target_machine()
    pto = llvm.create_pipeline_tuning_options(speed_level=speed_level)
    pto.slp_vectorization = True
    pto.loop_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pm = pb.getModulePassManager()
    pm.run(mod_ref, pb)


# LLVM compilations done in this process (parse + optimize, not counting cache loads); tests check
# it stays 0 on a warm persistent cache.
llvm_compiles = 0


def optimized_module(llvm_ir: str, speed_level: int = 3):
    """Parse, verify and optimize `llvm_ir` for the host; returns the module ref."""
    global llvm_compiles
    _init()
    tm = target_machine()
    with LLVM_LOCK:
        mod = llvm.parse_assembly(llvm_ir)
        mod.triple = llvm.get_process_triple()
        mod.data_layout = str(tm.target_data)
        mod.verify()
        optimize_module(mod, speed_level)
        llvm_compiles += 1
        return mod


class JITModule:
    """Native code of one LLVM module, linked into an ORC JIT. Keep it alive while its functions
    are used.

    `JITModule(llvm_ir, exports)` compiles; `JITModule.from_object(obj, exports, source)` links
    object code compiled before (the persistent cache) without running LLVM, and compiles
    `source()` (the LLVM IR text) only when `optimized_ir` or `asm` is asked for. `object_code` is
    the linked object file."""

    def __init__(self, llvm_ir: str, exports, speed_level: int = 3):
        self._source, self._speed_level = (lambda: llvm_ir), speed_level
        self._mod = optimized_module(llvm_ir, speed_level)
        with LLVM_LOCK:
            # emit_object runs the code generator's IR passes on the module: `optimized_ir`
            # recompiles from the source rather than printing this module afterwards
            self.object_code = target_machine().emit_object(self._mod)
        self._optimized_ir = self._asm = None
        self._link(exports)

    @classmethod
    def from_object(cls, object_code: bytes, exports, source=None, speed_level: int = 3):
        self = cls.__new__(cls)
        _init()
        self._source, self._speed_level = source, speed_level
        self._mod, self.object_code = None, object_code
        self._optimized_ir = self._asm = None
        self._link(exports)
        return self

    def _link(self, exports):
        with LLVM_LOCK:
            self._lljit = llvm.create_lljit_compiler(target_machine())
            builder = llvm.JITLibraryBuilder().add_object_img(self.object_code)
            for name in exports:
                builder.export_symbol(name)
            self._tracker = builder.link(self._lljit, f"tracejit{next(_names)}")
            self.addresses = {name: self._tracker[name] for name in exports}

    def _recompile(self):
        if self._source is None:
            raise RuntimeError("this JIT module was linked from object code without its source")
        return optimized_module(self._source(), self._speed_level)

    @property
    def optimized_ir(self) -> str:
        """The module after LLVM's optimizer (compiled again on first use)."""
        if self._optimized_ir is None:
            mod = self._recompile()
            with LLVM_LOCK:
                self._optimized_ir = str(mod)
        return self._optimized_ir

    @property
    def asm(self) -> str:
        if self._asm is None:
            if self._mod is None:
                self._mod = self._recompile()
            with LLVM_LOCK:
                self._asm = target_machine().emit_assembly(self._mod)
        return self._asm


def cfunc(address: int, argtypes, restype=None):
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)
