"""Ports chosen by the OS and held until used, so two picks never collide.

Binding port 0 and closing the socket hands out a port that anyone may take
before its user binds it. A ``PortReservation`` keeps the socket bound (with
``SO_REUSEADDR``, not listening): the port stays out of the OS's ephemeral
pool, while a server that also sets ``SO_REUSEADDR`` (distrib's store, torch's
TCPStore, ZeroMQ) can still bind and listen on it. Release it once the real
listener is up, or when handing the number to a program that binds without
``SO_REUSEADDR``.
"""

from __future__ import annotations

import socket
from types import TracebackType

__all__ = ["PortReservation", "reserve_port"]


class PortReservation:
    """A TCP port held by a bound, non-listening socket until ``release()``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host.strip("[]"), 0))
        except BaseException:
            self._sock.close()
            raise
        self.host = host
        self.port: int = self._sock.getsockname()[1]

    @property
    def held(self) -> bool:
        """Whether the port is still reserved."""
        return self._sock is not None

    def release(self) -> int:
        """Stop holding the port; returns it. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        return self.port

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"PortReservation({self.host}:{self.port}, {state})"


def reserve_port(host: str = "127.0.0.1") -> PortReservation:
    """Reserve a free TCP port on ``host``, chosen by the OS."""
    return PortReservation(host)
