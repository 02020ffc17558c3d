"""Test-side helpers around ``distrib.testing.run_local_ranks``, the one way these
tests start ranks that run a function together (in a process group, or on a
store or engine they set up themselves).

Tests that start processes on their own, because starting processes is what
they test or because they act on ranks while those run:

* ``distrib-run`` / ``launcher`` (test_launcher*.py, test_elastic.py,
  test_torchrun*.py, test_multinode*.py, test_hier_netns.py, test_examples_*.py,
  and the env:// test in test_torch_backend.py): the launcher, or the example's
  command line, starts the ranks. (test_launcher_faults.py's misconfigured
  worlds need no launcher and use ``run_local_ranks``.)
* ``distrib.multiprocessing`` and arrays shared across processes (test_mp_*.py,
  test_cpython_multiprocessing.py, test_shm_faults.py, test_shm_strategy.py,
  test_optim_hogwild.py, test_gpu_ipc.py): the processes, and what crosses
  between them, are the subject; nothing joins a store.
* test_store.py (a store client pickled into one child) and test_store_limits.py
  (a store server under a descriptor limit): one helper process, not ranks.
* test_store_rank0.py: the test kills rank 0 while rank 1 waits in the store
  and times the survivor from the kill, so it acts on ranks while they run.
* test_ray.py: the ranks are Ray actors.
"""

from __future__ import annotations

import time
from typing import Any

from distrib.testing import Outcome, RankResult


def rank_values(results: list[RankResult]) -> list[Any]:
    """The ranks' return values, in rank order; fails naming every rank that did not
    return (with its traceback, or how it died)."""
    bad = [r.describe() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return [r.value for r in results]


def by_rank(results: list[RankResult]) -> dict[int, tuple[str, Any]]:
    """``{rank: ("ok", value)}``, or ``("error", what it raised)``, for every rank that
    reported; a rank that died without a report (killed, ``os._exit``) is absent."""
    return {
        r.rank: ("ok", r.value) if r.outcome is Outcome.RETURNED else ("error", r.describe())
        for r in results
        if r.reported
    }


def failure_of(call: Any) -> tuple[str, Any, float] | None:
    """Run ``call()``; ``None`` if it returns, else (exception class name, its ``peer``,
    seconds until it raised): what the fault scenarios report back."""
    start = time.monotonic()
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, getattr(exc, "peer", None), time.monotonic() - start
    return None
