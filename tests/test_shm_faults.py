"""Failure modes of shared memory: dead senders, kill -9, fd limits, full memory, volume."""

from __future__ import annotations

import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

import distrib.multiprocessing as mp
import distrib.shm as shm
from distrib import ShmFdLimitError, ShmOutOfMemoryError
from distrib.shm import _arena

pytestmark = pytest.mark.timeout(90)
WAIT_S = 30


@pytest.fixture
def strategy():
    """Restore this process's sharing strategy after a test changes it."""
    before = shm.get_sharing_strategy()
    yield shm.set_sharing_strategy
    shm.set_sharing_strategy(before)


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


# -- the receiver does not depend on the sender --------------------------------
def _send_then_exit(q, kind):
    shm.set_sharing_strategy(kind)
    q.put(shm.full((500, 500), 3.0))  # shared, its only owner is about to die
    q.put(np.full(300_000, 5.0))  # private: copied into shared memory, then gone
    q.put(shm.full(10, 7.0))  # arena slot
    q.close()
    q.join_thread()


@pytest.mark.parametrize("kind", ["file_descriptor", "file_system"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_receiver_attaches_after_sender_exited(method, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRIB_SHM_DIR", str(tmp_path))
    ctx = mp.get_context(method)
    q = ctx.Queue()
    proc = ctx.Process(target=_send_then_exit, args=(q, kind))
    proc.start()
    proc.join(WAIT_S)
    assert proc.exitcode == 0  # the sender is gone before anything is unpickled
    big, private, small = (q.get(timeout=WAIT_S) for _ in range(3))
    assert shm.is_shared(big) and (big == 3.0).all()
    assert shm.is_shared(private) and (private == 5.0).all()
    assert (small == 7.0).all()
    big[:] = 1  # still writable memory, not a dead mapping
    del big, private, small
    if kind == "file_system":
        _wait_until(lambda: not os.listdir(tmp_path), 15, "named segments to be unlinked")


# -- kill -9 the moment a named file exists: the daemon already knows its name --
_KILLED_WHILE_CREATING = textwrap.dedent(
    """
    import os, signal
    import distrib.shm as shm
    from distrib.shm import _client

    shm.set_sharing_strategy("file_system")
    first = shm.zeros(1_000_000)  # starts the daemon
    print(_client._current().spawned[0], flush=True)
    real_open = os.open

    def open_then_die(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT and os.path.basename(path).startswith("distrib_"):
            os.kill(os.getpid(), signal.SIGKILL)  # before create_segment's next line
        return fd

    os.open = open_then_die
    shm.zeros(1_000_000)
    """
)


def test_kill_9_right_after_a_named_file_is_created_leaves_nothing(tmp_path):
    env = dict(os.environ, DISTRIB_SHM_DIR=str(tmp_path))
    job = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WHILE_CREATING],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        daemon = psutil.Process(int(job.stdout.readline()))
        assert job.wait(WAIT_S) == -signal.SIGKILL
        _wait_until(lambda: not os.listdir(tmp_path), 20, "named segments to be unlinked")
        _wait_until(lambda: not daemon.is_running(), 30, "the cleanup daemon to exit")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(WAIT_S)
        job.stdout.close()


_NAME_TAKEN = textwrap.dedent(
    """
    import os, sys
    import distrib.shm as shm
    from distrib import ShmError
    from distrib.shm import _client, _segment

    shm.set_sharing_strategy("file_system")
    shm.zeros(1_000_000)  # starts the daemon
    print(_client._current().spawned[0], flush=True)
    _segment.secrets.token_hex = lambda n: "ab" * n  # the next name is known...
    taken = os.path.join(sys.argv[1], f"distrib_{os.getpid()}_" + "ab" * 12)
    with open(taken, "w") as f:  # ...and already somebody else's
        f.write("not ours")
    try:
        shm.zeros(1_000_000)
    except ShmError as exc:
        print("refused:", exc, flush=True)
    """
)


def test_a_name_already_taken_is_refused_and_left_alone(tmp_path):
    env = dict(os.environ, DISTRIB_SHM_DIR=str(tmp_path))
    job = subprocess.run(
        [sys.executable, "-c", _NAME_TAKEN, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert job.returncode == 0, job.stderr
    daemon_pid, refused = job.stdout.splitlines()
    assert (
        refused.startswith("refused: cannot create shared-memory file") and "File exists" in refused
    )
    _wait_until(lambda: not psutil.pid_exists(int(daemon_pid)), 30, "the cleanup daemon to exit")
    (left,) = os.listdir(tmp_path)  # our own segment is gone, the other file stays
    assert (tmp_path / left).read_text() == "not ours"


# -- kill -9 of everything: the cleanup daemon unlinks -------------------------
_KILLED_JOB = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import distrib.multiprocessing as mp
    import distrib.shm as shm
    from distrib.shm import _client

    def child(q, ready):
        arr = q.get()
        arr[0] = 1
        ready.set()
        time.sleep(60)

    if __name__ == "__main__":
        _client.ORPHAN_GRACE_S = 1.0  # the daemon gives up on the orphaned handle sooner
        shm.set_sharing_strategy(sys.argv[1])
        ctx = mp.get_context("fork")
        q, ready = ctx.Queue(), ctx.Event()
        keep = [shm.zeros(1_000_000), shm.zeros(10), shm.zeros(50_000)]
        proc = ctx.Process(target=child, args=(q, ready))
        proc.start()
        q.put(keep[0])
        q.put(np.ones(200_000))  # in flight forever: nobody reads it
        assert ready.wait(30)
        print(_client._current().spawned[0], flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("kind", ["file_system", "file_descriptor"])
def test_cleanup_daemon_frees_everything_after_kill_9_of_the_job(kind, tmp_path):
    env = dict(os.environ, DISTRIB_SHM_DIR=str(tmp_path))
    job = subprocess.Popen(
        [sys.executable, "-c", _KILLED_JOB, kind],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,  # its own process group, so we can kill all of it
    )
    try:
        line = job.stdout.readline()
        assert line.strip(), "the job did not start"
        daemon = psutil.Process(int(line))
        assert "distrib.shm._cleanup" in " ".join(daemon.cmdline())
        assert daemon.pid != job.pid and os.getsid(daemon.pid) != os.getsid(job.pid)
        if kind == "file_system":
            assert len(os.listdir(tmp_path)) >= 3
        os.killpg(job.pid, signal.SIGKILL)  # parent and child; the daemon survives
        job.wait(WAIT_S)
        if kind == "file_system":
            _wait_until(lambda: not os.listdir(tmp_path), 20, "named segments to be unlinked")
        else:
            assert not os.listdir(tmp_path)  # anonymous memory never had a name
        # The daemon exits after the grace period for the orphaned in-flight handle.
        _wait_until(
            lambda: not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE,
            30,
            "the cleanup daemon to exit",
        )
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(WAIT_S)
        job.stdout.close()


# -- a receiver at its open-file limit -----------------------------------------
def _receive_at_fd_limit(q, conn):
    first = q.get()  # connects to the daemon and raises the soft limit once
    fds = [int(n) for n in os.listdir("/proc/self/fd")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 8, hard))
    filler = []
    try:
        while True:
            filler.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass  # now at the limit
    try:
        q.get()
        outcome = "no error"
    except ShmFdLimitError as exc:
        outcome = f"ShmFdLimitError: {exc}"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    for fd in filler:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    conn.send((outcome, float(first[0])))


def test_receiver_at_fd_limit_gets_a_clear_error():
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_receive_at_fd_limit, args=(q, there))
    proc.start()
    q.put(shm.full(100_000, 2.0))
    q.put(shm.full(100_000, 3.0))  # a second segment: needs a new descriptor
    assert here.poll(WAIT_S)
    outcome, first = here.recv()
    proc.join(WAIT_S)
    assert first == 2.0
    assert outcome.startswith("ShmFdLimitError"), outcome
    assert "open-file limit" in outcome and "RLIMIT_NOFILE" in outcome


_CREATE_AT_LIMIT = """
import os, resource, sys
import distrib.shm as shm
from distrib import ShmFdLimitError
from distrib.shm import _arena

shm.set_sharing_strategy(sys.argv[1])
keep = [shm.zeros(10)]  # first use: the soft limit is raised (once), helpers connected
size = _arena.ARENA_MAX_BYTES // 8 + 1  # above the arena: one segment per array
before = len(os.listdir("/proc/self/fd"))
keep += [shm.zeros(size) for _ in range(8)]
print("PER_SEGMENT", (len(os.listdir("/proc/self/fd")) - before) / 8)
open_fds = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself used
limit = open_fds + int(sys.argv[2])  # exactly that many descriptors free
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    for _ in range(1000):
        keep.append(shm.zeros(size))
    print("NO ERROR")
except ShmFdLimitError as exc:
    print("ERROR", exc)
    if sys.argv[1] == "file_system":  # no name outlives a failed creation
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit + 8, hard))  # room to list
        mine = [n for n in os.listdir(os.environ["DISTRIB_SHM_DIR"])
                if n.startswith(f"distrib_{os.getpid()}_")]
        live = {id(shm._array.block_of(a).segment) for a in keep}
        print("NAMES", len(mine) == len(live))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    del keep[-5:]  # freeing arrays gives the descriptors back: creating works again
    keep.append(shm.full(size, 7.0))
    print("AFTER", float(keep[-1][0]), float(keep[1].sum()))
print("LIMIT", limit)
"""


@pytest.mark.parametrize("kind", ["file_descriptor", "file_system"])
@pytest.mark.parametrize(
    ("slack", "when"), [(40, "creating"), (41, "mapping")], ids=["at-create", "at-map"]
)
def test_creating_arrays_at_the_fd_limit_is_shm_fd_limit_error(kind, slack, when):
    # 20 segments of two descriptors fill the slack; then the next segment's first
    # descriptor (the memfd or file) or its second (the mapping's) is refused.
    out = subprocess.run(
        [sys.executable, "-c", _CREATE_AT_LIMIT, kind, str(slack)],
        capture_output=True, text=True, timeout=WAIT_S * 2,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    # docs/shm.md: each live segment costs a process two descriptors
    assert float(lines["PER_SEGMENT"]) == 2.0, out.stdout
    msg = lines.get("ERROR", "")
    assert "out of file descriptors" in msg and f"RLIMIT_NOFILE soft={lines['LIMIT']}" in msg
    assert "ulimit -n" in msg and f"while {when} " in msg, msg
    assert lines["AFTER"] == "7.0 0.0", out.stdout
    assert lines.get("NAMES", "True") == "True", out.stdout


def test_soft_fd_limit_is_raised_on_first_use():
    code = (
        "import resource, distrib.shm as shm;"
        "s, h = resource.getrlimit(resource.RLIMIT_NOFILE);"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, h));"
        "shm.zeros(100_000);"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == h)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


# -- out of shared memory: a clear error at allocation, never SIGBUS -----------
def test_anonymous_memory_exhaustion_is_reported_at_allocation():
    too_much = psutil.virtual_memory().total + psutil.swap_memory().total + (1 << 30)
    with pytest.raises(ShmOutOfMemoryError) as info:
        shm.empty(too_much, dtype=np.uint8)
    msg = str(info.value)
    assert str(too_much) in msg and "available" in msg
    assert isinstance(info.value, MemoryError)


def test_full_named_directory_names_size_free_space_and_fix(tmp_path, monkeypatch, strategy):
    monkeypatch.setenv("DISTRIB_SHM_DIR", str(tmp_path))
    strategy("file_system")
    too_much = shutil.disk_usage(tmp_path).free + (1 << 30)
    with pytest.raises(ShmOutOfMemoryError) as info:
        shm.empty(too_much, dtype=np.uint8)
    msg = str(info.value)
    assert str(too_much) in msg and str(tmp_path) in msg and "free" in msg
    assert "--shm-size" in msg and "--ipc=host" in msg
    assert not os.listdir(tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs, like a container's too-small /dev/shm (needs root)."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_small_tmpfs_fills_up_with_an_error_not_sigbus(small_tmpfs, monkeypatch, strategy):
    monkeypatch.setenv("DISTRIB_SHM_DIR", str(small_tmpfs))
    strategy("file_system")
    first = shm.zeros(5 << 20, dtype=np.uint8)  # 5 MiB: fits
    with pytest.raises(ShmOutOfMemoryError, match="--shm-size") as info:
        shm.zeros(5 << 20, dtype=np.uint8)
    assert str(5 << 20) in str(info.value)
    first[:] = 1  # every page of what we got is really there
    assert int(first.sum()) == 5 << 20
    del first
    _wait_until(lambda: not os.listdir(small_tmpfs), 15, "the segments to be unlinked")


# -- volume --------------------------------------------------------------------
def _add_one_to_all(q, out):
    arrays = q.get()
    for a in arrays:
        a += 1
    out.put(len(arrays))


def test_thousands_of_arrays_in_flight():
    ctx = mp.get_context("fork")
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_drain, args=(q, out, 2000))
    proc.start()
    size = _arena.ARENA_MAX_BYTES // 8 + 1  # above the arena: one segment each
    sent = [shm.full(size, float(i)) for i in range(1000)]
    for a in sent:  # 1000 shared segments and 1000 private copies, all queued at once
        q.put(a)
        q.put(np.full(20_000, 1.0))  # 160 KB: above the inline threshold
    assert out.get(timeout=WAIT_S) == sum(range(1000)) * size + 1000 * 20_000
    proc.join(WAIT_S)
    assert proc.exitcode == 0


def _drain(q, out, n):
    total = 0.0
    for _ in range(n):
        total += float(q.get().sum())
    out.put(total)


def _hundred_thousand(out):
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # a default soft limit
    ctx = mp.get_context("fork")
    q, back = ctx.Queue(), ctx.Queue()
    fds_before = len(os.listdir("/proc/self/fd"))
    arrays = [shm.zeros(4) for _ in range(100_000)]
    segments = len({id(shm._array.block_of(a).segment) for a in arrays})
    fds_arrays = len(os.listdir("/proc/self/fd")) - fds_before
    proc = ctx.Process(target=_add_one_to_all, args=(q, back))
    proc.start()
    q.put(arrays)
    n = _result_of(proc, back, SLOW_S)
    proc.join(SLOW_S)
    ok = n == 100_000 and all(float(a[0]) == 1.0 for a in arrays)
    out.put((ok, len(os.listdir("/proc/self/fd")), segments, fds_arrays))


def _result_of(proc, q, limit_s):
    """What ``proc`` puts on ``q``: waits while it works (a loaded machine is slow),
    fails at once if it died, and gives up after ``limit_s``."""
    end = time.monotonic() + limit_s
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                return q.get(timeout=1.0)  # it may have put just before exiting
            if time.monotonic() > end:
                raise AssertionError(f"no result from pid {proc.pid} after {limit_s} s") from None


# 100,000 arrays through a queue and back: tens of seconds on a shared 2-core machine,
# more under load; the work is bounded, so wait for it (or its death), not for a guess.
SLOW_S = 300


@pytest.mark.slow
@pytest.mark.timeout(2 * SLOW_S + 60)
def test_100k_small_arrays_within_default_fd_limits():
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_hundred_thousand, args=(out,))
    proc.start()
    ok, nfds, segments, fds_arrays = _result_of(proc, out, 2 * SLOW_S)
    proc.join(WAIT_S)
    assert ok and nfds < 200
    # docs/shm.md: 100,000 small arrays share a few slabs of two descriptors each
    assert segments <= 10 and fds_arrays <= 2 * segments + 1, (segments, fds_arrays)


def test_daemon_that_cannot_start_is_a_clear_error():
    script = textwrap.dedent(
        """
        import subprocess
        from distrib._errors import ShmError
        from distrib.shm import _client

        def no_shell(*args, **kwargs):
            raise FileNotFoundError(2, "No such file or directory", "/bin/sh")

        subprocess.Popen = no_shell
        try:
            _client.daemon_address()
        except ShmError as exc:
            print("ShmError:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 0, done.stderr
    assert "could not start the shared-memory cleanup daemon" in done.stdout, done.stdout
    assert "/bin/sh" in done.stdout, done.stdout
