"""What one call into compiled code costs from Python: ctypes against an extension.

Why the small all-reduce is a CPython extension (``distrib/transport/shm/_oneshot.c``)
while the large all-reduce's step (``_native.c``, one call per 128 KiB or more) is
loaded with ctypes. Both real functions are called with arguments that make them
return at once, so the table shows the cost of crossing into C and back.

    python benchmarks/bench_call_cost.py
"""

from __future__ import annotations

import platform
import timeit
from types import SimpleNamespace

import numpy as np

from distrib._machine import machine
from distrib.transport.shm import _native

CALLS = 200_000


def _per_call_us(fn: object) -> float:
    best = min(timeit.repeat(fn, number=CALLS, repeat=5))  # type: ignore[arg-type]
    return best / CALLS * 1e6


def main() -> None:
    from distrib.transport.shm import _oneshot

    x = np.ones(1024, np.float32)
    rows = [("Python: a lambda that returns None", _per_call_us(lambda: None))]

    one = _oneshot.OneShot(SimpleNamespace(step=0), 0, (0, 0), (0, 0), 0, 4096, 0, 0)
    one.close()  # every step now returns CLOSED at once
    step = one.step
    rows.append(("extension (METH_FASTCALL), 5 args", _per_call_us(lambda: step(0, x, 0, 1, True))))

    fn = _native.load()
    if fn is not None:
        null = None
        # dtype -1: the C step rejects it before touching anything
        rows.append(
            (
                "ctypes, 15 args (addresses precomputed)",
                _per_call_us(
                    lambda: fn(0, -1, 0, null, null, 0, 4, 2, 0, null, null, 0, 0, 0, null)
                ),
            )
        )
        rows.append(
            (
                "ctypes, 15 args, array address per call",
                _per_call_us(
                    lambda: fn(0, -1, 0, x.ctypes.data, null, 0, 4, 2, 0, null, null, 0, 0, 0, null)
                ),
            )
        )
    m = machine()
    print(f"# machine: {m.cpu_model}, {m.usable_cores} usable cores")
    print(f"# python {platform.python_version()}, numpy {np.__version__}; best of 5 x {CALLS}")
    print(f"{'call':45} {'us per call':>12}")
    for name, us in rows:
        print(f"{name:45} {us:12.3f}")


if __name__ == "__main__":
    main()
