"""The small all-reduce in one compiled call (``_oneshot.c``), when it was built.

A 4 KiB all-reduce through the general road (call object, group queue, engine,
``_reduce._one_shot``) spends several microseconds in Python for under one of
moving data. Here the group hands a small synchronous all-reduce straight to
one C call, which runs the same step as ``_one_shot`` on the same segment: copy
in, publish the call digest, signal, wait for every rank, compare the digests,
fold in rank order, signal. Ranks on either road work together (one may take
this one while another, with async work queued, takes the general road).

Only short spins happen in C. A peer not there yet comes back here: Python
waits for it with the timeout, the liveness and abort checks and the futex
sleep of ``PhaseSync``, then resumes the C step where it stopped.

An extension module call costs about 0.05 us against 0.5-1.5 us through
ctypes (``benchmarks/bench_call_cost.py``), which is why this is an extension
and the large all-reduce's step (``_native``, a few calls per megabyte) is not.
Without a compiler at install time the module is absent and ``build`` returns
``None``: every all-reduce takes the general road.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..._config import config
from ..._errors import DistError
from ..._reduce_op import ReduceOp
from .._calldesc import CallDesc
from ._pipeline import SlotPipeline

try:
    from . import _oneshot
except ImportError:  # built without a C compiler: the general road only
    _oneshot = None  # type: ignore[assignment]

__all__ = ["OP_CODES", "SmallAllReduce", "build"]

# The ops the C fold implements (float MIN/MAX are refused there: NaN and -0.0 rules).
OP_CODES = {ReduceOp.SUM: 0, ReduceOp.PRODUCT: 1, ReduceOp.MIN: 2, ReduceOp.MAX: 3}

# A wait in C: first polls (only when every local rank has a core of its own),
# then sched_yield calls, which hand the core to whoever is runnable (with more
# ranks than cores, often the peer awaited), then back to Python's futex wait.
# Both are bounds on work, not tuned times: a poll is a load, a yield a syscall.
_SPIN = 4000
_YIELDS = 256


class SmallAllReduce:
    """One local rank's compiled small all-reduce on its group's segment.

    ``step(stage, array, op_code, digest, verify)`` returns ``DONE`` (the array
    holds the result and the pipeline advanced), ``NOT_HANDLED`` (nothing was
    touched: take the general road), or a code for ``finish`` to complete.
    """

    op_codes: dict[ReduceOp, int] = OP_CODES

    def __init__(self, pipe: SlotPipeline, max_bytes: int) -> None:
        assert _oneshot is not None
        lay = pipe.seg.layout
        halves = [
            tuple(pipe.seg.addr + lay.slot_offset(q) + h * lay.half_bytes for q in range(pipe.size))
            for h in (0, 1)
        ]
        spin = _SPIN if pipe.sync.spins else 0
        self._pipe = pipe
        self._one = _oneshot.OneShot(
            pipe, pipe.seg.addr, halves[0], halves[1], pipe.rank, max_bytes, spin, _YIELDS
        )
        self.step: Callable[[int, Any, int, int, bool], int] = self._one.step

    def finish(
        self,
        code: int,
        buf: Any,
        op_code: int,
        digest: int,
        verify: bool,
        call: CallDesc | None,
        deadline: float,
    ) -> None:
        """Complete a step that ``step`` handed back (waits, a digest mismatch, aborts)."""
        pipe, one = self._pipe, self._one
        sync = pipe.sync

        def resume(_pipe: SlotPipeline, code: int) -> None:
            while code != _oneshot.DONE:
                k = pipe.step
                if code == _oneshot.WAIT_FREE:
                    sync.wait(one.blocked, 2 * k - 1, "all_reduce", deadline)
                elif code == _oneshot.WAIT_INPUTS:
                    sync.wait(one.blocked, 2 * k + 1, "all_reduce", deadline)
                elif code == _oneshot.DIFFER:
                    assert call is not None
                    pipe.check_calls(call, k, k & 1, deadline)  # raises CallsDiffer
                elif code == _oneshot.ABORTED:
                    sync.check("all_reduce")  # raises the abort
                elif code == _oneshot.CLOSED:
                    pipe.begin("all_reduce", deadline)  # raises DistClosedError
                else:
                    raise DistError(
                        f"all_reduce: the compiled small all-reduce failed (code {code})",
                        rank=pipe.me,
                        op="all_reduce",
                    )
                code = one.step(code, buf, op_code, digest, verify)
                if code == _oneshot.NOT_HANDLED:  # only if the array changed between steps
                    raise DistError(
                        "all_reduce: the array changed while it was being reduced",
                        rank=pipe.me,
                        op="all_reduce",
                    )

        pipe.run("all_reduce", deadline, resume, code)

    def close(self) -> None:
        """Refuse every later step (the segment is about to be unmapped)."""
        self._one.close()


def build(pipe: SlotPipeline, max_bytes: int) -> SmallAllReduce | None:
    """The compiled path for ``pipe``, or ``None`` (not built, or ``DISTRIB_NATIVE=0``)."""
    if (
        _oneshot is None
        or config().native is False
        or pipe.size < 2
        or pipe.size > 64
        or max_bytes <= 0
    ):
        return None
    return SmallAllReduce(pipe, max_bytes)
