"""Shared-memory data movement: broadcast, all-gather, gather, scatter, all-to-all.

Each is a function of the group's ``SlotPipeline`` (``_pipeline``) and the
caller's buffers viewed as bytes, run by ``ShmEngine`` through
``SlotPipeline.run``. A step copies one chunk: the ranks that have data write
it into their own slot half and signal ``2k+1``; the ranks that need it wait
for that signal and copy it out of the writer's slot; everyone signals
``2k+2``. A rank that only writes (broadcast's root, gather's non-roots) goes
straight to ``2k+2``: counters only grow, so that also satisfies a wait for
``2k+1``. Broadcast, all-gather and gather move up to one half per step (one
writer per slot); scatter and all-to-all split the half into one part per
destination rank.
"""

from __future__ import annotations

import numpy as np

from ._pipeline import SlotPipeline

__all__ = ["all_gather", "all_to_all", "broadcast", "gather", "scatter"]


def broadcast(pipe: SlotPipeline, data: np.ndarray, root: int, deadline: float) -> None:
    """Root's ``data`` into every rank's ``data``, one half per step."""
    r, sync, name = pipe.rank, pipe.sync, "broadcast"
    src = pipe.seg.slots(np.dtype(np.uint8))[root]
    for start, c, k, h in pipe.chunks(name, data.size, pipe.half_bytes, deadline):
        chunk = data[start : start + c]
        if r == root:
            np.copyto(src[h][:c], chunk)
        else:
            sync.wait(root, 2 * k + 1, name, deadline)
            np.copyto(chunk, src[h][:c])


def all_gather(pipe: SlotPipeline, data: np.ndarray, deadline: float) -> None:
    """``data`` is n blocks; rank r's block r is its input; fill the others."""
    n, r, sync, name = pipe.size, pipe.rank, pipe.sync, "all_gather"
    slots = pipe.seg.slots(np.dtype(np.uint8))
    m = data.size // n
    for start, c, k, h in pipe.chunks(name, m, pipe.half_bytes, deadline):
        np.copyto(slots[r][h][:c], data[r * m + start : r * m + start + c])
        sync.signal(2 * k + 1)
        for q in range(n):
            if q != r:
                sync.wait(q, 2 * k + 1, name, deadline)
                np.copyto(data[q * m + start : q * m + start + c], slots[q][h][:c])


def gather(
    pipe: SlotPipeline, data: np.ndarray, out: np.ndarray | None, root: int, deadline: float
) -> None:
    """Every rank's ``data`` (m) into block r of root's ``out`` (n*m; ``None`` elsewhere)."""
    n, r, sync, name = pipe.size, pipe.rank, pipe.sync, "gather"
    slots = pipe.seg.slots(np.dtype(np.uint8))
    m = data.size
    for start, c, k, h in pipe.chunks(name, m, pipe.half_bytes, deadline):
        if r != root:
            np.copyto(slots[r][h][:c], data[start : start + c])
            continue
        assert out is not None
        np.copyto(out[r * m + start : r * m + start + c], data[start : start + c])
        for q in range(n):
            if q != r:
                sync.wait(q, 2 * k + 1, name, deadline)
                np.copyto(out[q * m + start : q * m + start + c], slots[q][h][:c])


def scatter(
    pipe: SlotPipeline, data: np.ndarray | None, out: np.ndarray, root: int, deadline: float
) -> None:
    """Block r of root's ``data`` (n*m; ``None`` elsewhere) into rank r's ``out`` (m)."""
    n, r, sync, name = pipe.size, pipe.rank, pipe.sync, "scatter"
    slots = pipe.seg.slots(np.dtype(np.uint8))
    m = out.size
    part = pipe.part_bytes
    for start, c, k, h in pipe.chunks(name, m, part, deadline):
        if r != root:
            sync.wait(root, 2 * k + 1, name, deadline)
            np.copyto(out[start : start + c], slots[root][h][r * part : r * part + c])
            continue
        assert data is not None
        for q in range(n):
            src = data[q * m + start : q * m + start + c]
            if q == r:
                np.copyto(out[start : start + c], src)
            else:
                np.copyto(slots[r][h][q * part : q * part + c], src)


def all_to_all(pipe: SlotPipeline, data: np.ndarray, out: np.ndarray, deadline: float) -> None:
    """Block j of rank i's ``data`` (n*m) into block i of rank j's ``out``."""
    n, r, sync, name = pipe.size, pipe.rank, pipe.sync, "all_to_all"
    slots = pipe.seg.slots(np.dtype(np.uint8))
    m = data.size // n
    part = pipe.part_bytes
    for start, c, k, h in pipe.chunks(name, m, part, deadline):
        mine = slots[r][h]
        for q in range(n):
            src = data[q * m + start : q * m + start + c]
            if q == r:
                np.copyto(out[r * m + start : r * m + start + c], src)
            else:
                np.copyto(mine[q * part : q * part + c], src)
        sync.signal(2 * k + 1)
        for q in range(n):
            if q != r:
                sync.wait(q, 2 * k + 1, name, deadline)
                np.copyto(
                    out[q * m + start : q * m + start + c], slots[q][h][r * part : r * part + c]
                )
