"""distrib.multiprocessing behaves as the standard module where CPython's suite looks:
children know their own start method, one default start method with the stdlib, the
feeder thread pickles (once), the stdlib's submodules are ours, and the documented
semantics of a private array sent through a queue."""

from __future__ import annotations

import multiprocessing as std_mp
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import distrib.multiprocessing as mp
import distrib.shm as shm
from distrib.multiprocessing._impl import _queues as mp_queues

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIAS = os.path.join(ROOT, "tests", "cpython_mp", "alias")
WAIT_S = 30


def _run(tmp_path, code: str, alias: bool = False) -> str:
    """Run ``code`` as a script in a fresh interpreter (start methods are process-wide)."""
    path = [ALIAS, ROOT] if alias else [ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_children_answer_their_own_start_method(tmp_path):
    out = _run(
        tmp_path,
        """
        import distrib.multiprocessing as mp

        def grandchild(q):
            q.put(("grandchild", mp.get_start_method()))

        def child(q):
            q.put(("child", mp.get_start_method()))
            # a Process, Queue and Pool made inside the worker use the worker's method
            p = mp.Process(target=grandchild, args=(q,))
            p.start(); p.join(30)
            inner = mp.Queue(); inner.put([1, 2]); q.put(("queue", inner.get(timeout=30)))
            with mp.Pool(1) as pool:
                q.put(("pool", pool.apply(mp.get_start_method)))

        if __name__ == "__main__":
            mp.set_start_method("fork")
            for method in ("spawn", "forkserver", "fork"):
                q = mp.get_context(method).Queue()
                p = mp.get_context(method).Process(target=child, args=(q,))
                p.start()
                got = dict(q.get(timeout=60) for _ in range(4))
                p.join(60)
                print(method, got["child"], got["grandchild"], got["pool"], got["queue"])
            mp.set_start_method("spawn", force=True)
            p = mp.get_context("fork").Process(target=child, args=(q,))
            q = mp.get_context("fork").Queue()
            p = mp.get_context("fork").Process(target=child, args=(q,))
            p.start(); got = dict(q.get(timeout=60) for _ in range(4)); p.join(60)
            print("fork-under-spawn", got["child"], got["grandchild"], got["pool"])
        """,
    )
    lines = out.split("\n")
    assert lines[0] == "spawn spawn spawn spawn [1, 2]"
    assert lines[1] == "forkserver forkserver forkserver forkserver [1, 2]"
    assert lines[2] == "fork fork fork fork [1, 2]"
    assert lines[3] == "fork-under-spawn fork fork fork"


def test_one_default_start_method_with_the_stdlib(tmp_path):
    out = _run(
        tmp_path,
        """
        import multiprocessing, multiprocessing.sharedctypes as sc
        import concurrent.futures as cf
        import distrib.multiprocessing as mp

        def bump(v):
            with v.get_lock():
                v.value += 1

        def whoami():
            return multiprocessing.get_start_method()

        if __name__ == "__main__":
            print(mp.get_start_method(allow_none=True), multiprocessing.get_start_method(allow_none=True))
            mp.set_start_method("spawn")
            print(multiprocessing.get_start_method(), type(mp.get_context()).__name__)
            try:
                mp.set_start_method("fork")
            except RuntimeError as exc:
                print("refused:", exc)
            v = sc.Value("i", 0, lock=True)  # a stdlib helper, on the stdlib's default
            p = mp.Process(target=bump, args=(v,))
            p.start(); p.join(30)
            print("value", v.value, p.exitcode)
            with multiprocessing.Manager() as m:
                lock = m.Lock()
                print("manager", type(lock).__name__)
            with cf.ProcessPoolExecutor(1) as ex:
                print("executor", ex.submit(whoami).result(timeout=60))
            multiprocessing.set_start_method("forkserver", force=True)
            print(mp.get_start_method(), type(mp.get_context()).__name__)
            try:
                mp.set_start_method("carrier-pigeon", force=True)
            except ValueError as exc:
                print("bad:", exc)
        """,
    )
    lines = out.strip().split("\n")
    assert lines[0] == "None None"
    assert lines[1] == "spawn SpawnContext"
    assert lines[2] == "refused: context has already been set"
    assert lines[3] == "value 1 0"
    assert lines[4] == "manager AcquirerProxy"
    assert lines[5] == "executor spawn"
    assert lines[6] == "forkserver ForkServerContext"
    assert lines[7].startswith("bad: cannot find context for 'carrier-pigeon'")


class _Recorder:
    """Records on which thread, and how often, it was pickled."""

    def __init__(self, log):
        self.log = log

    def __reduce__(self):
        self.log.append(threading.current_thread().name)
        return (int, (42,))


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("cannot pickle _Unpicklable on purpose")


@pytest.mark.parametrize("cls", [mp.Queue, mp.JoinableQueue])
def test_put_pickles_once_in_the_feeder_thread(cls):
    q = cls()
    log: list[str] = []
    try:
        q.put(_Recorder(log))
        assert q.get(timeout=WAIT_S) == 42
        assert log == ["QueueFeederThread"]  # not the caller's thread, and only once
    finally:
        q.close()
        q.join_thread()


def test_unpicklable_item_is_reported_by_the_feeder():
    reported: list[tuple[str, object]] = []

    class Q(mp_queues.Queue):
        @staticmethod
        def _on_queue_feeder_error(e, obj):
            reported.append((str(e), obj))

    q = Q(ctx=mp.get_context())
    bad = _Unpicklable()
    try:
        q.put(bad)  # does not raise here, as with the stdlib
        big = np.arange(100_000.0)  # 800 KB: travels as shared memory after the failure
        q.put(big)
        got = q.get(timeout=WAIT_S)
        assert shm.is_shared(got) and (got == big).all()
        assert reported == [("cannot pickle _Unpicklable on purpose", bad)]
    finally:
        q.close()
        q.join_thread()


def test_stdlib_submodules_are_ours():
    import importlib

    for name in ("connection", "managers", "pool", "util", "shared_memory", "sharedctypes",
                 "synchronize", "queues", "process", "context", "reduction", "heap", "dummy",
                 "popen_fork", "popen_spawn_posix", "popen_forkserver", "forkserver",
                 "resource_tracker", "resource_sharer"):  # fmt: skip
        stdlib = importlib.import_module(f"multiprocessing.{name}")
        assert importlib.import_module(f"distrib.multiprocessing.{name}") is stdlib, name
        assert getattr(mp, name) is stdlib, name
    import distrib.multiprocessing.dummy.connection as dc

    assert dc is importlib.import_module("multiprocessing.dummy.connection")
    assert callable(mp.spawn)  # torch's spawn, not the stdlib submodule
    assert sys.modules["distrib.multiprocessing.spawn"] is importlib.import_module(
        "multiprocessing.spawn"
    )


def test_sharing_survives_submodule_imports_under_the_alias(tmp_path):
    out = _run(
        tmp_path,
        """
        import sys, numpy as np
        import multiprocessing
        import multiprocessing.connection, multiprocessing.managers, multiprocessing.pool
        import multiprocessing.dummy, multiprocessing.shared_memory
        from multiprocessing import util, reduction
        import distrib.multiprocessing, distrib.shm as shm

        def child(q):
            a = q.get(timeout=30)
            q.put(shm.is_shared(a))

        if __name__ == "__main__":
            print(multiprocessing is distrib.multiprocessing, multiprocessing.__name__)
            print(multiprocessing.connection is sys.modules["multiprocessing.connection"])
            q = multiprocessing.get_context("spawn").Queue()
            p = multiprocessing.get_context("spawn").Process(target=child, args=(q,))
            p.start()
            q.put(np.ones(1 << 18))
            p.join(60)
            print(q.get(timeout=30), p.exitcode)
        """,
        alias=True,
    )
    assert out.split("\n")[:3] == ["True distrib.multiprocessing", "True", "True 0"]


def _write_back(q, done):
    arr = q.get(timeout=WAIT_S)
    arr[:] = 7
    done.put(shm.is_shared(arr))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_private_array_sender_stays_private_unless_shared_first(method):
    ctx = mp.get_context(method)
    q, done = ctx.Queue(), ctx.Queue()
    private = np.zeros(1 << 16)  # 512 KiB: over the inline threshold
    p = ctx.Process(target=_write_back, args=(q, done))
    p.start()
    q.put(private)
    assert done.get(timeout=WAIT_S) is True  # the receiver got shared memory ...
    p.join(WAIT_S)
    assert (private == 0).all()  # ... a copy: the sender's array stays private
    moved = shm.share(private)  # the explicit move torch users know as share_memory_()
    p = ctx.Process(target=_write_back, args=(q, done))
    p.start()
    q.put(moved)
    assert done.get(timeout=WAIT_S) is True
    p.join(WAIT_S)
    assert (moved == 7).all()  # writes are seen both ways
    for queue_ in (q, done):
        queue_.close()
        queue_.join_thread()


def test_stdlib_queue_is_left_alone():
    q = std_mp.Queue()
    try:
        q.put(np.ones(1 << 18))
        assert not shm.is_shared(q.get(timeout=WAIT_S))
    finally:
        q.close()
        q.join_thread()
