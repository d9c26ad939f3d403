"""A clean install: the wheel puts only `tracejit` at the top level of site-packages (ir/ and
codegen/ become tracejit.ir and tracejit.codegen), every package folder of the repository is in
it, and the installed copy computes a native gradient with the user's line in its errors."""
import os
import subprocess
import sys
import textwrap
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_folders():
    """Dotted names of the folders with an __init__.py, as installed."""
    names = []
    for top, installed in (("tracejit", "tracejit"), ("ir", "tracejit.ir"),
                           ("codegen", "tracejit.codegen")):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(d, os.path.join(ROOT, top))
                names.append(installed if rel == "." else
                             installed + "." + rel.replace(os.sep, "."))
    return sorted(names)


def test_every_package_folder_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = tomllib.load(f)["tool"]["setuptools"]["packages"]
    assert sorted(listed) == _package_folders()


def test_the_wheel_installs_only_tracejit(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", str(wheels), ROOT], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("tracejit-*.whl"))
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr
    tops = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert tops == ["tracejit"], tops
    program = textwrap.dedent("""
        import importlib.util, sys
        import numpy as np
        import tracejit
        from tracejit import nn
        assert tracejit.__file__.startswith(sys.argv[1]), tracejit.__file__
        for top in ("ir", "codegen"):   # nothing of the wheel's at the top level
            spec = importlib.util.find_spec(top)
            assert spec is None or not (spec.origin or "").startswith(sys.argv[1]), spec
        import tracejit.codegen, tracejit.ir
        assert tracejit.codegen.__file__.startswith(sys.argv[1])
        tracejit.config.cache = False
        f = tracejit.jit_grad(lambda w, x: nn.max_pool2d(nn.relu(nn.conv2d(x, w, padding=1)), 2).sum())
        g = f(np.ones((2, 1, 3, 3), np.float32), np.ones((1, 1, 4, 4), np.float32))
        assert g.shape == (2, 1, 3, 3) and float(g.sum()) > 0
        try:
            tracejit.jit(lambda x: x.reshape(5))(np.ones(3))
        except tracejit.ShapeError as e:
            assert "(at <string>:" in str(e), e   # the user's line, not a tracejit frame
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", program, str(target)], cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
