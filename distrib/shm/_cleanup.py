"""The cleanup daemon: keeps shared memory alive while used, frees it when not.

Started on first use by ``_client.py`` (``python -m distrib.shm._cleanup FD``)
in its own session, so a process-group kill of the job does not take it down.
It listens on an abstract Unix SOCK_SEQPACKET address (no file, nothing to
leak); every process that shares or receives a segment keeps one connection.

Per segment it keeps a reference count made of *holders* (connections whose
process has the segment mapped) and *tickets* (handles pickled but not yet
unpickled). Tickets are what let a receiver attach after the sender is gone:
the daemon, not the sender, holds the memfd (or the named file) while a handle
is in flight. When holders and tickets both reach zero the daemon closes its
fd (the kernel frees the memfd once the last mapping goes) or unlinks the
named file. A dead process closes its connection, which drops all its holds:
this is what cleans up after ``kill -9``.

The daemon exits once no process is connected and no ticket is outstanding
(or, with tickets nobody can claim any more, after the orphan grace period,
``ORPHAN_GRACE_S`` in ``_client.py``, passed on the command line),
unlinking any named file it still tracks. A handle pickled but never unpickled
keeps its segment alive until then: that is the price of not depending on
the sender.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import sys
import time
from typing import Any, NamedTuple

import msgpack

# How long the daemon waits for its first client before exiting.
_FIRST_CLIENT_S = 60.0
# A reply that cannot be delivered within this long drops that client.
_SEND_TIMEOUT_S = 5.0
# SCM_MAX_FD: the most descriptors Linux passes in one message.
_MAX_FDS_PER_MESSAGE = 253
# How long a take/unref for a segment whose ref is still in flight may wait.
_PENDING_S = 10.0


class _Seg:
    __slots__ = ("fd", "holders", "kind", "path", "size", "tickets")

    def __init__(self, kind: str, size: int, fd: int | None, path: str | None) -> None:
        self.kind = kind
        self.size = size
        self.fd = fd
        self.path = path
        self.tickets = 0
        self.holders: set[int] = set()


class _Pending(NamedTuple):
    """The part of a client's message that names segments whose refs are still in flight."""

    conn: int
    msg: list[Any]
    deadline: float


class Daemon:
    """Single-threaded event loop over the listener and client connections."""

    def __init__(self, listener: socket.socket, orphan_grace_s: float) -> None:
        self.listener = listener
        self.orphan_grace_s = orphan_grace_s
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ)
        self.conns: dict[int, socket.socket] = {}
        self.segs: dict[str, _Seg] = {}
        self.pending: list[_Pending] = []
        self.ever_connected = False
        self.idle_since = time.monotonic()

    # -- bookkeeping -------------------------------------------------------
    def _maybe_free(self, seg_id: str) -> None:
        seg = self.segs.get(seg_id)
        if seg is None or seg.holders or seg.tickets != 0:
            return
        del self.segs[seg_id]
        _free(seg)

    def _drop_conn(self, cid: int) -> None:
        sock = self.conns.pop(cid, None)
        if sock is None:
            return
        self.sel.unregister(sock)
        sock.close()
        for seg_id in [s for s, seg in self.segs.items() if cid in seg.holders]:
            self.segs[seg_id].holders.discard(cid)
            self._maybe_free(seg_id)
        self.pending = [p for p in self.pending if p.conn != cid]
        if not self.conns:
            self.idle_since = time.monotonic()

    # -- messages ----------------------------------------------------------
    def _handle(self, cid: int, msg: list[Any], fds: list[int]) -> list[Any] | None:
        """Apply one message; return the part that must wait for a ref still in flight."""
        op = msg[0]
        if op == "refs":
            for seg_id, kind, size, path, n, has_fd in msg[1]:
                fd = fds.pop(0) if has_fd and fds else None
                self._add_ref(cid, seg_id, kind, size, path, n, fd)
            return None
        if op == "track":
            self._add_ref(cid, msg[1], "file_system", 0, msg[2], 0, None)
            return None
        if op == "unrefs":
            waiting = [[s, n] for s, n in msg[1] if not self._consume(cid, s, n)]
            return ["unrefs", waiting] if waiting else None
        seg_id = msg[1]
        if op == "forget":
            seg = self.segs.get(seg_id)
            if seg is not None and seg.holders == {cid} and seg.tickets == 0 and seg.fd is None:
                del self.segs[seg_id]  # never created: leave the path alone
            return None
        if op == "release":
            seg = self.segs.get(seg_id)
            if seg is not None:
                seg.holders.discard(cid)
                self._maybe_free(seg_id)
            return None
        if op == "take":
            if not self._consume(cid, seg_id, 1):
                return msg
            seg = self.segs[seg_id]
            reply = msgpack.packb(["ok", seg.kind, seg.size, seg.path])
            try:
                if seg.fd is not None:
                    socket.send_fds(self.conns[cid], [reply], [seg.fd])
                else:
                    self.conns[cid].sendall(reply)
            except OSError:
                self._drop_conn(cid)
        return None

    def _add_ref(
        self, cid: int, seg_id: str, kind: str, size: int, path: str | None, n: int, fd: int | None
    ) -> None:
        seg = self.segs.get(seg_id)
        if seg is None:
            seg = self.segs[seg_id] = _Seg(kind, size, fd, path)
        elif fd is not None:
            if seg.fd is None:
                seg.fd = fd
            else:
                os.close(fd)  # a duplicate of the one we hold
        seg.tickets += n
        seg.holders.add(cid)

    def _consume(self, cid: int, seg_id: str, n: int) -> bool:
        """Turn n tickets into a hold by ``cid``; False if the ref has not arrived yet."""
        seg = self.segs.get(seg_id)
        if seg is None or (seg.kind == "file_descriptor" and seg.fd is None):
            return False
        seg.holders.add(cid)
        # May go below zero: a receiver's take can be read before the sender's
        # refs when both are pending; the count settles at zero once both are in.
        seg.tickets -= n
        return True

    def _reply_error(self, cid: int, msg: list[Any]) -> None:
        if msg[0] != "take" or cid not in self.conns:
            return
        text = (
            f"segment {msg[1]} is unknown to the daemon: every process that held it is "
            "gone and no handle for it was in flight"
        )
        try:
            self.conns[cid].sendall(msgpack.packb(["err", text]))
        except OSError:
            self._drop_conn(cid)

    def _read(self, cid: int) -> None:
        sock = self.conns[cid]
        try:
            data, fds, _flags, _ = socket.recv_fds(sock, 1 << 18, _MAX_FDS_PER_MESSAGE)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop_conn(cid)
            return
        try:
            msg = msgpack.unpackb(data)
        except Exception:
            msg = None
        if not isinstance(msg, list) or not msg:
            for fd in fds:
                os.close(fd)
            self._drop_conn(cid)  # not our protocol: hang up
            return
        waiting = self._handle(cid, msg, fds)
        if waiting is not None:
            self.pending.append(_Pending(cid, waiting, time.monotonic() + _PENDING_S))
        for fd in fds:  # not claimed by any entry (malformed message)
            os.close(fd)

    def _retry_pending(self) -> None:
        now = time.monotonic()
        still = []
        for entry in self.pending:
            waiting = self._handle(entry.conn, entry.msg, [])
            if waiting is None:
                continue
            if now > entry.deadline:
                self._reply_error(entry.conn, waiting)
            else:
                still.append(entry._replace(msg=waiting))
        self.pending = still

    # -- loop --------------------------------------------------------------
    def _should_exit(self) -> bool:
        if self.conns:
            return False
        idle = time.monotonic() - self.idle_since
        if not self.ever_connected:
            return idle > _FIRST_CLIENT_S
        if not any(seg.tickets for seg in self.segs.values()):
            return True
        return idle > self.orphan_grace_s

    def run(self) -> None:
        try:
            self._loop()
        finally:  # also on SIGTERM: never leave a named file behind
            for seg in self.segs.values():
                _free(seg)
            self.segs.clear()

    def _loop(self) -> None:
        while not self._should_exit():
            timeout = 0.05 if self.pending else 1.0
            for key, _ in self.sel.select(timeout):
                if key.fileobj is self.listener:
                    try:
                        sock, _ = self.listener.accept()
                    except OSError:
                        continue
                    # Never let one stuck client stall everyone: replies give up after 5 s.
                    sock.settimeout(_SEND_TIMEOUT_S)
                    self.conns[sock.fileno()] = sock
                    self.sel.register(sock, selectors.EVENT_READ)
                    self.ever_connected = True
                else:
                    cid = key.fd
                    if cid in self.conns:
                        self._read(cid)
            if self.pending:
                self._retry_pending()


def _free(seg: _Seg) -> None:
    if seg.fd is not None:
        os.close(seg.fd)
    if seg.path is not None:
        try:
            os.unlink(seg.path)
        except OSError:
            pass


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> None:
    """Run the daemon: ``argv`` = [listening socket fd, orphan grace seconds]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    listener = socket.socket(fileno=int(argv[0]))
    os.set_inheritable(listener.fileno(), False)
    Daemon(listener, float(argv[1])).run()


if __name__ == "__main__":
    main(sys.argv[1:])
