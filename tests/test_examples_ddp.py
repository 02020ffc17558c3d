"""The data-parallel examples (digits, torch interop) learn and match single-process runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
PEER_PYTHON = "/opt/peers/bin/python"


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


# ---------------------------------------------------------------- DDP on digits


def _digits(tmp_path, tag: str, launcher: list[str], extra: list[str]) -> tuple[float, dict]:
    out = tmp_path / f"{tag}.npz"
    proc = _run(
        [*launcher, os.path.join(EXAMPLES, "ddp_digits.py"), "--save", str(out), "--no-plot",
         "--no-progress", *extra],
        timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"{tag}: rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    m = re.search(r"test accuracy: ([\d.]+)", proc.stdout)
    assert m, proc.stdout
    with np.load(out) as f:
        return float(m.group(1)), {k: f[k] for k in f.files}


def _launcher_nproc4() -> list[str]:
    exe = shutil.which("distrib-run")
    if exe is not None:
        return [exe, "--nproc", "4"]
    return [sys.executable]  # fallback: the example spawns its own ranks (--nproc 4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_digits_one_rank_batch_b_equals_four_ranks_batch_b_over_4(tmp_path):
    launcher = _launcher_nproc4()
    four_args = ["--batch-size", "64"] + (["--nproc", "4"] if launcher == [sys.executable] else [])
    acc1, p1 = _digits(tmp_path, "one", [sys.executable], ["--nproc", "1", "--batch-size", "64"])
    acc4, p4 = _digits(tmp_path, "four", launcher, four_args)
    assert acc1 >= 0.95 and acc4 >= 0.95, (acc1, acc4)
    assert p1.keys() == p4.keys()
    for k in p1:
        np.testing.assert_allclose(p4[k], p1[k], rtol=1e-7, atol=1e-9, err_msg=k)
    assert abs(acc1 - acc4) < 1e-9


# ---------------------------------------------------------------- torch interop


@pytest.mark.timeout(240)
def test_torch_model_trained_through_distrib_ddp(tmp_path):
    """A torch model's .numpy() views go through distrib DDP; matches single-process torch."""
    try:
        import torch  # noqa: F401

        python, env = sys.executable, None
    except ImportError:
        if not os.path.exists(PEER_PYTHON):
            pytest.skip(f"torch is not installed here and there is no {PEER_PYTHON}")
        # The peer virtualenv has torch but maybe not our dependencies: expose this
        # interpreter's (compiled, so only to the same Python version).
        import msgpack
        import zmq

        probe = "import sys; print('%d.%d' % sys.version_info[:2])"
        peer_version = _run([PEER_PYTHON, "-c", probe], timeout=60).stdout.strip()
        path = [REPO]
        if _run([PEER_PYTHON, "-c", "import zmq, msgpack"], timeout=60).returncode != 0:
            if peer_version != f"{sys.version_info[0]}.{sys.version_info[1]}":
                pytest.skip(
                    f"{PEER_PYTHON} (Python {peer_version}) has torch but no pyzmq/msgpack, "
                    f"and this Python {sys.version_info[0]}.{sys.version_info[1]}'s compiled "
                    "pyzmq cannot load there"
                )
            shim = tmp_path / "shim"
            shim.mkdir()
            for mod in (zmq, msgpack):
                pkg = os.path.dirname(mod.__file__)
                os.symlink(pkg, shim / os.path.basename(pkg))
            libs = os.path.join(os.path.dirname(os.path.dirname(zmq.__file__)), "pyzmq.libs")
            if os.path.isdir(libs):
                os.symlink(libs, shim / "pyzmq.libs")
            path.insert(0, str(shim))
        python = PEER_PYTHON
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = _run(
        [python, os.path.join(EXAMPLES, "torch_ddp_interop.py"), "--nproc", "2", "--steps", "20"], timeout=200,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m = re.search(r"max \|param difference\| = (\S+)", proc.stdout)
    assert m and float(m.group(1)) <= 1e-9, proc.stdout
