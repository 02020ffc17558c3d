"""Leaving a store that one of the ranks hosts: its host stops serving last.

Under ``env://`` and ``tcp://`` rendezvous (and in distrib's torch backend)
rank 0's process serves the store. Ranks finish their last collective at
slightly different moments, and a rank still inside it reads the store
(failure checks); a store closed under it reads as rank 0's death. So on a
clean teardown every other rank counts itself out, and the host waits for all
of them, bounded, before it stops serving.

The other ranks then wait, bounded too, until the host's store has closed: a
rank that tears down and at once joins a new group at the same address (an
elastic restart, ``destroy_process_group`` then ``init_process_group``) must
meet the host's *next* store, not the old one about to close under it.
"""

from __future__ import annotations

from .._errors import DistError
from ._base import Store
from ._client import TCPStore

__all__ = ["LEAVE_WAIT_S", "leave"]

# The longest the host waits for the other ranks at teardown: they normally
# arrive within their last collective's duration; a rank that exited without
# tearing down is not waited for beyond this.
LEAVE_WAIT_S = 10.0
_LEFT_KEY = "distrib/left"
_ALL_LEFT_KEY = "distrib/all_left"  # set by the last rank to count itself out
_NEVER_KEY = "distrib/closing"  # never set: waited on until the host's store closes


def leave(
    store: Store, world_size: int, wait_s: float = LEAVE_WAIT_S, *, await_close: bool = True
) -> None:
    """Count this rank out of ``store``; if this process hosts it, first wait (at
    most ``wait_s``, and never past the store's timeout) until the other
    ``world_size - 1`` ranks have counted themselves out; if not and
    ``await_close``, then wait (as long) until the host has closed it (a process
    leaving at exit does not: it will not join again). Never raises a store error:
    a host that is already gone has nothing left to be told."""
    if world_size <= 1 or not isinstance(store, TCPStore):
        return  # only a store that one of the ranks serves needs an order
    wait_s = min(wait_s, store.timeout)
    try:
        if store.server is not None:
            store.wait([_ALL_LEFT_KEY], timeout=wait_s)
        else:
            store.set_timeout(wait_s)  # an unreachable host must not hold this rank up
            if store.add(_LEFT_KEY, 1) >= world_size - 1:
                store.set(_ALL_LEFT_KEY, b"1")
            if await_close:
                # parked on a key nobody sets: ends when the host closes the connection
                store.wait([_NEVER_KEY], timeout=wait_s)
    except (DistError, OSError):
        pass
