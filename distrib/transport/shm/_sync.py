"""Phase counters in shared memory: signal, wait (spin, then futex), liveness.

Protocol: every local rank owns one 32-bit *phase counter* in the shared
header and is its only writer. A rank publishes "my writes for phase p are
done" by storing p into its counter; a reader waits until a peer's counter has
reached p (32-bit wrap-around compare). x86 keeps stores in order (TSO), so
data written before the counter store is visible to whoever sees the counter.

Waiting spins briefly (cheap when every rank has a core), then sleeps in
``futex(FUTEX_WAIT)`` on the peer's counter word, having first announced itself
in its own ``waiting_on`` word; a signaller wakes the counter's futex only when
some rank announced it is asleep on it, so the fast path costs no syscall. A
full fence between "store counter" and "load waiting_on" (and symmetrically in
the kernel's futex_wait) closes the lost-wakeup race; sleeps are also bounded
(``_SLEEP_S``), so a missed wake costs at most that long, never a hang.

While asleep, the waiter checks the deadline, the shared abort word, a local
abort reason, and whether the peer process still exists (a pidfd becomes
readable when its process ends, zombie or not).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from ..._errors import DistError, DistPeerLostError, DistTimeoutError
from ..._machine import machine
from ..._sched_slice import shorten as shorten_slice

__all__ = ["PhaseSync", "reached"]

_SYS_FUTEX = 202  # x86_64; other architectures fall back to timed sleeps
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
# Spin iterations before sleeping: ~40 us of polling at ~0.1 us each. Measured
# (docs/performance.md): a wake-up through futex costs ~15-30 us round trip on
# this machine, so spinning longer than that only burns a core someone else
# (an oversubscribed rank) could use.
_SPIN = 400
# After spinning, poll with sched_yield for this long before a futex sleep: a
# yield round trip costs ~6 us against ~20-60 us for a futex wake-up on this VM,
# and a yielding waiter still lets other runnable processes use the core.
_YIELD_S = 0.002
# Longest single futex sleep: bounds the cost of a missed wake-up and the delay
# before noticing a dead peer or an abort.
_SLEEP_S = 0.02
# How often a sleeping waiter checks the peers' pidfds.
_LIVENESS_S = 0.05

_HEADER_LINE = 128  # bytes per rank in the header: two cache lines, no false sharing
_WORDS_PER_LINE = _HEADER_LINE // 4
# word offsets inside a rank's line
_COUNTER = 0
_WAITING_ON = 1
_PID = 2
_DIGEST = 3  # 4 words: the call-descriptor digest (2 words) for each pipeline half
_ADDR = 7  # 2 words: address of this rank's buffer in the current single-copy op
# global line (before the rank lines): abort word = 1 + the local rank that aborted
_ABORT = 0
_CULPRIT = 1  # 1 + the (global) rank whose death or lateness caused the abort


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_syscall() -> Any:
    if os.uname().machine != "x86_64":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()


def reached(value: int, target: int) -> bool:
    """Whether 32-bit counter ``value`` is at or past ``target`` (wrap-around safe)."""
    return ((value - target) & 0xFFFFFFFF) < 0x80000000


def header_bytes(size: int) -> int:
    """Bytes of header for ``size`` ranks (global line + one line per rank)."""
    return _HEADER_LINE * (1 + size)


class PhaseSync:
    """Signal and wait on per-rank phase counters living in a shared header.

    Args:
        header: writable buffer of at least ``header_bytes(size)`` bytes, shared
            by every local rank (same offsets in every process).
        header_addr: its address in this process (for futex calls).
        rank, size: this rank and the number of local ranks.
        global_ranks: group rank of each local rank (for error messages).
        pids: process id of each local rank (liveness checks).
        spin: polls before sleeping; default ``_SPIN``, or 0 when there are
            more local ranks than usable cores.
        yield_s: then poll with ``sched_yield`` for this long before sleeping.
        check_failed: raises the failure another rank of the group published
            (called while asleep, every ``_LIVENESS_S``).
    """

    def __init__(
        self,
        header: memoryview,
        header_addr: int,
        rank: int,
        size: int,
        global_ranks: list[int],
        pids: list[int],
        spin: int | None = None,
        yield_s: float | None = None,
        check_failed: Callable[[], None] | None = None,
    ) -> None:
        self._check_failed = check_failed
        # Spin only when every local rank can own a core: oversubscribed, a
        # spinning waiter steals the CPU from the rank it waits for (measured:
        # 7 ranks on 2 cores, futex-only barriers ran 4x faster than spin-400).
        if spin is None:
            spin = _SPIN if size <= machine().usable_cores else 0
        self._spin = spin
        self._yield_s = _YIELD_S if yield_s is None else yield_s
        self._words = header.cast("I")
        self._addr = header_addr
        self.rank = rank
        self.size = size
        self._global = global_ranks
        self._pids = pids
        self._counter_idx = [_WORDS_PER_LINE * (1 + q) + _COUNTER for q in range(size)]
        self._waiting_idx = [_WORDS_PER_LINE * (1 + q) + _WAITING_ON for q in range(size)]
        self._fence_lock = threading.Lock()
        self._local_abort: str | None = None
        self._pidfds: dict[int, int] = {}
        for q, pid in enumerate(pids):
            if q == rank:
                continue
            try:
                self._pidfds[q] = os.pidfd_open(pid)
            except (OSError, AttributeError):
                pass  # no pidfd support: fall back to os.kill(pid, 0) checks
        self._last_liveness = 0.0

    # -- publishing --------------------------------------------------------
    def signal(self, phase: int) -> None:
        """Publish that this rank's writes for ``phase`` are complete; wake sleepers."""
        my_idx = self._counter_idx[self.rank]
        self._words[my_idx] = phase & 0xFFFFFFFF
        self._fence()
        me = self.rank + 1
        words = self._words
        for idx in self._waiting_idx:
            if words[idx] == me:
                self._wake(my_idx)
                return

    def counter(self, q: int) -> int:
        """Current phase counter of local rank ``q``."""
        return self._words[self._counter_idx[q]]

    # -- waiting -----------------------------------------------------------
    def wait(self, q: int, phase: int, op: str, deadline: float) -> None:
        """Return once local rank ``q`` has signalled ``phase`` (or raise)."""
        words = self._words
        idx = self._counter_idx[q]
        target = phase & 0xFFFFFFFF
        if ((words[idx] - target) & 0xFFFFFFFF) < 0x80000000:
            return
        for _ in range(self._spin):
            if ((words[idx] - target) & 0xFFFFFFFF) < 0x80000000:
                return
        # The core goes to others now (often this process's compute thread): ask to
        # run soon after the peer signals, not after their slice (_sched_slice).
        shorten_slice()
        if self._yield_s > 0.0:
            # Poll, giving the CPU away between polls: the peer (or anyone) may
            # run, yet we notice its signal without paying a futex wake-up.
            end = time.monotonic() + self._yield_s
            while True:
                for _ in range(8):
                    os.sched_yield()
                    if ((words[idx] - target) & 0xFFFFFFFF) < 0x80000000:
                        return
                if time.monotonic() >= end:
                    break
        self._sleep_until(q, idx, target, op, deadline)

    def wait_all(self, phase: int, op: str, deadline: float) -> None:
        """Return once every local rank has signalled ``phase``."""
        for q in range(self.size):
            if q != self.rank:
                self.wait(q, phase, op, deadline)

    def _sleep_until(self, q: int, idx: int, target: int, op: str, deadline: float) -> None:
        words = self._words
        my_wait = self._waiting_idx[self.rank]
        try:
            while True:
                # The counter first: a peer may signal and then exit (its part
                # is done); only a peer that died *before* signalling is lost.
                if ((words[idx] - target) & 0xFFFFFFFF) < 0x80000000:
                    return
                self.check(op, q)
                now = time.monotonic()
                if now >= deadline:
                    raise DistTimeoutError(
                        f"{op}: rank {self._global[self.rank]} timed out waiting for rank "
                        f"{self._global[q]} (shared-memory phase {target}, peer at "
                        f"{words[idx]}); raise the timeout (DISTRIB_TIMEOUT or "
                        "init_process_group(timeout=...)) if the peer is just slow",
                        rank=self._global[self.rank],
                        op=op,
                        peer=self._global[q],
                    )
                if now - self._last_liveness >= _LIVENESS_S:
                    self._last_liveness = now
                    if self._is_dead(q):
                        if ((words[idx] - target) & 0xFFFFFFFF) < 0x80000000:
                            return  # it signalled, then exited
                        if self._check_failed is not None:
                            # A failure published before the exit (a mismatch the
                            # peer found, then it stopped) explains it: that one wins.
                            self._check_failed()
                        self._raise_lost(q, op)
                    if self._check_failed is not None:
                        try:
                            self._check_failed()
                        except DistError:
                            # The peer may have signalled while the store was asked, and
                            # the store's host (rank 0) finished and left: then this step
                            # is done; a real failure surfaces at the next one.
                            if ((words[idx] - target) & 0xFFFFFFFF) < 0x80000000:
                                return
                            raise
                words[my_wait] = q + 1
                self._fence()
                value = words[idx]
                if ((value - target) & 0xFFFFFFFF) < 0x80000000:
                    return
                self._futex_wait(idx, value, min(_SLEEP_S, max(deadline - now, 0.0)))
                if ((words[idx] - target) & 0xFFFFFFFF) < 0x80000000:
                    return
        finally:
            words[my_wait] = 0

    # -- failure -----------------------------------------------------------
    def check(self, op: str, peer: int | None = None) -> None:
        """Raise if this engine was aborted locally or by another local rank."""
        if self._local_abort is None and self._words is not None and not self._words[_ABORT]:
            return  # the common case, checked before every step: keep it cheap
        me = self._global[self.rank]
        culprit_word = self._words[_CULPRIT] if self._words is not None else 0
        culprit = culprit_word - 1 if culprit_word else None
        if self._local_abort is not None:
            raise DistPeerLostError(
                f"{op}: rank {me}: shared-memory engine aborted: {self._local_abort}",
                rank=me,
                op=op,
                peer=culprit
                if culprit is not None
                else (None if peer is None else self._global[peer]),
            )
        aborter = self._words[_ABORT]
        if aborter:
            who = self._global[aborter - 1]
            lost = f"; the problem was rank {culprit}" if culprit is not None else ""
            raise DistPeerLostError(
                f"{op}: rank {me}: rank {who} failed and aborted the shared-memory "
                f"collectives of this group{lost}",
                rank=me,
                op=op,
                peer=culprit if culprit is not None else who,
            )

    def abort(self, reason: str, culprit: int | None = None) -> None:
        """Fail this rank's current and future waits, and tell the other local ranks.

        ``culprit`` is the (global) rank found dead or late, if any: the other
        ranks' errors name it as their peer.
        """
        self._local_abort = reason
        if self._words is None:
            return  # closed
        if not self._words[_ABORT]:
            if isinstance(culprit, int) and 0 <= culprit < 0xFFFFFFFF:
                self._words[_CULPRIT] = culprit + 1
            self._words[_ABORT] = self.rank + 1
        self._fence()
        for idx in self._counter_idx:
            self._wake(idx)

    def _raise_lost(self, q: int, op: str) -> None:
        raise DistPeerLostError(
            f"{op}: rank {self._global[self.rank]}: peer rank {self._global[q]} "
            f"(pid {self._pids[q]}) exited during a shared-memory collective",
            rank=self._global[self.rank],
            op=op,
            peer=self._global[q],
        )

    def _is_dead(self, q: int) -> bool:
        fd = self._pidfds.get(q)
        if fd is not None:
            readable, _, _ = select.select([fd], [], [], 0)
            return bool(readable)
        try:
            os.kill(self._pids[q], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def close(self) -> None:
        """Close the pidfds and release the header view; idempotent."""
        if self._words is not None:
            self._words.release()
            self._words = None  # type: ignore[assignment]
        fds, self._pidfds = self._pidfds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    # -- primitives ----------------------------------------------------------
    def _fence(self) -> None:
        # A lock round trip is a locked instruction on x86: a full memory fence,
        # ordering our store before the following load (the Dekker pattern).
        with self._fence_lock:
            pass

    def _futex_wait(self, idx: int, expected: int, timeout_s: float) -> None:
        if _syscall is None:
            time.sleep(min(timeout_s, 0.001))
            return
        ts = _timespec(int(timeout_s), int((timeout_s % 1.0) * 1e9))
        r = _syscall(
            _SYS_FUTEX,
            ctypes.c_void_p(self._addr + 4 * idx),
            _FUTEX_WAIT,
            ctypes.c_uint32(expected),
            ctypes.byref(ts),
            None,
            0,
        )
        if r == -1 and ctypes.get_errno() not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
            time.sleep(0.001)  # unexpected: degrade to a short sleep, stay correct

    def _wake(self, idx: int) -> None:
        if _syscall is None:
            return
        _syscall(
            _SYS_FUTEX,
            ctypes.c_void_p(self._addr + 4 * idx),
            _FUTEX_WAKE,
            0x7FFFFFFF,
            None,
            None,
            0,
        )

    def publish_digest(self, half: int, digest: int) -> None:
        """Write this rank's 64-bit call digest for the step using ``half``.

        Per-half words: a rank rewrites them no sooner than two steps later,
        after everyone finished this one (the engine's lag-2 guard).
        """
        base = _WORDS_PER_LINE * (1 + self.rank) + _DIGEST + 2 * half
        self._words[base] = digest & 0xFFFFFFFF
        self._words[base + 1] = digest >> 32

    def digest(self, q: int, half: int) -> int:
        """Local rank ``q``'s published call digest for ``half``."""
        base = _WORDS_PER_LINE * (1 + q) + _DIGEST + 2 * half
        return self._words[base] | (self._words[base + 1] << 32)

    def publish_addr(self, addr: int) -> None:
        """Write the address of this rank's buffer for a single-copy (CMA) op."""
        base = _WORDS_PER_LINE * (1 + self.rank) + _ADDR
        self._words[base] = addr & 0xFFFFFFFF
        self._words[base + 1] = addr >> 32

    def addr(self, q: int) -> int:
        """Local rank ``q``'s published buffer address."""
        base = _WORDS_PER_LINE * (1 + q) + _ADDR
        return self._words[base] | (self._words[base + 1] << 32)

    def native_words(self) -> tuple[list[int], list[int]]:
        """Addresses of every rank's counter and "waiting on" word (for the C step)."""
        return (
            [self._addr + 4 * i for i in self._counter_idx],
            [self._addr + 4 * i for i in self._waiting_idx],
        )

    @property
    def spins(self) -> bool:
        """Whether waiters spin before yielding (every local rank has a core)."""
        return self._spin > 0

    def publish_pid(self) -> None:
        """Write this rank's pid into its header line (diagnostics)."""
        self._words[_WORDS_PER_LINE * (1 + self.rank) + _PID] = os.getpid() & 0xFFFFFFFF
