"""PyTorch's numbers for the tests, stored in the repository.

PyTorch is a peer we compare with, not a dependency: the test extra does not install it, so a test
that compared with it live would skip in CI. Such tests compare with `tests/golden/torch/<name>.npz`
instead, written by running them once on a machine with torch installed:

    TRACEJIT_UPDATE_TORCH_GOLDEN=1 python -m pytest tests/test_conv_options.py tests/test_scan.py ...

A missing file fails the test (it never skips). The inputs a reference was computed from are
seeded in the test itself, so the stored arrays stay valid while the test is unchanged.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "torch")


def _file(name: str) -> str:
    return os.path.join(GOLDEN, re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".npz")


def torch_reference(name: str, compute) -> dict:
    """The arrays `compute(torch)` returns (a dict of numpy arrays), as stored under `name`; with
    TRACEJIT_UPDATE_TORCH_GOLDEN=1 computes them with torch and stores them first."""
    path = _file(name)
    if os.environ.get("TRACEJIT_UPDATE_TORCH_GOLDEN"):
        import torch
        arrays = {k: np.asarray(v) for k, v in compute(torch).items()}
        os.makedirs(GOLDEN, exist_ok=True)
        np.savez(path, **arrays)
    if not os.path.exists(path):
        pytest.fail(f"no stored PyTorch reference {path}: run this test once with torch installed "
                    f"and TRACEJIT_UPDATE_TORCH_GOLDEN=1")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
