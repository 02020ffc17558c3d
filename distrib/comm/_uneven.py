"""All-to-all with blocks of any size: torch's ``all_to_all`` lists and
``all_to_all_single`` split sizes.

Two collectives, both issued at the call (so every rank queues them in the
same order as its other operations):

1. the ranks agree on sizes: each contributes the element counts it sends to
   and expects from every rank, and every rank gets the whole table. A pair
   that disagrees is the same ``DistMismatchError`` on every rank before any
   data moves, and a rank calling something else is a mismatch, not a timeout;
2. the blocks move in one engine all-to-all, each padded to the largest block
   of the call: the engines move equal blocks only. Equal blocks everywhere
   move unpadded; skewed ones cost up to ``n x largest block`` per rank. Its
   call descriptor carries the dtype, so ranks disagreeing on it are a
   mismatch too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import DistMismatchError
from .._xp import xp_of
from ..transport._calldesc import CallDesc
from ._call import check_array, descriptor, issue
from ._group import ProcessGroup

__all__ = ["exchange_blocks"]


def exchange_blocks(
    pg: ProcessGroup,
    name: str,
    outs: list[Any],
    ins: list[Any],
    async_op: bool,
    result: list[Any] | None = None,
) -> Any:
    """``outs[i]`` gets rank i's ``ins[me]``, blocks of any size (their element counts
    must agree pairwise); a ``Work`` whose result is ``result`` (default ``outs``) when
    async, else ``None`` once done."""
    n, me = pg.size(), pg.rank()
    for arg, blocks in (("input", ins), ("output", outs)):
        if not isinstance(blocks, (list, tuple)) or len(blocks) != n:
            got = len(blocks) if isinstance(blocks, (list, tuple)) else type(blocks).__name__
            raise ValueError(
                f"{name}: expected {n} {arg} blocks (one per rank of the group), got "
                f"{got} on rank {pg.global_rank}"
            )
    check_array(pg, ins[0], "input block 0", name)
    like = ins[0]
    for arg, blocks in (("input", ins), ("output", outs)):
        for i, block in enumerate(blocks):
            check_array(pg, block, f"{arg} block {i}", name, writable=arg == "output")
            if block.dtype != like.dtype:
                raise ValueError(
                    f"{name}: {arg} block {i} has dtype {block.dtype} on rank {pg.global_rank}; "
                    f"every block needs the dtype of input block 0 ({like.dtype})"
                )
    width = 2 * n
    counts = np.array([a.size for a in ins] + [b.size for b in outs], np.int64)
    table = np.empty(n * width, np.int64)
    gathered = [False]  # set once the table is complete

    def gather_sizes(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        table[me * width : (me + 1) * width] = counts
        engine.all_gather(table, seq, deadline, call=call)
        gathered[0] = True
        return [table]

    def move(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        # Runs after gather_sizes (issue order); a failure there failed the group (then
        # this never runs) or raised to its caller: never move blocks on a partial table.
        if not gathered[0]:
            raise DistMismatchError(
                f"{name}: the ranks' block sizes were not exchanged on rank {pg.global_rank}",
                rank=pg.global_rank,
                op=name,
            )
        rows = table.reshape(n, width)
        _check_table(pg, name, rows)
        big = int(rows[:, :n].max())
        if big:
            xp = xp_of(like)
            buf = xp.empty(n * big, like.dtype)
            for j, block in enumerate(ins):
                buf[j * big : j * big + block.size] = xp.asarray(block).reshape(-1)
            out = xp.empty(n * big, like.dtype)
            engine.all_to_all(buf, out, seq, deadline, call=call)
            for i, block in enumerate(outs):
                xp.copyto(block, out[i * big : i * big + block.size].reshape(block.shape))
        return list(outs) if result is None else result

    sizes = descriptor(f"{name} (block sizes)", shape=(width,), dtype=counts.dtype.str)
    # A synchronous call waits in each step itself, so a cross-group wait cycle is
    # found in either (an async call leaves the first one to the progress thread).
    issue(pg, name, counts, sizes, gather_sizes, async_op)
    data = descriptor(f"{name} (blocks)", dtype=like.dtype.str)
    return issue(pg, name, like, data, move, async_op)


def _check_table(pg: ProcessGroup, name: str, rows: np.ndarray) -> None:
    """Every rank runs this on the same table: all raise the same error, or none does."""
    n = pg.size()
    sends, expects = rows[:, :n], rows[:, n : 2 * n]
    bad = np.argwhere(sends != expects.T)  # sends[i, j]: rank i to j; expects[j, i]: j from i
    if len(bad):
        i, j = (int(v) for v in bad[0])
        src, dst = pg.global_ranks[i], pg.global_ranks[j]
        raise DistMismatchError(
            f"{name}: rank {src} sends {int(sends[i, j])} elements to rank {dst}, which "
            f"expects {int(expects[j, i])} from it (its output block {i}); the split sizes "
            "of the two ranks must agree",
            rank=pg.global_rank,
            op=name,
            peer=dst if pg.global_rank == src else src,
        )
