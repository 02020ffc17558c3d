"""``ReceiveOrder``: which posted receive a point-to-point message belongs to.

Receives from one source with one tag match that source's sends in the order
they were posted (MPI's non-overtaking rule, torch's too). A receive posted
before its send steps aside for later work while it waits (``submit_giving_way``),
so a later receive with the same source and tag may run first: it must let the
earlier one take the message.
"""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["ReceiveOrder"]


class ReceiveOrder:
    """The receives posted on one group and not finished, per (source, tag), in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._posted: dict[tuple[int, int], deque[object]] = {}

    def post(self, src: int, tag: int) -> object:
        """Record a receive from ``src`` with ``tag``; its token (for ``is_next``/``done``)."""
        token = object()
        with self._lock:
            self._posted.setdefault((src, tag), deque()).append(token)
        return token

    def is_next(self, src: int, tag: int, token: object) -> bool:
        """Whether ``token``'s receive is the earliest unfinished one from ``src`` with ``tag``."""
        with self._lock:
            posted = self._posted.get((src, tag))
            return posted is not None and posted[0] is token

    def done(self, src: int, tag: int, token: object) -> None:
        """Forget a finished (or failed, or never issued) receive."""
        with self._lock:
            posted = self._posted.get((src, tag))
            if posted is not None and token in posted:
                posted.remove(token)
                if not posted:
                    del self._posted[(src, tag)]
