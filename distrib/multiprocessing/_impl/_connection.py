"""Pipe ends whose ``send`` pickles with ``ArrayPickler`` (numpy arrays as shared memory)."""

from __future__ import annotations

import multiprocessing.connection as _mpconn
from typing import Any

from ...shm import _client
from ._pickler import ArrayPickler

__all__ = ["Connection", "Pipe", "adopt"]


class Connection(_mpconn.Connection):
    """A pipe end whose ``send`` shares numpy arrays instead of copying them."""

    def send(self, obj: Any) -> None:
        """Send ``obj``; numpy arrays travel as shared-memory handles."""
        self._check_closed()  # type: ignore[attr-defined]
        self._check_writable()  # type: ignore[attr-defined]
        self._send_bytes(ArrayPickler.dumps(obj))  # type: ignore[attr-defined]

    def recv(self) -> Any:
        """Receive an object; arrays arrive mapped onto the sender's shared memory."""
        try:
            return super().recv()
        finally:
            _client.flush()

    def __reduce__(self) -> tuple:
        # Passed to a spawned child: rebuild as our class, not the stdlib's.
        _, args = _mpconn.reduce_connection(self)  # type: ignore[attr-defined]
        return _rebuild_connection, args


def _rebuild_connection(dup_fd: Any, readable: bool, writable: bool) -> Connection:
    return Connection(dup_fd.detach(), readable, writable)


def adopt(conn: _mpconn.Connection) -> Connection:
    conn.__class__ = Connection  # same layout: only the send path changes
    return conn  # type: ignore[return-value]


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """A pair of connected ``Connection`` objects (like ``multiprocessing.Pipe``)."""
    a, b = _mpconn.Pipe(duplex)
    return adopt(a), adopt(b)
