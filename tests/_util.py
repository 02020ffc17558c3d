"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

from distrib.testing import free_port

__all__ = ["free_port", "run_benchmark"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with this interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
