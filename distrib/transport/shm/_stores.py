"""How large all-reduces write into the segment: ordinary or streaming stores, by measurement.

In every step a rank writes into its slot what its peers read straight after
(the parts they reduce; in the C step also its part of the result). The next
time the rank writes those lines, the peers still hold copies of them. Where
the two cores share a cache that costs nothing; where they do not (most
likely: a virtual machine whose virtual CPUs the host places on different
core complexes, and moves between them while a job runs), every ordinary
store must first take its line back from the peer's cache. Measured on a
2-vCPU cloud VM: the copy into the segment of a 32 MiB all-reduce took 1.2 ms
one second and 6-7 ms the next, for minutes at a time, the whole call 4-5 ms
and 10-12 ms. Streaming (non-temporal) stores write whole lines to memory
without taking them first: the call stayed at 4-6 ms throughout, but
all-reduces of 1-64 MiB took 30-70% longer with them whenever ordinary stores
were fast, because the peers then read the data from memory, not cache
(docs/performance.md has the tables).

Neither is best all the time and nothing in the machine's description says
which state it is in, so ``StoreChooser`` measures: it times whole calls
with each kind of store and uses the cheaper, trying the other one in calls
2, 4, 8, ... and then every ``explore_every`` calls (64: trying the slower
kind then costs about 1% of the time). Every local rank makes the same
sequence of calls on a path, so all of them try the other kind in the same
call and each measures the group under one setting. Only how this rank
writes changes, never what it writes, so ranks that choose differently still
agree on every result, bit for bit.
"""

from __future__ import annotations

import enum

__all__ = ["StoreChooser", "StoreKind"]


class StoreKind(enum.Enum):
    """How a rank writes the data its peers read next."""

    CACHED = "cached"  # ordinary stores: the data stays in cache for the readers
    STREAMING = "streaming"  # non-temporal stores: straight to memory, no line taken back


class StoreChooser:
    """Picks the store kind for the calls of one all-reduce path, from their measured cost.

    Args:
        streaming: whether streaming stores are available (the C library is
            loaded); without them every call is ``CACHED``.
        explore_every: every this many calls use the other kind, to notice
            when it has become the cheaper one (and, before that, calls 2,
            4, 8, ... so that short jobs learn both costs early). The kind in
            use is measured in every call, so when *it* slows down the
            choice changes at once.
        weight: weight of the newest call in the running cost of the kind in
            use (an exponentially weighted average of seconds per byte, each
            call counted as at most twice that average).
        margin: switch only when the other kind is cheaper by this fraction,
            so two near-equal costs do not make the choice flip every call.
        fixed: always this kind, measuring nothing (benchmarks and tests
            compare the kinds with it); ``STREAMING`` needs ``streaming``.
    """

    def __init__(
        self,
        streaming: bool,
        explore_every: int = 64,
        weight: float = 0.25,
        margin: float = 0.05,
        fixed: StoreKind | None = None,
    ) -> None:
        if explore_every < 2:
            raise ValueError(f"explore_every must be at least 2, got {explore_every}")
        if fixed is StoreKind.STREAMING and not streaming:
            raise ValueError("fixed=STREAMING needs streaming stores (the C library is not loaded)")
        self.fixed = fixed
        self.streaming = streaming
        self.explore_every = explore_every
        self.weight = weight
        self.margin = margin
        self.current = StoreKind.CACHED
        self.cost: dict[StoreKind, float | None] = dict.fromkeys(StoreKind)
        self.calls = 0

    def pick(self) -> StoreKind:
        """The kind for the next call (call ``record`` with its cost afterwards)."""
        if self.fixed is not None:
            return self.fixed
        if not self.streaming:
            return StoreKind.CACHED
        self.calls += 1
        c = self.calls
        # early (calls 2, 4, 8, ...) so a short job learns both costs, then steadily
        if c % self.explore_every == 0 or (c > 1 and c & (c - 1) == 0):
            return _other(self.current)
        return self.current

    def record(self, kind: StoreKind, seconds: float, nbytes: int) -> None:
        """Fold one call's duration into ``kind``'s cost and choose again."""
        if self.fixed is not None or not self.streaming or nbytes <= 0:
            return
        per_byte = seconds / nbytes
        old = self.cost[kind]
        if old is None:
            self.cost[kind] = per_byte
        else:
            # A call of the kind in use is one sample of many; a tried call is the
            # only fresh news of the other kind and replaces its cost. Either counts
            # at most as twice the old cost: a call disturbed by something else
            # on the machine must not flip the choice.
            weight = self.weight if kind is self.current else 1.0
            self.cost[kind] = old + weight * min(per_byte - old, old)
        mine, theirs = self.cost[self.current], self.cost[_other(self.current)]
        if mine is not None and theirs is not None and theirs < mine * (1.0 - self.margin):
            self.current = _other(self.current)


def _other(kind: StoreKind) -> StoreKind:
    return StoreKind.STREAMING if kind is StoreKind.CACHED else StoreKind.CACHED
