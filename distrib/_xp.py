"""numpy or cupy: which array library owns an array, without importing cupy.

cupy is optional; an array can only be a cupy array if cupy was imported, so
these checks never import it themselves.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["is_cupy", "xp_of"]


def is_cupy(obj: Any) -> bool:
    """True for a cupy ndarray (or anything from the cupy package, e.g. a view)."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and type(obj).__module__.split(".", 1)[0] == "cupy"


def xp_of(array: Any) -> Any:
    """numpy or cupy, whichever owns ``array``."""
    return sys.modules["cupy"] if is_cupy(array) else np
