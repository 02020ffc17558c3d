"""The suite's own hygiene check (tests/_hygiene.py) judges only what the suite made.

An inner pytest run with the hygiene plugin: while it runs, a process outside its
tree puts a file and a CUDA driver file in /dev/shm (another program sharing the
machine); the inner run also leaks one named segment and one driver file of its
own. The inner run must blame and remove exactly its own two, and leave the
foreign ones alone.

The /dev/shm entries are directories (with a file inside): suites of older
versions running on the same machine unlink every new top-level *file* in
/dev/shm when they end, which would make this test fail for them, not for us.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHM = "/dev/shm"

INNER = """
import os, subprocess, sys, time

import _hygiene


def _wait_for(path):
    end = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < end, f"no {path}"
        time.sleep(0.02)


def test_another_program_writes_to_dev_shm_meanwhile():
    open(os.environ["INNER_STARTED"], "w").close()
    _wait_for(os.environ["FOREIGN_MADE"])
    _hygiene.scan()  # the watcher looks while the foreign file's process is alive


def test_leaks_of_its_own():
    # a named segment left in the run's private directory ...
    with open(os.path.join(os.environ["DISTRIB_SHM_DIR"], "distrib_0_leaked"), "w"):
        pass
    # ... and the CUDA driver file of a child that ends without removing it
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; d = f'/dev/shm/cuda.shm.0.{os.getpid():x}.{sys.argv[1]}';"
         "os.mkdir(d); open(d + '/data', 'w').close();"
         "print('made', flush=True); sys.stdin.read()",
         os.environ["OWN_TAG"]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline() == "made\\n"
    _hygiene.scan()  # seen while the child is alive: one of ours
    child.communicate(timeout=30)
    print("\\nOWN", f"cuda.shm.0.{child.pid:x}.{os.environ['OWN_TAG']}")
"""

FOREIGN = """
import os, sys
tag = sys.argv[1]
for name in (f"foreign-{tag}", f"cuda.shm.0.{os.getpid():x}.{tag}"):
    os.mkdir(f"/dev/shm/{name}")
    open(f"/dev/shm/{name}/data", "w").close()
print("made", flush=True)
sys.stdin.read()  # alive until told
"""


@pytest.mark.timeout(120)
def test_foreign_dev_shm_files_are_neither_blamed_nor_deleted(tmp_path):
    tag = str(int(uuid.uuid4().hex[:6], 16))  # digits: the driver file's last field
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    started, made = tmp_path / "started", tmp_path / "made"
    env = dict(os.environ, INNER_STARTED=str(started), FOREIGN_MADE=str(made), OWN_TAG=tag)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "_hygiene", "-p", "no:cacheprovider",
         "test_inner.py"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    foreign = None
    foreign_files: list[str] = []
    try:
        end = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < end and inner.poll() is None, "the inner run did not start"
            time.sleep(0.02)
        # Another program (a child of this test, outside the inner run's tree).
        foreign = subprocess.Popen(
            [sys.executable, "-c", FOREIGN, tag],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert foreign.stdout is not None and foreign.stdout.readline() == "made\n"
        foreign_files = [f"foreign-{tag}", f"cuda.shm.0.{foreign.pid:x}.{tag}"]
        made.touch()
        out, _ = inner.communicate(timeout=90)
        own = [line.split()[1] for line in out.splitlines() if line.startswith("OWN ")]
        assert len(own) == 1, out
        # Its own leaks are blamed and removed ...
        assert inner.returncode == 1 and "HYGIENE FAILURE" in out, out
        assert "distrib_0_leaked" in out and own[0] in out, out
        assert not os.path.exists(os.path.join(SHM, own[0]))
        # ... the other program's files are neither blamed nor deleted.
        for name in foreign_files:
            assert name not in out, out
            assert os.path.exists(os.path.join(SHM, name, "data")), f"{name} was deleted"
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.communicate(timeout=30)
        if foreign is not None:
            foreign.communicate(input="", timeout=30)
        for name in os.listdir(SHM):  # what this test's processes made (by the unique tag)
            if name == f"foreign-{tag}" or (name.startswith("cuda.shm.") and name.endswith(tag)):
                shutil.rmtree(os.path.join(SHM, name), ignore_errors=True)
