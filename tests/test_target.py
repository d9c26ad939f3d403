"""TRACEJIT_TARGET: code compiled for a generic x86-64 level instead of the host's CPU. The
16-register (AVX2) choices of the kernels are tested on any machine through it (the
`avx2_target` fixture), so they must give the same numbers as the host's code and really be
AVX2 code; a level the host lacks is refused before anything runs, and the level is part of the
compile cache's key."""
import re

import numpy as np
import pytest

import tracejit
from tracejit import nn
from tracejit.codegen import settings, target

pytestmark = pytest.mark.needs_llvm


def _loss(x, w, b, v):
    h = nn.relu(nn.conv2d(x, w, b, padding=1))
    return (h.reshape(h.shape[0], -1) @ v).sum() ** 2


def _arrays():
    rng = np.random.default_rng(3)
    return (rng.standard_normal((2, 3, 9, 11)).astype(np.float32),
            rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3,
            rng.standard_normal(16).astype(np.float32),
            rng.standard_normal((16 * 9 * 11, 5)).astype(np.float32) * 0.1)


def test_avx2_level_gives_the_hosts_gradients_with_16_ymm_registers(monkeypatch):
    args = _arrays()
    host = tracejit.jit_grad(_loss, argnums=(1, 2, 3))(*args)
    monkeypatch.setenv("TRACEJIT_TARGET", "avx2")
    assert target.vector_registers() == 16 and target.vector_width(32) == 8
    assert target.host_info()["target"] == "avx2" and not target.host_info()["avx512"]
    g = tracejit.jit_grad(_loss, argnums=(1, 2, 3))
    avx2 = g(*args)
    for a, b in zip(avx2, host):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(np.abs(b).max()))
    asm = g.ir(*args, stage="asm")
    assert re.search(r"%ymm\d+", asm) and not re.search(r"%zmm\d+", asm)


def test_unknown_target_is_a_value_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("TRACEJIT_TARGET", "avx1024")
    with pytest.raises(ValueError, match="TRACEJIT_TARGET must be one of host, avx2, avx512"):
        settings.target()


def test_a_level_the_host_lacks_is_refused(monkeypatch):
    class NoAVX512(dict):
        def flatten(self):
            return ",".join(("+" if v else "-") + k for k, v in self.items())

    monkeypatch.setattr(target.llvm, "get_host_cpu_features",
                        lambda: NoAVX512(avx2=True, fma=True, avx512f=False))
    target._target.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"TRACEJIT_TARGET=avx512: .* lacks avx512f"):
            target._target("avx512")
        assert target._target("avx2")[2]["avx2"]
    finally:
        target._target.cache_clear()


def test_the_target_is_part_of_the_cache_key(monkeypatch):
    monkeypatch.delenv("TRACEJIT_TARGET", raising=False)
    assert not any(e.startswith("TRACEJIT_TARGET=") for e in settings.code_environment())
    monkeypatch.setenv("TRACEJIT_TARGET", "avx2")
    assert "TRACEJIT_TARGET=avx2" in settings.code_environment()
    assert "TRACEJIT_TARGET" not in settings._NOT_KEYED
