"""Ports for tests and benchmarks: reserved for the life of the process."""

from __future__ import annotations

import atexit

from ..store._ports import PortReservation, reserve_port

__all__ = ["free_port"]

# Held until the process exits: a test hands the number to child processes whose
# servers bind it with SO_REUSEADDR; nobody else can be given the same port.
_HELD: list[PortReservation] = []


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that no other ``free_port`` or port-0 bind will get."""
    reservation = reserve_port(host)
    _HELD.append(reservation)
    return reservation.port


@atexit.register
def _release_all() -> None:
    # Closed explicitly at exit: left to the garbage collector, each socket warns.
    while _HELD:
        _HELD.pop().release()
