"""The flight recorder: each rank's last collectives, for a hang that explains itself.

torch's Flight Recorder is the model. Every process group keeps a ring of its
last ``RING`` collectives (op, sequence number, call descriptor, state, times);
recording one is an index and a few attribute writes on preallocated slots, so
it stays on by default. When a job hangs, ``distrib-run`` asks each rank for a
dump (``distrib._stacks``): these records plus every thread's Python stack. The
ranks whose last entered sequence number is lowest never reached the collective
the others wait in: they are the cause, the others its victims.
"""

from __future__ import annotations

import enum
import time
import weakref
from typing import Any

from ..transport._calldesc import CallDesc, describe

__all__ = ["MASK", "RING", "FlightRecorder", "State", "entered_by_key", "snapshot_all"]

RING = 64  # a power of two: the slot of seq is seq & (RING - 1)
MASK = RING - 1


class State(enum.Enum):
    """Where a collective is on this rank."""

    ENTERED = "entered"  # issued by the caller (async ops may wait behind earlier ones)
    STARTED = "started"  # its engine is moving data
    COMPLETED = "completed"
    FAILED = "failed"


class _Entry:
    __slots__ = ("call", "op", "seq", "state", "sync", "t_end", "t_enter")

    def __init__(self) -> None:
        self.seq = -1
        self.op = ""
        self.call: CallDesc | None = None
        self.state = State.ENTERED
        self.sync = True  # issued without async_op: the caller's thread waits in it
        self.t_enter = 0.0
        self.t_end = 0.0


_recorders: weakref.WeakSet[FlightRecorder] = weakref.WeakSet()
_created: dict[tuple[int, ...], int] = {}  # ranks -> groups with those ranks made so far


class FlightRecorder:
    """The ring of one process group's collectives on this rank.

    The process group writes the slots itself as a call is entered, started and
    completed (``_group._enqueue`` and ``_execute``): a few attribute writes on the
    hot path, no call.
    """

    __slots__ = (
        "__weakref__",
        "key",
        "last_completed",
        "last_entered",
        "rank",
        "ranks",
        "ring",
        "running",
    )

    def __init__(self, global_ranks: list[int], global_rank: int) -> None:
        self.ranks = list(global_ranks)
        # The n-th group with these ranks: the same name on every member, since every
        # rank creates groups in the same order.
        nth = _created.get(tuple(self.ranks), 0)
        _created[tuple(self.ranks)] = nth + 1
        self.key = f"{self.ranks}#{nth}"
        self.rank = global_rank
        self.ring = [_Entry() for _ in range(RING)]
        self.last_entered = -1
        self.last_completed = -1
        self.running = -1  # the collective whose engine runs now (or ran last)
        _recorders.add(self)

    def entry(self, seq: int) -> _Entry | None:
        """The record of collective ``seq`` while the ring still holds it."""
        e = self.ring[seq & MASK]
        return e if seq >= 0 and e.seq == seq else None

    def failed(self, seq: int) -> None:
        if seq >= 0:
            e = self.ring[seq & MASK]
            e.state, e.t_end = State.FAILED, time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        """A JSON/msgpack-ready copy, oldest entry first."""
        now = time.monotonic()
        entries = sorted((e for e in self.ring if e.seq >= 0), key=lambda e: e.seq)
        return {
            "key": self.key,
            "ranks": self.ranks,
            "rank": self.rank,
            "last_entered": self.last_entered,
            "last_completed": self.last_completed,
            "entries": [
                {
                    "seq": e.seq,
                    "op": e.op,
                    "call": describe(e.call) if e.call is not None else f"{e.op}()",
                    "state": e.state.value,
                    "age_s": round(now - e.t_enter, 3),
                }
                for e in entries
            ],
        }


def entered_by_key() -> dict[str, int]:
    """The last collective this rank entered in each of its live groups, by group key."""
    return {r.key: r.last_entered for r in list(_recorders)}


def snapshot_all() -> list[dict[str, Any]]:
    """Every live group's records on this rank."""
    return [r.snapshot() for r in list(_recorders)]
