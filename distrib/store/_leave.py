"""Leaving a store that one of the ranks hosts: its host stops serving last.

Under ``env://`` and ``tcp://`` rendezvous (and in distrib's torch backend)
rank 0's process serves the store. Ranks finish their last collective at
slightly different moments, and a rank still inside it reads the store
(failure checks); a store closed under it reads as rank 0's death. So on a
clean teardown every other rank counts itself out, and the host waits for all
of them, bounded, before it stops serving.
"""

from __future__ import annotations

import time

from .._errors import DistError
from ._base import Store
from ._client import TCPStore

__all__ = ["LEAVE_WAIT_S", "leave"]

# The longest the host waits for the other ranks at teardown: they normally
# arrive within their last collective's duration; a rank that exited without
# tearing down is not waited for beyond this.
LEAVE_WAIT_S = 10.0
_LEFT_KEY = "distrib/left"


def leave(store: Store, world_size: int, wait_s: float = LEAVE_WAIT_S) -> None:
    """Count this rank out of ``store``; if this process hosts it, first wait (at
    most ``wait_s``, and never past the store's timeout) until the other
    ``world_size - 1`` ranks have counted themselves out. Never raises a store error:
    a host that is already gone has nothing left to be told."""
    if world_size <= 1 or not isinstance(store, TCPStore):
        return  # only a store that one of the ranks serves needs an order
    wait_s = min(wait_s, store.timeout)
    try:
        if store.server is not None:
            deadline = time.monotonic() + wait_s
            delay = 0.001
            while store.add(_LEFT_KEY, 0) < world_size - 1 and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        else:
            store.set_timeout(wait_s)  # an unreachable host must not hold this rank up
            store.add(_LEFT_KEY, 1)
    except (DistError, OSError):
        pass
