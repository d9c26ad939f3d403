"""The persistent compile cache (codegen/cache.py): a second process links the stored object code
instead of running LLVM and gets the same results; corrupt entries are detected, logged and
compiled again; the key follows the IR; the option turns it off; the directory is private.

Every test uses its own temporary cache directory (tests/conftest.py points the rest of the
suite's TRACEJIT_CACHE_DIR at a project-local one kept between runs, never the user's)."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tracejit
from tracejit import nn

import tracejit.codegen.target as target  # noqa: E402
from tracejit.codegen import cache as diskcache  # noqa: E402
from helpers import use_backend

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

ROOT = Path(__file__).resolve().parents[1]

# A small convolutional classifier: conv2d, relu, max pooling, a dense layer, cross-entropy on
# class indices (a literal one-hot array) and a closed-over weighting of 24 elements (a literal
# larger than the printer shows).
PROGRAM = textwrap.dedent("""
    import numpy as np
    import tracejit
    from tracejit import nn

    LABELS = np.array([0, 3, 1, 2, 3, 1])
    WEIGHT = np.linspace(0.5, 1.5, 24)

    def loss(p, x):
        h = nn.max_pool2d(nn.relu(nn.conv2d(x, p["cw"], p["cb"], padding=1)), 2)   # [6,2,4,4]
        h = nn.flatten(h)[:, :24] * WEIGHT
        return nn.cross_entropy(nn.linear(h, p["w"], p["b"]), LABELS)

    def arguments(seed=0):
        rng = np.random.default_rng(seed)
        p = {"cw": rng.normal(size=(2, 1, 3, 3)), "cb": rng.normal(size=2),
             "w": rng.normal(size=(4, 24)) * 0.3, "b": rng.normal(size=4)}
        return p, rng.normal(size=(6, 1, 8, 8))
""")

SCRIPT = PROGRAM + textwrap.dedent("""
    import json, logging, sys
    import tracejit.codegen.cache, tracejit.codegen.target
    from tracejit import codegen
    records = []
    class Keep(logging.Handler):
        def emit(self, r):
            records.append([r.levelname, r.getMessage()])
    logging.getLogger("tracejit").addHandler(Keep())
    tracejit.config.backend = "llvm"
    g = tracejit.jit_value_and_grad(loss)
    value, grads = g(*arguments())
    print(json.dumps({"value": float(value), "grads": {k: v.tolist() for k, v in grads.items()},
                      "llvm_compiles": codegen.target.llvm_compiles,
                      "cache": codegen.cache.stats, "stats": g.compile_stats(), "log": records}))
""")


def run_process(cache_dir, **env):
    environ = dict(os.environ, TRACEJIT_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    environ.pop("TRACEJIT_CACHE", None)
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def entries(cache_dir):
    return sorted(Path(cache_dir).glob("*.o")) if Path(cache_dir).exists() else []


def program():
    ns = {}
    exec(PROGRAM, ns)
    return ns["loss"], ns["arguments"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """tracejit.config.cache_dir in a fresh temporary directory, the cache on, native backend."""
    d = tmp_path / "cache"
    monkeypatch.setattr(tracejit.config, "cache", True)
    monkeypatch.setattr(tracejit.config, "cache_dir", str(d))
    with use_backend("llvm"):
        yield d


def compile_fresh(loss, args):
    """A new jitted function (empty in-memory cache) called once: (value, grads, jitted,
    LLVM compilations it took)."""
    before = target.llvm_compiles
    g = tracejit.jit_value_and_grad(loss)
    value, grads = g(*args)
    return value, grads, g, target.llvm_compiles - before


# ------------------------------------------------------------------------------------------------
# a second process
# ------------------------------------------------------------------------------------------------
def test_a_second_process_links_the_cached_code_and_gets_the_same_result(tmp_path):
    d = tmp_path / "cache"
    first = run_process(d)
    assert first["llvm_compiles"] == 1
    assert first["cache"]["stores"] == 1 and first["cache"]["hits"] == 0
    assert len(entries(d)) == 1
    assert first["stats"]["cache_hits"] == 0 and first["stats"]["llvm"] > 0

    second = run_process(d)
    assert second["llvm_compiles"] == 0, "the second process ran LLVM"
    assert second["cache"]["hits"] == 1 and second["cache"]["stores"] == 0
    assert second["stats"]["cache_hits"] == 1
    assert second["stats"]["llvm"] == 0 and second["stats"]["lower"] == 0
    assert second["value"] == first["value"]
    assert second["grads"] == first["grads"]
    assert not [r for r in second["log"] if r[0] == "WARNING"]

    # and the result is right: the interpreter computes the same
    loss, arguments = program()
    with use_backend("interpreter"):
        value, grads = tracejit.jit_value_and_grad(loss)(*arguments())
    np.testing.assert_allclose(second["value"], value, rtol=1e-12)
    for k in grads:
        np.testing.assert_allclose(second["grads"][k], grads[k], rtol=1e-10, atol=1e-12)


def test_the_environment_variable_turns_the_cache_off(tmp_path):
    d = tmp_path / "cache"
    for _ in range(2):
        out = run_process(d, TRACEJIT_CACHE="0")
        assert out["llvm_compiles"] == 1
        assert out["cache"] == {"hits": 0, "misses": 0, "stores": 0, "corrupt": 0, "errors": 0}
    assert not d.exists()


# ------------------------------------------------------------------------------------------------
# in this process
# ------------------------------------------------------------------------------------------------
def test_a_warm_cache_skips_llvm_and_dumps_still_work(cache_dir):
    loss, arguments = program()
    v1, g1, _, compiles = compile_fresh(loss, arguments())
    assert compiles == 1 and len(entries(cache_dir)) == 1
    v2, g2, jitted, compiles = compile_fresh(loss, arguments())
    assert compiles == 0
    assert v2 == v1 and all(np.array_equal(g1[k], g2[k]) for k in g1)
    stats = jitted.compile_stats()
    assert stats["cache_hits"] == 1 and stats["llvm"] == 0 and stats["signatures"] == 1
    assert set(stats) >= {"trace", "passes", "plan", "lower", "llvm", "cache", "total"}
    # the LLVM IR and assembly of code loaded from the cache are compiled on demand
    assert "define" in jitted.ir(*arguments(), stage="llvm")
    assert "define" in jitted.ir(*arguments(), stage="llvm-opt")
    assert "entry" in jitted.ir(*arguments(), stage="asm")


CORRUPTIONS = {
    "empty": lambda b: b"",
    "header only, cut": lambda b: b[:20],
    "truncated": lambda b: b[:len(b) // 2],
    "one byte short": lambda b: b[:-1],
    "payload byte flipped": lambda b: b[:-100] + bytes([b[-100] ^ 0x40]) + b[-99:],
    "magic overwritten": lambda b: b"XXXXXXXX" + b[8:],
    "trailing garbage": lambda b: b + b"\0" * 16,
}


@pytest.fixture(scope="module")
def warm_entry(tmp_path_factory):
    """(entry file name, its bytes, value, grads) of `program()` compiled once for this module."""
    d = tmp_path_factory.mktemp("warm") / "cache"
    loss, arguments = program()
    with use_backend("llvm"):
        old = tracejit.config.cache, tracejit.config.cache_dir
        tracejit.config.cache, tracejit.config.cache_dir = True, str(d)
        try:
            value, grads, _, _ = compile_fresh(loss, arguments())
        finally:
            tracejit.config.cache, tracejit.config.cache_dir = old
    [entry] = entries(d)
    return entry.name, entry.read_bytes(), value, grads


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_corrupt_entry_is_logged_removed_and_compiled_again(cache_dir, warm_entry, corrupt,
                                                             caplog):
    name, good, v1, g1 = warm_entry
    loss, arguments = program()
    cache_dir.mkdir(mode=0o700)
    entry = cache_dir / name
    entry.write_bytes(CORRUPTIONS[corrupt](good))
    corrupt_before = diskcache.stats["corrupt"]
    with caplog.at_level(logging.WARNING, logger="tracejit"):
        v2, g2, _, compiles = compile_fresh(loss, arguments())
    assert compiles == 1
    assert diskcache.stats["corrupt"] == corrupt_before + 1
    warnings = [r for r in caplog.records if r.name == "tracejit" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage()
    assert entry.name in warnings[0].getMessage()
    assert v2 == v1 and all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert entry.read_bytes() == good  # written again, whole
    # and the rewritten entry is used
    _, _, _, compiles = compile_fresh(loss, arguments())
    assert compiles == 0


def test_an_entry_that_does_not_link_is_removed_and_compiled_again(cache_dir, warm_entry,
                                                                   caplog):
    """Object code with a valid header and checksum that LLVM cannot link."""
    name, _, v1, _ = warm_entry
    cache_dir.mkdir(mode=0o700)
    diskcache.DiskCache(cache_dir).store(name[:-2], b"not an object file" * 8)
    loss, arguments = program()
    with caplog.at_level(logging.WARNING, logger="tracejit"):
        v2, _, _, compiles = compile_fresh(loss, arguments())
    assert compiles == 1 and v2 == v1
    assert any("could not be used" in r.getMessage() for r in caplog.records)
    assert (cache_dir / name).read_bytes() == warm_entry[1]


def test_an_entry_under_another_key_is_not_used(cache_dir, caplog):
    """An entry renamed to another key's file name (or a hash collision) fails the key check."""
    loss, arguments = program()
    compile_fresh(loss, arguments())
    [entry] = entries(cache_dir)
    p, x = arguments()
    p = dict(p, cw=np.ones((3, 1, 3, 3)), cb=np.ones(3))  # another shape: another entry
    compile_fresh(loss, (p, x))
    [other] = [e for e in entries(cache_dir) if e != entry]
    other.write_bytes(entry.read_bytes())
    with caplog.at_level(logging.WARNING, logger="tracejit"):
        value, _, _, compiles = compile_fresh(loss, (p, x))
    assert compiles == 1
    assert any("another key" in r.getMessage() for r in caplog.records)
    with use_backend("interpreter"):
        expected = tracejit.jit_value_and_grad(loss)(p, x)[0]
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_no_temporary_files_are_left_behind(cache_dir):
    loss, arguments = program()
    compile_fresh(loss, arguments())
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".o")] == []


def test_config_cache_false_writes_nothing(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setattr(tracejit.config, "cache", False)
    monkeypatch.setattr(tracejit.config, "cache_dir", str(d))
    loss, arguments = program()
    with use_backend("llvm"):
        compile_fresh(loss, arguments())
        _, _, jitted, compiles = compile_fresh(loss, arguments())
    assert compiles == 1 and jitted.compile_stats()["cache_hits"] == 0
    assert not d.exists()


def test_the_config_reads_the_environment(monkeypatch):
    for value, expected in [("0", False), ("off", False), ("1", True), (None, True)]:
        if value is None:
            monkeypatch.delenv("TRACEJIT_CACHE", raising=False)
        else:
            monkeypatch.setenv("TRACEJIT_CACHE", value)
        assert type(tracejit.config)().cache is expected
        assert diskcache.enabled_by_env() is expected
        assert (diskcache.resolve(None) is not None) is expected


def test_the_default_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("TRACEJIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert diskcache.default_directory() == tmp_path / "xdg" / "tracejit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert diskcache.default_directory() == Path.home() / ".cache" / "tracejit"
    monkeypatch.setenv("TRACEJIT_CACHE_DIR", str(tmp_path / "mine"))
    assert diskcache.default_directory() == tmp_path / "mine"
    assert diskcache.DiskCache().directory == tmp_path / "mine"


def test_pruning_removes_the_least_recently_used_entries(tmp_path):
    d = tmp_path / "cache"
    c = diskcache.DiskCache(d)
    keys = [f"{i:064x}" for i in range(10)]
    for age, key in enumerate(keys):
        c.store(key, bytes(1000))
        t = 1_000_000 + 1000 * age  # keys[0] is the oldest
        os.utime(c.path(key), (t, t))
    assert c.load(keys[0]) is not None  # a hit makes it the most recently used
    stale = d / ".abandoned.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (1_000_000, 1_000_000))
    c.prune(max_bytes=6 * (1000 + 100))
    left = {p.name[:-2] for p in entries(d)}
    assert keys[0] in left and keys[9] in left and keys[1] not in left
    assert len(left) <= 4 and not stale.exists()


# ------------------------------------------------------------------------------------------------
# permissions
# ------------------------------------------------------------------------------------------------
def test_the_directory_is_created_private(cache_dir):
    old = os.umask(0)  # even with a permissive umask
    try:
        loss, arguments = program()
        compile_fresh(loss, arguments())
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    for e in entries(cache_dir):
        assert stat.S_IMODE(e.stat().st_mode) & 0o077 == 0


def test_a_directory_others_can_write_is_not_used(tmp_path, monkeypatch, caplog):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setattr(tracejit.config, "cache", True)
    monkeypatch.setattr(tracejit.config, "cache_dir", str(d))
    loss, arguments = program()
    with use_backend("llvm"), caplog.at_level(logging.WARNING, logger="tracejit"):
        value, _, _, compiles = compile_fresh(loss, arguments())
    assert compiles == 1 and list(d.iterdir()) == []
    assert any("writable by others" in r.getMessage() for r in caplog.records)
    with use_backend("interpreter"):
        expected = tracejit.jit_value_and_grad(loss)(*arguments())[0]
    np.testing.assert_allclose(value, expected, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# the key
# ------------------------------------------------------------------------------------------------
def optimized(fun, *args, argnums=0):
    """The optimized IR function of `jit_grad(fun)` at `args` (no native code)."""
    g = tracejit.jit_grad(fun, argnums=argnums)
    with use_backend("interpreter"):
        g(*args)
    [entry] = g._cache.values()
    return entry.optimized


X = np.linspace(-1, 1, 12).reshape(3, 4)


def test_the_key_follows_the_ir():
    base = optimized(lambda x: (tracejit.tanh(x) * 2.0).sum(), X)
    key = diskcache.key_of(base, 2)
    assert diskcache.key_of(base, 2) == key  # deterministic
    assert diskcache.key_of(optimized(lambda x: (tracejit.tanh(x) * 2.0).sum(), X), 2) == key
    others = [
        optimized(lambda x: (tracejit.tanh(x) * 3.0).sum(), X),            # a constant
        optimized(lambda x: (tracejit.sin(x) * 2.0).sum(), X),             # an op
        optimized(lambda x: (tracejit.tanh(x) * 2.0).sum(), X[:2]),        # a shape
        optimized(lambda x: (tracejit.tanh(x) * 2.0).sum(), X.astype(np.float32)),  # a dtype
    ]
    keys = {key} | {diskcache.key_of(f, 2) for f in others}
    assert len(keys) == 1 + len(others)


def test_the_key_covers_literal_contents_the_printer_abbreviates():
    a, b = np.arange(12.0).reshape(3, 4), np.arange(12.0).reshape(3, 4)
    b[2, 3] += 1e-9
    fa = optimized(lambda x: (x * a).sum(), X)
    fb = optimized(lambda x: (x * b).sum(), X)
    def without_digests(fn):
        return [line for line in diskcache.ir_key_text(fn).splitlines() if "sha256=" not in line]
    assert without_digests(fa) == without_digests(fb)
    assert "dense<float64[3, 4]>" in str(fa)  # the dump does not show the numbers
    assert diskcache.key_of(fa, 1) != diskcache.key_of(fb, 1)


def test_the_key_ignores_provenance_comments():
    def one(x):
        return (x * x).sum()

    def two(x):

        return (x * x).sum()   # the same code on another line

    f1, f2 = optimized(one, X), optimized(two, X)
    assert str(f1).replace("one", "two") != str(f2).replace("one", "two")  # the lines differ
    f2.name = f1.name
    assert diskcache.key_of(f1, 1) == diskcache.key_of(f2, 1)


def test_the_key_covers_threads_version_and_codegen_environment(monkeypatch):
    fn = optimized(lambda x: (x * x).sum(), X)
    key = diskcache.key_of(fn, 2, "tracejit 0.1.0")
    assert diskcache.key_of(fn, 1, "tracejit 0.1.0") != key
    assert diskcache.key_of(fn, 2, "tracejit 0.1.1") != key
    monkeypatch.setenv("TRACEJIT_NO_EPILOGUES", "1")
    assert diskcache.key_of(fn, 2, "tracejit 0.1.0") != key
    monkeypatch.delenv("TRACEJIT_NO_EPILOGUES")
    monkeypatch.setenv("TRACEJIT_CACHE_DIR", "/elsewhere")  # where it is stored is not code
    assert diskcache.key_of(fn, 2, "tracejit 0.1.0") == key
    text = diskcache.key_text(fn, 2, "tracejit 0.1.0")
    for item in ("codegen sources", "llvmlite", "llvm", "cpu", "features", "max_threads 2"):
        assert item in text


def test_the_key_covers_the_kernels_blocking_overrides(monkeypatch):
    from tracejit.codegen.kernels import matmul
    from tracejit.codegen.kernels.conv2d import layout
    fn = optimized(lambda x: (x * x).sum(), X)
    key = diskcache.key_of(fn, 2)
    monkeypatch.setitem(layout.FORCE, "tgrad", False)
    forced = diskcache.key_of(fn, 2)
    monkeypatch.setitem(matmul.FORCE, "pack", "b")
    assert len({key, forced, diskcache.key_of(fn, 2)}) == 3


def test_code_compiled_under_another_override_is_not_linked(cache_dir, avx2_target,
                                                            monkeypatch):
    """A convolution's gradient with the stride-1 input gradient forced to the transposed form,
    then to the core: the core's plan sizes the scratch, so linking the first code (which needs
    more scratch on AVX2) overran the arena and corrupted the heap (an abort in malloc)."""
    from tracejit.codegen.kernels.conv2d import layout
    from test_fuzz_kernels import conv_program
    fn, args, what, _ = conv_program(247)   # f32, 3 output channels, a 1x3 kernel, tanh
    with use_backend("interpreter"):
        want = tracejit.jit_grad(fn, argnums=(0, 1))(*args)
    for force in (True, False):
        monkeypatch.setitem(layout.FORCE, "tgrad", force)
        g = tracejit.jit_grad(fn, argnums=(0, 1))
        got = g(*args)
        assert g.compile_stats()["cache_hits"] == 0, f"tgrad={force}: linked the other's code"
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{what} {force}")


def test_a_codegen_source_change_changes_the_key(monkeypatch):
    fn = optimized(lambda x: (x * x).sum(), X)
    key = diskcache.key_of(fn, 1)
    diskcache._host_and_compiler.cache_clear()
    monkeypatch.setattr(diskcache, "codegen_source_hash", lambda: "0" * 64)
    try:
        assert diskcache.key_of(fn, 1) != key
    finally:
        diskcache._host_and_compiler.cache_clear()


def test_the_suite_cache_is_project_local_and_not_the_users(private_compile_cache, pytestconfig):
    """The tests' shared cache lives under the rootdir's .pytest_cache (git-ignored, kept between
    runs) unless TRACEJIT_TEST_COLD_CACHE asks for an empty temporary one."""
    assert diskcache.default_directory() == private_compile_cache
    assert not str(private_compile_cache).startswith(str(Path.home() / ".cache"))
    if os.environ.get("TRACEJIT_TEST_COLD_CACHE", "").strip() in ("", "0"):
        assert private_compile_cache == pytestconfig.rootpath / ".pytest_cache" / "tracejit-compile"
