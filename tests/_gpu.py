"""The GPU tests' common gate: cupy and a visible CUDA device, or a module-level skip."""

from __future__ import annotations

from typing import Any

import pytest


def cupy_or_skip() -> Any:
    """Return the cupy module, or skip the calling test module with the reason."""
    try:
        import cupy
    except ImportError as exc:
        pytest.skip(f"needs cupy ({exc})", allow_module_level=True)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        pytest.skip(f"needs a CUDA device ({exc})", allow_module_level=True)
    if count < 1:
        pytest.skip("needs a CUDA device (none visible)", allow_module_level=True)
    return cupy
