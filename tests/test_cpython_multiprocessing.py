"""CPython's own multiprocessing suite, with ``multiprocessing`` resolving to
``distrib.multiprocessing`` in every process, under fork, spawn and forkserver.

The three start methods run at once (each is mostly waiting on its children),
every test of each runs. A test that fails is run again alone, first with
distrib (a failure must reproduce) and then with the standard module: the test
fails if distrib fails anything the standard module passes on this machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests", "cpython_mp")
ALIAS = os.path.join(HERE, "alias")
METHODS = ("fork", "spawn", "forkserver")
SUITE_TIMEOUT_S = 720

if importlib.util.find_spec("test._test_multiprocessing") is None:
    pytest.skip(
        "this Python has no test._test_multiprocessing (CPython's test package: on Debian "
        "and Ubuntu install libpython3.X-testsuite)",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * SUITE_TIMEOUT_S)]


def _start(method: str, out: str, alias: bool, ids: list[str], log: str) -> subprocess.Popen:
    path = ([ALIAS] if alias else []) + [HERE, ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, os.path.join(HERE, "run_suite.py"), method, out, *ids],
            env=env,
            cwd=os.path.dirname(out),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(procs: dict[str, subprocess.Popen], outs: dict[str, str]) -> dict[str, dict]:
    deadline = time.monotonic() + SUITE_TIMEOUT_S
    results = {}
    for method, proc in procs.items():
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
            pytest.fail(f"CPython's suite under {method} did not finish in {SUITE_TIMEOUT_S} s")
        with open(outs[method]) as f:
            results[method] = json.load(f)
    return results


def _run_all(tmp_path, alias: bool, ids: dict[str, list[str]] | None = None) -> dict[str, dict]:
    procs, outs = {}, {}
    for method in METHODS:
        if ids is not None and not ids.get(method):
            continue
        work = tmp_path / f"{method}-{'distrib' if alias else 'stdlib'}-{len(ids or {})}"
        work.mkdir()
        outs[method] = str(work / "outcomes.json")
        log = str(work / "log.txt")
        procs[method] = _start(method, outs[method], alias, (ids or {}).get(method, []), log)
    return _finish(procs, outs)


def _failed(result: dict) -> list[str]:
    return sorted(t for t, o in result["outcomes"].items() if o in ("failed", "error"))


def test_cpython_multiprocessing_suite(tmp_path):
    full = _run_all(tmp_path, alias=True)
    counts = {}
    for method, result in full.items():
        assert result["multiprocessing"] == ["distrib.multiprocessing"] * 2, result
        outcomes = result["outcomes"]
        assert len(outcomes) >= result["loaded"] > 300, (method, result["loaded"])
        counts[method] = {o: list(outcomes.values()).count(o) for o in set(outcomes.values())}
    print("distrib under CPython's suite:", json.dumps(counts, sort_keys=True))
    for method, result in full.items():  # where the time went, when CI gets slow
        slowest = sorted(result["seconds"].items(), key=lambda kv: -kv[1])[:5]
        print(
            f"slowest under {method}:", ", ".join(f"{t.split('.', 1)[1]} {s} s" for t, s in slowest)
        )
    # Reproduce each failure alone with distrib, then ask the standard module.
    again = _run_all(tmp_path, alias=True, ids={m: _failed(r) for m, r in full.items()})
    stuck = {m: _failed(r) for m, r in again.items()}
    stdlib = _run_all(tmp_path, alias=False, ids=stuck)
    regressions = {
        m: [t for t in stuck[m] if r["outcomes"].get(t) == "passed"] for m, r in stdlib.items()
    }
    regressions = {m: ts for m, ts in regressions.items() if ts}
    assert not regressions, f"distrib fails tests the standard module passes: {regressions}"
