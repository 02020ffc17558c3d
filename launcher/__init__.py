"""distrib-run: start, watch, restart and report on the workers of a distributed job.

``distrib-run --nproc 4 train.py`` (or ``python -m launcher``) is the command-line
face; ``LaunchOptions`` plus ``launch()`` do the same from Python. Names load
lazily so that the worker bootstrap (``python -m launcher._bootstrap``) starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LaunchOptions", "launch", "main"]

_LAZY = {
    "LaunchOptions": "launcher._options",
    "launch": "launcher._launch",
    "main": "launcher._cli",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
