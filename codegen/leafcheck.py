"""A native check that a tuple of objects are exactly the arrays a compiled call expects: the
per-leaf half of `Jitted.__call__`'s pytree fast path in one call instead of three attribute
reads per leaf in Python (~120 ns a leaf).

    check = leaf_checker(leaves)     # None when this interpreter's layout is not the one probed
    check(other_leaves) -> bool      # True: the same count, and each one an exact numpy.ndarray
                                     # (no subclass) with the same dtype object, the same shape,
                                     # C-contiguous, aligned and writeable (flags.carray)

It reads the objects' fields at the offsets of CPython's tuple and numpy's ndarray (tuple size at
16, items at 24; ndarray type at 8, nd at 24, dimensions at 32, descr at 56, flags at 64), each
offset probed against numpy's own answers before the first checker is made. The dtype is compared
by identity: an equal dtype that is another object (metadata, a copy) fails the check, which only
sends the call to the exact path behind it. It runs holding the GIL (PYFUNCTYPE), so no Python
code changes an array between the check and the call that follows it.

Its object code is made once per process at most, and usually never: a call with pytree arguments
that compiles asks for it (`request`), and the compile builds it alongside its own modules, in
whichever of its processes is free first (runtime.NativeFunction, target.compile_objects); it is
kept in the persistent compile cache, from which a later process links it (~1 ms instead of
~10-25 ms of LLVM on the second call).
"""
from __future__ import annotations

import ctypes
import hashlib
import threading

import numpy as np

# flags.carray: NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE
CARRAY = 0x1 | 0x100 | 0x400
_TYPE, _ND, _DIMS, _DESCR, _FLAGS = 8, 24, 32, 56, 64
_TUPLE_SIZE, _TUPLE_ITEMS = 16, 24

_IR = f"""
define i64 @tracejit_leaf_check(ptr %tup, ptr %spec, i64 %n) {{
entry:
  %size_p = getelementptr i8, ptr %tup, i64 {_TUPLE_SIZE}
  %size = load i64, ptr %size_p
  %size_ok = icmp eq i64 %size, %n
  %arrtype = load i64, ptr %spec
  %first = getelementptr i64, ptr %spec, i64 1
  br i1 %size_ok, label %loop, label %bad
loop:
  %i = phi i64 [0, %entry], [%i1, %next]
  %p = phi ptr [%first, %entry], [%pnext, %next]
  %done = icmp eq i64 %i, %n
  br i1 %done, label %good, label %body
body:
  %slot_off = mul i64 %i, 8
  %slot_off2 = add i64 %slot_off, {_TUPLE_ITEMS}
  %slot = getelementptr i8, ptr %tup, i64 %slot_off2
  %obj = load ptr, ptr %slot
  %type_p = getelementptr i8, ptr %obj, i64 {_TYPE}
  %type = load i64, ptr %type_p
  %type_ok = icmp eq i64 %type, %arrtype
  br i1 %type_ok, label %fields, label %bad
fields:
  %descr_p = getelementptr i8, ptr %obj, i64 {_DESCR}
  %descr = load i64, ptr %descr_p
  %want_descr = load i64, ptr %p
  %descr_ok = icmp eq i64 %descr, %want_descr
  %flags_p = getelementptr i8, ptr %obj, i64 {_FLAGS}
  %flags = load i32, ptr %flags_p
  %carray = and i32 %flags, {CARRAY}
  %flags_ok = icmp eq i32 %carray, {CARRAY}
  %nd_p = getelementptr i8, ptr %obj, i64 {_ND}
  %nd32 = load i32, ptr %nd_p
  %nd = sext i32 %nd32 to i64
  %want_nd_p = getelementptr i64, ptr %p, i64 1
  %want_nd = load i64, ptr %want_nd_p
  %nd_ok = icmp eq i64 %nd, %want_nd
  %ok1 = and i1 %descr_ok, %flags_ok
  %ok2 = and i1 %ok1, %nd_ok
  %dims_pp = getelementptr i8, ptr %obj, i64 {_DIMS}
  %dims = load ptr, ptr %dims_pp
  %want_dims = getelementptr i64, ptr %p, i64 2
  br i1 %ok2, label %dim_loop, label %bad
dim_loop:
  %j = phi i64 [0, %fields], [%j1, %dim_body]
  %dims_done = icmp eq i64 %j, %nd
  br i1 %dims_done, label %next, label %dim_body
dim_body:
  %d_p = getelementptr i64, ptr %dims, i64 %j
  %d = load i64, ptr %d_p
  %w_p = getelementptr i64, ptr %want_dims, i64 %j
  %w = load i64, ptr %w_p
  %j1 = add i64 %j, 1
  %d_ok = icmp eq i64 %d, %w
  br i1 %d_ok, label %dim_loop, label %bad
next:
  %i1 = add i64 %i, 1
  %pnext = getelementptr i64, ptr %want_dims, i64 %nd
  br label %loop
good:
  ret i64 1
bad:
  ret i64 0
}}
"""

# Its optimization pipeline (target.PIPELINES): fully optimized, as every call runs it.
PIPELINE = "full"

_lock = threading.Lock()
_state: list = []   # [the native function or None], once made
_object: list = []   # [object code] compiled along with a function, not linked yet
_requested = False   # a pytree call is compiling: its next call will want the check
# the compile cache's counters for the check's entries (apart from the functions' own: tests
# count those)
stats = {"hits": 0, "misses": 0, "stores": 0, "corrupt": 0, "errors": 0}


def _read(address, ctype):
    return ctype.from_address(address).value


def _layout_ok() -> bool:
    """Whether the offsets above are those of this interpreter's tuples and ndarrays."""
    a = np.zeros((2, 3), np.float32)
    b = a[:, ::2]
    c = np.zeros(4, np.float64)
    c.flags.writeable = False
    t = (a, b)
    if _read(id(t) + _TUPLE_SIZE, ctypes.c_int64) != 2 or \
            _read(id(t) + _TUPLE_ITEMS + 8, ctypes.c_void_p) != id(b):
        return False
    for x in (a, b, c):
        dims = _read(id(x) + _DIMS, ctypes.c_void_p)
        if _read(id(x) + _TYPE, ctypes.c_void_p) != id(np.ndarray) or \
                _read(id(x) + _ND, ctypes.c_int32) != x.ndim or \
                _read(id(x) + _DESCR, ctypes.c_void_p) != id(x.dtype) or \
                [_read(dims + 8 * k, ctypes.c_int64) for k in range(x.ndim)] != list(x.shape) or \
                (_read(id(x) + _FLAGS, ctypes.c_int32) & CARRAY == CARRAY) != x.flags.carray:
            return False
    return True


def _store(disk):
    """The check's own store in the compile cache `disk` (a cache.DiskCache, or None/False)
    and its key there: (DiskCache, key), or (None, None)."""
    if not disk:
        return None, None
    from . import cache
    key = hashlib.sha256("\n".join(["tracejit leaf check", disk.version, PIPELINE,
                                     cache._host_and_compiler(), _IR]).encode()).hexdigest()
    return cache.DiskCache(disk.directory, disk.version, ".check", stats), key


def request():
    """A call with pytree arguments is about to compile: build the check along (side_source)."""
    global _requested
    _requested = True


def side_source(disk):
    """(LLVM IR, pipeline) of the check, for the compile under way to build it alongside its
    own modules (then `provide` its object code), or None: not asked for (`request`), already
    made or compiled, or in the compile cache `disk`."""
    if not _requested or _state or _object:
        return None
    store, key = _store(disk)
    if store is not None and store.path(key).is_file():
        return None
    return _IR, PIPELINE


def provide(object_code: bytes, disk):
    """The check's object code, compiled along with a function (`side_source`): linked when the
    first checker is made, and stored in the compile cache `disk`."""
    with _lock:
        if not _object:
            _object.append(object_code)
    store, key = _store(disk)
    if store is not None:
        store.store(key, object_code)


def _compile() -> bytes:
    from .target import compile_objects
    return compile_objects([(_IR, PIPELINE)], processes=1)[0]


def _module(disk):
    """The check's code, linked: from the object code compiled along with a function, else
    from the compile cache `disk`, else compiled now (and stored)."""
    from .target import JITModule
    store, key = _store(disk)
    obj = _object[0] if _object else store.load(key) if store is not None else None
    if obj is not None:
        try:
            return JITModule.from_object(obj, ["tracejit_leaf_check"])
        except Exception as e:  # object code that passed its checksum but does not link
            if store is not None and not _object:
                store.discard(key, f"{type(e).__name__}: {e}")
    obj = _compile()
    if store is not None:
        store.store(key, obj)
    return JITModule.from_object(obj, ["tracejit_leaf_check"])


def _native(disk=None):
    if not _state:
        with _lock:
            if not _state:
                fn = None
                if _layout_ok():
                    module = _module(disk)
                    address = module.addresses["tracejit_leaf_check"]
                    fn = ctypes.PYFUNCTYPE(ctypes.c_int64, ctypes.py_object, ctypes.c_void_p,
                                           ctypes.c_int64)(address)
                    fn.module = module   # keeps the code alive
                _state.append(fn)
                _object.clear()
    return _state[0]


def leaf_checker(leaves, cache=None):
    """check(tuple) -> bool: whether a tuple holds arrays like `leaves` (see the module doc),
    or None when `leaves` are not all C-contiguous, aligned, writeable exact ndarrays (then the
    caller keeps its exact Python path) or the layout here is not the one probed. `cache`: the
    compile cache (cache.DiskCache) the check's object code may come from, or None."""
    if not all(type(x) is np.ndarray and x.flags.carray for x in leaves):
        return None
    native = _native(cache)
    if native is None:
        return None
    dtypes = [x.dtype for x in leaves]   # kept alive: their addresses are in the spec
    spec = [id(np.ndarray)]
    for x in leaves:
        spec += [id(x.dtype), x.ndim, *x.shape]
    spec = np.array(spec, np.int64)   # (ids fit: addresses are below 2**63)
    address, n = spec.ctypes.data, len(leaves)

    def check(tup):
        return native(tup, address, n) == 1
    check.keep = (spec, dtypes)
    return check
