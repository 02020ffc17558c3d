"""The per-process side of the cleanup daemon protocol (see ``_cleanup.py``).

Each process keeps one SOCK_SEQPACKET connection per daemon it talks to (the
address travels inside every handle, so a receiver finds the sender's daemon
without the sender). A process whose own segments have never been handed out
starts a daemon lazily; a process that received a handle reuses that daemon.

Messages (msgpack lists, one per packet):
  ["track", seg_id, path]                 creator of a named segment is a holder
                                          (sent before the file is created)
  ["forget", seg_id]                      the tracked file could not be created:
                                          drop it without unlinking the path
  ["refs", [[seg_id, kind, size, path, n, has_fd], ...]] (+fds)
                                          handles were pickled: n more tickets each;
                                          an fd rides along the first time this
                                          process refs the segment at that daemon
  ["take", seg_id]  -> ["ok", kind, size, path] (+fd) | ["err", text]
                                          unpickled: consume a ticket, become holder
  ["unrefs", [[seg_id, n], ...]]          unpickled into already-mapped segments
  ["release", seg_id]                     this process dropped its last mapping
Everything but ``take`` is one-way. Refs made while pickling one object are
sent together when the pickler finishes, before its bytes can reach anyone;
unrefs are sent after each unpickling (``flush``). All state is per process
and rebuilt after fork.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util as mp_util
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import msgpack

from .._config import config
from .._errors import ShmError, ShmFdLimitError
from . import _limits

__all__ = [
    "batch",
    "daemon_address",
    "flush",
    "forget",
    "ref",
    "release",
    "take",
    "track",
    "unref",
]

_DEFAULT_TIMEOUT = 60.0
# How long a daemon keeps tickets alive once no process is connected: a
# receiver that never connected yet may still come for its handle. Set before
# the daemon starts (tests shorten it).
ORPHAN_GRACE_S = 10.0
# Entries per refs/unrefs packet: stays far below the SEQPACKET size limit
# (~200 KiB) and SCM_MAX_FD (253 descriptors per message).
_REFS_PER_MESSAGE = 200
# Unsent ticket releases that force a flush (bounds what a crash can strand).
_UNREFS_BEFORE_FLUSH = 4096


class _State:
    """Connections and bookkeeping of this process; replaced after fork."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.conns: dict[str, socket.socket] = {}
        self.own_daemon: str | None = None
        # (daemon, seg_id) pairs where this process is a holder (its fd is deposited).
        self.holding: set[tuple[str, str]] = set()
        self.spawned: list[int] = []  # pids of the daemons this process started
        # Ticket releases not yet sent: daemon -> seg_id -> count (see flush()).
        self.unrefs: dict[str, dict[str, int]] = {}
        self.unref_total = 0
        self.flush_hooked = False
        self.exiting = False  # connections closed at interpreter exit: open no new ones


_state = _State()


def _current() -> _State:
    global _state
    if _state.pid != os.getpid():
        _state = _State()  # after fork: never share a parent's socket
    return _state


def _after_fork_in_child() -> None:
    global _state
    inherited = _state
    _state = _State()
    _state.own_daemon = inherited.own_daemon  # reuse the parent's daemon, new socket
    # Close our copies of the parent's sockets: the daemon must see the parent's
    # disconnect when the parent dies, and we must never interleave its packets.
    for sock in inherited.conns.values():
        try:
            sock.close()
        except OSError:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_connections() -> None:
    """At interpreter exit: flush pending releases, then close every daemon connection.

    Exit would close them anyway (the daemon sees the same disconnect); closing
    them here keeps ``-X dev`` and pytest free of unclosed-socket warnings.
    """
    st = _state
    if st.pid != os.getpid():
        return  # a forked child that never used the client: nothing of its own
    with st.lock:
        if st.unref_total:
            _flush_locked(st)
        st.exiting = True
        conns, st.conns = st.conns, {}
        for sock in conns.values():
            try:
                sock.close()
            except OSError:
                pass


# Through multiprocessing's exit function, with the lowest priority: after it has
# joined the queue feeder threads (priority -5), which may still be pickling
# arrays (refs), and after the unref flush (-100).
mp_util.Finalize(None, _close_connections, exitpriority=-1000)


def _start_daemon(st: _State) -> str:
    """Start a cleanup daemon in its own session; return its abstract address."""
    name = f"\0distrib-shm-{os.getpid()}-{secrets.token_hex(8)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(name)
        listener.listen(128)
        # Run the daemon's file directly: importing the package would pull in
        # numpy (~0.3 s); the daemon needs only the standard library and msgpack.
        # The command line names distrib.shm._cleanup so tools can recognise it.
        bootstrap = (
            "import runpy, sys; sys.argv[0] = 'distrib.shm._cleanup'; "
            f"runpy.run_path({_cleanup_path()!r}, run_name='__main__')"
        )
        # Through a shell that starts the daemon in the background, prints its
        # pid and exits: the daemon is then nobody's child here (re-parented to
        # init or a subreaper), so this process never has to reap it and holds no
        # Popen of a running process at exit (which warns).
        try:
            starter = subprocess.Popen(
                [
                    "/bin/sh",
                    "-c",
                    '"$@" </dev/null >/dev/null & echo $!',
                    "sh",
                    sys.executable,
                    "-c",
                    bootstrap,
                    str(listener.fileno()),
                    str(ORPHAN_GRACE_S),
                ],
                pass_fds=[listener.fileno()],
                close_fds=True,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=None if config().debug else subprocess.DEVNULL,
            )
        except OSError as exc:
            raise ShmError(
                f"could not start the shared-memory cleanup daemon ({exc}); it needs /bin/sh "
                f"and {sys.executable}",
                op="shm.daemon",
            ) from exc
        try:
            out, _ = starter.communicate(timeout=_DEFAULT_TIMEOUT)
            pid = int(out.strip())
        except (subprocess.TimeoutExpired, ValueError) as exc:
            starter.kill()
            starter.wait()
            raise ShmError(
                f"could not start the shared-memory cleanup daemon through /bin/sh: {exc!r}",
                op="shm.daemon",
            ) from exc
    finally:
        listener.close()  # the daemon holds its own copy; connects queue in the backlog
    st.spawned.append(pid)
    return name


def _cleanup_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cleanup.py")


def daemon_address() -> str:
    """The daemon this process deposits its own segments with (started on first use)."""
    st = _current()
    with st.lock:
        if st.own_daemon is None:
            st.own_daemon = _start_daemon(st)
        return st.own_daemon


def _conn(st: _State, address: str) -> socket.socket:
    sock = st.conns.get(address)
    if sock is None:
        if st.exiting:
            # Finalizers running after _close_connections: the disconnect already
            # told the daemon everything a message would.
            raise ShmError(
                f"the interpreter is exiting; not reconnecting to daemon {address[1:]!r}",
                op="shm.connect",
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(config().timeout or _DEFAULT_TIMEOUT)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            raise ShmError(
                f"cannot reach the shared-memory daemon {address[1:]!r}: {exc}. It exits "
                "once every process that used it is gone (or it was killed)",
                op="shm.connect",
            ) from exc
        st.conns[address] = sock
        if st.own_daemon is None:
            st.own_daemon = address  # adopt the sender's daemon for our own segments
    return sock


def _send(st: _State, address: str, msg: list, fds: list[int] | None = None) -> None:
    data = msgpack.packb(msg)
    sock = _conn(st, address)
    try:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.sendall(data)
    except OSError as exc:
        st.conns.pop(address, None)
        sock.close()
        raise ShmError(
            f"lost the shared-memory daemon {address[1:]!r}: {exc}", op="shm.send"
        ) from exc


def track(seg_id: str, path: str) -> str:
    """Register a new named segment (this process holds it); return the daemon address."""
    address = daemon_address()
    st = _current()
    with st.lock:
        _send(st, address, ["track", seg_id, path])
        st.holding.add((address, seg_id))
    return address


def forget(seg_id: str) -> None:
    """Withdraw a ``track`` whose file was never created (its name may be another's)."""
    _let_go(seg_id, "forget")


class _Batch:
    """Refs collected during one pickling call, sent as one message per daemon."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], list] = {}  # (daemon, seg_id) -> entry
        self.segments: list = []  # keep segments (and their fds) alive until sent


_local = threading.local()


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Collect the refs made inside the block and send them once at its end."""
    if getattr(_local, "batch", None) is not None:
        yield  # nested: the outer batch sends
        return
    _local.batch = _Batch()
    try:
        yield
    finally:
        pending, _local.batch = _local.batch, None
        if pending.entries:
            _send_refs(pending)


def _send_refs(pending: _Batch) -> None:
    st = _current()
    per_daemon: dict[str, list[list]] = {}
    for (address, _), entry in pending.entries.items():
        per_daemon.setdefault(address, []).append(entry)
    with st.lock:
        for address, entries in per_daemon.items():
            for start in range(0, len(entries), _REFS_PER_MESSAGE):
                chunk = entries[start : start + _REFS_PER_MESSAGE]
                fds = [e[5] for e in chunk if e[5] is not None]
                wire = [[e[0], e[1], e[2], e[3], e[4], e[5] is not None] for e in chunk]
                _send(st, address, ["refs", wire], fds)


def ref(seg) -> str:
    """Count one handle of ``seg`` in flight; deposit its fd on first use. Returns the address.

    Inside ``batch()`` the ref is sent when the batch ends (before the pickled
    bytes can reach anyone); otherwise at once.
    """
    st = _current()
    with st.lock:
        if seg.daemon is None:
            seg.daemon = daemon_address()
        address = seg.daemon
        key = (address, seg.seg_id)
        deposit = key not in st.holding and seg.kind == "file_descriptor"
        st.holding.add(key)
    outer: _Batch | None = getattr(_local, "batch", None)
    pending = outer if outer is not None else _Batch()
    entry = pending.entries.get(key)
    if entry is None:
        pending.entries[key] = [
            seg.seg_id,
            seg.kind,
            seg.size,
            seg.path,
            1,
            seg.fd if deposit else None,
        ]
        pending.segments.append(seg)
    else:
        entry[4] += 1
    if outer is None:
        _send_refs(pending)
    return address


def take(address: str, seg_id: str) -> int | None:
    """Consume a ticket and fetch the segment's fd (``None`` for named segments).

    Raises:
        ShmFdLimitError: the descriptor was lost because this process is at its fd limit.
        ShmError: the daemon does not know the segment (it was freed) or is unreachable.
    """
    _limits.raise_fd_soft_limit()
    st = _current()
    with st.lock:
        _send(st, address, ["take", seg_id])
        sock = st.conns[address]
        try:
            data, fds, flags, _ = socket.recv_fds(sock, 4096, 1)
        except (OSError, TimeoutError) as exc:
            st.conns.pop(address, None)
            sock.close()
            raise ShmError(
                f"no answer from the shared-memory daemon {address[1:]!r} for "
                f"segment {seg_id}: {exc}",
                op="shm.take",
            ) from exc
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(ShmError):  # the daemon counted us as a holder
                _send(st, address, ["release", seg_id])
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            raise ShmFdLimitError(
                f"process {os.getpid()} hit its open-file limit (RLIMIT_NOFILE soft={soft}, "
                f"hard={hard}) while receiving shared-memory segment {seg_id}: the kernel "
                "dropped the descriptor. Raise the limit (ulimit -n) or keep fewer shared "
                "arrays alive",
                op="shm.take",
            )
        if not data:
            st.conns.pop(address, None)
            sock.close()
            raise ShmError(
                f"the shared-memory daemon {address[1:]!r} closed the connection", op="shm.take"
            )
        reply = msgpack.unpackb(data)
        if reply[0] != "ok":
            for fd in fds:
                os.close(fd)
            raise ShmError(
                f"cannot attach shared-memory segment {seg_id}: {reply[1]}", op="shm.take"
            )
        st.holding.add((address, seg_id))
        return fds[0] if fds else None


def unref(address: str, seg_id: str) -> None:
    """Consume a ticket for a segment this process already has mapped (sent by ``flush``)."""
    st = _current()
    with st.lock:
        st.holding.add((address, seg_id))
        counts = st.unrefs.setdefault(address, {})
        counts[seg_id] = counts.get(seg_id, 0) + 1
        st.unref_total += 1
        if not st.flush_hooked:
            st.flush_hooked = True
            # multiprocessing children leave through os._exit: atexit would not run.
            mp_util.Finalize(None, flush, exitpriority=-100)
            atexit.register(flush)
        if st.unref_total >= _UNREFS_BEFORE_FLUSH:
            _flush_locked(st)


def flush() -> None:
    """Send the ticket releases collected by ``unref`` (called after each unpickling)."""
    st = _current()
    if st.unref_total:
        with st.lock:
            _flush_locked(st)


def _flush_locked(st: _State) -> None:
    unrefs, st.unrefs, st.unref_total = st.unrefs, {}, 0
    for address, counts in unrefs.items():
        items = [[seg_id, n] for seg_id, n in counts.items()]
        for start in range(0, len(items), _REFS_PER_MESSAGE):
            try:
                _send(st, address, ["unrefs", items[start : start + _REFS_PER_MESSAGE]])
            except ShmError:
                break  # daemon gone: its tickets are gone with it


def release(seg_id: str) -> None:
    """Tell every daemon holding ``seg_id`` for us that this process let go."""
    _let_go(seg_id, "release")


def _let_go(seg_id: str, op: str) -> None:
    """Send ``[op, seg_id]`` to every daemon holding ``seg_id`` for this process."""
    st = _current()
    with st.lock:
        for key in [k for k in st.holding if k[1] == seg_id]:
            st.holding.discard(key)
            try:
                _send(st, key[0], [op, seg_id])
            except ShmError:
                pass  # daemon gone: it holds nothing for us any more
