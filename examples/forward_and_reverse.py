"""The lecture notes' example e = (a + b) * (b + 1) at a = 2, b = 1, differentiated both ways.

Forward mode from b carries one tangent up the graph: c = a + b and d = b + 1 both get tangent 1,
and e = c * d gets c.tan * d + c * d.tan = 1 * 2 + 3 * 1 = 5 = de/db. Reverse mode carries one
cotangent down: e.adj = 1, c.adj = d = 2, d.adj = c = 3, so de/da = 2 and de/db = 2 + 3 = 5.
The script prints both IR dumps and writes the graphs (DOT text, and SVG pictures when the
graphviz package and Graphviz's `dot` are installed: pip install 'tracejit[viz]').

    python examples/forward_and_reverse.py [output directory, default: the current directory]
"""
import os
import sys

import numpy as np

import tracejit


def e(a, b):
    c = a + b
    d = b + 1
    return c * d


def main(out_dir="."):
    os.makedirs(out_dir, exist_ok=True)
    a, b = np.array(2.0), np.array(1.0)

    forward = tracejit.jit_jvp(e)
    primals, from_b = (a, b), (np.array(0.0), np.array(1.0))
    value, de_db = forward(primals, from_b)
    print(f"forward mode from b: e = {value}, de/db = {de_db}")
    print(forward.ir(primals, from_b, stage="jvp"))

    reverse = tracejit.jit_value_and_grad(e, argnums=(0, 1))
    value, (de_da, de_db) = reverse(a, b)
    print(f"\nreverse mode: e = {value}, de/da = {de_da}, de/db = {de_db}")
    print(reverse.ir(a, b, stage="grad"))

    pictures = [("forward_mode", forward.graph(primals, from_b, stage="jvp")),
                ("reverse_mode", reverse.graph(a, b, stage="grad"))]
    for name, dot in pictures:
        path = os.path.join(out_dir, f"{name}.dot")
        with open(path, "w") as f:
            f.write(dot)
        print(f"wrote {path}")
    try:
        forward.graph(primals, from_b, stage="jvp", path=os.path.join(out_dir, "forward_mode.svg"))
        reverse.graph(a, b, stage="grad", path=os.path.join(out_dir, "reverse_mode.svg"))
        print(f"wrote {out_dir}/forward_mode.svg and {out_dir}/reverse_mode.svg")
    except ImportError as err:
        print(f"no pictures: {err}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
