"""Collectives of different groups waiting for each other: found in about a second.

Rank 0 in ``all_reduce`` on one group while rank 1 is in ``broadcast`` on
another group with rank 0 in it can never finish: each waits for a call the
other will only make after its own returns. No exchange inside either group
can see it (the two calls never meet), so without this both would sit out
the whole timeout.

Nothing runs on the hot path. Only once a blocking collective has waited
``BLOCKED_AFTER_S`` (the engines' slow path, which already asks the store about
failures a few times a second) does the rank publish where it is blocked --
group key, op number, call, and the last op it entered in each of its groups --
under ``distrib/blocked/<global rank>`` in the job's store, and read the records
of the ranks it waits for. Rank ``a`` waits for rank ``b`` when ``b`` is a
member of ``a``'s group and has not entered ``a``'s op. A cycle of such waits
among blocked ranks is a deadlock: the rank raises ``DistMismatchError`` naming
both calls and marks the other group(s) of the cycle it belongs to as failed, so
their members stop too. The record is removed when the op ends.

Limits: asynchronous operations are judged only once their caller waits for
them (``Work.wait()`` without a timeout); point-to-point calls are not judged;
two threads of one rank issuing to different groups are assumed not to wait for
each other.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, NamedTuple, Protocol

import msgpack

from .._errors import DistError, DistMismatchError
from ..transport._calldesc import CallDesc, describe, pack, unpack
from ._flight import FlightRecorder, State, entered_by_key

__all__ = ["BLOCKED_AFTER_S", "BlockWatch", "Blocked", "find_cycle", "group_mismatch_error"]

BLOCKED_AFTER_S = 0.5  # a collective waiting this long is published as blocked
LOOK_EVERY_S = 0.2  # then the peers' records are read this often
_MAX_CYCLE = 64  # longest wait cycle followed (a bound on store reads)
_KEY = "distrib/blocked/{}"


class Blocked(NamedTuple):
    """One rank's record: it waits in op ``seq`` of group ``key`` (members ``ranks``)."""

    rank: int
    key: str
    ranks: tuple[int, ...]
    seq: int
    op: str
    call: CallDesc | None
    entered: dict[str, int]  # group key -> last op this rank entered there

    def encode(self) -> bytes:
        raw: bytes = msgpack.packb(
            [
                self.rank,
                self.key,
                list(self.ranks),
                self.seq,
                self.op,
                pack(self.call) if self.call is not None else b"",
                self.entered,
            ]
        )
        return raw

    @staticmethod
    def decode(raw: Any) -> Blocked | None:
        """The record in ``raw``, or ``None`` for anything malformed (never raises)."""
        try:
            rank, key, ranks, seq, op, call, entered = msgpack.unpackb(bytes(raw), raw=False)
            return Blocked(
                int(rank),
                str(key),
                tuple(int(r) for r in ranks),
                int(seq),
                str(op),
                unpack(call) if call else None,
                {str(k): int(v) for k, v in entered.items()},
            )
        except Exception:
            return None

    def waits_for(self, other: Blocked) -> bool:
        """``other`` is a member of this rank's group and has not entered this op."""
        return other.rank in self.ranks and other.entered.get(self.key, -1) < self.seq

    def where(self) -> str:
        detail = describe(self.call) if self.call is not None else f"{self.op}()"
        return f"{self.op} on group {self.key} (op #{self.seq}: {detail})"


def find_cycle(me: Blocked, records: dict[int, Blocked]) -> list[Blocked] | None:
    """A cycle of waits ``me -> ... -> me`` through ``records`` (global rank -> record)."""
    path = [me]
    on_path = {me.rank}

    def visit(cur: Blocked) -> bool:
        if len(path) > _MAX_CYCLE:
            return False
        for r in cur.ranks:
            nxt = records.get(r)
            if nxt is None or r == cur.rank or not cur.waits_for(nxt):
                continue
            if r == me.rank:
                return True
            if r in on_path:
                continue
            path.append(nxt)
            on_path.add(r)
            if visit(nxt):
                return True
            path.pop()
            on_path.discard(r)
        return False

    return path if visit(me) else None


def group_mismatch_error(cycle: list[Blocked]) -> DistMismatchError:
    """The error of the first rank of ``cycle`` (it waits for the second, and so on)."""
    me, peer = cycle[0], cycle[1]
    text = f"{me.op}: mismatched groups: rank {me.rank} called {me.where()} but rank {peer.rank} is in {peer.where()}"
    for other in cycle[2:]:
        text += f", and rank {other.rank} is in {other.where()}"
    text += (
        f"; neither can finish: rank {peer.rank} has not called op #{me.seq} of group "
        f"{me.key}. Every rank must call the collectives of different groups in the same order"
    )
    return DistMismatchError(text, rank=me.rank, op=me.op, peer=peer.rank)


class _Failable(Protocol):
    def fail_from_elsewhere(self, err: DistError) -> None: ...


_groups: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


class BlockWatch:
    """One group's watch for cross-group deadlocks, driven by its engines' slow path.

    ``poll`` is called while an engine of the group is blocked (a few times a
    second); ``done`` when an op whose record was published ends.
    """

    def __init__(self, store: Any, flight: FlightRecorder, group: _Failable) -> None:
        self._store = store  # the job's store without the group's prefix (1 s timeout)
        self._flight = flight
        self._seq = -1  # the op polled last
        self._next_look = 0.0  # when to look next (the first look: BLOCKED_AFTER_S in)
        self.posted = False
        _groups[flight.key] = group

    def poll(self) -> None:
        """Publish where this rank is blocked and raise on a wait cycle."""
        flight = self._flight
        seq = flight.running
        now = time.monotonic()
        if seq != self._seq:  # a new op started waiting: judge it only once it is slow
            self._seq, self._next_look = seq, now + BLOCKED_AFTER_S
            return
        if now < self._next_look:
            return
        self._next_look = now + LOOK_EVERY_S
        entry = flight.entry(seq)
        if entry is None or not entry.sync or entry.state is not State.STARTED:
            return  # asynchronous, or finished (the wait is a point-to-point call's)
        me = Blocked(
            flight.rank,
            flight.key,
            tuple(flight.ranks),
            seq,
            entry.op,
            entry.call,
            entered_by_key(),
        )
        try:
            self._store.set(_KEY.format(me.rank), me.encode())
            self.posted = True
            records = self._read(me)
        except DistError:
            return  # the store is unreachable: the timeout and the failure checks remain
        cycle = find_cycle(me, records)
        if cycle is None:
            return
        err = group_mismatch_error(cycle)
        # The members of the other groups in the cycle that wait for this rank stop too.
        for other in cycle[1:]:
            group = _groups.get(other.key)
            if other.key != me.key and me.rank in other.ranks and group is not None:
                group.fail_from_elsewhere(err)
        raise err

    def _read(self, me: Blocked) -> dict[int, Blocked]:
        """Records of the ranks reachable by waits from ``me`` (bounded)."""
        records = {me.rank: me}
        frontier = [me]
        while frontier and len(records) <= _MAX_CYCLE:
            want = sorted({r for b in frontier for r in b.ranks if r not in records})
            if not want:
                break
            raw = self._store.multi_get([_KEY.format(r) for r in want])
            frontier = []
            for r, blob in zip(want, raw, strict=True):
                rec = Blocked.decode(blob) if blob is not None else None
                if rec is not None and rec.rank == r:
                    records[r] = rec
                    frontier.append(rec)
        return records

    def done(self) -> None:
        """The op whose record was published ended: remove the record."""
        self.posted = False
        try:
            self._store.delete_key(_KEY.format(self._flight.rank))
        except DistError:
            pass
