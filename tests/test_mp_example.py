"""The README demo (examples/hogwild_shared.py) runs and learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hogwild_shared.py"


@pytest.mark.timeout(90)
def test_hogwild_example_learns():
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the examples extra)")
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workers", "3", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert res.returncode == 0, res.stderr
    before = float(re.search(r"before training: test accuracy ([\d.]+)", res.stdout).group(1))
    final = float(re.search(r"final test accuracy: ([\d.]+)", res.stdout).group(1))
    assert before < 0.3 and final >= 0.9, res.stdout
