"""Shared-memory collectives among the ranks of one machine.

``ShmEngine`` is every collective of the ``Engine`` interface over one node's
shared segment: the step protocol, checks and failure handling come from
``ShmPipeline`` (``_shm_pipeline``), the reductions from ``ShmReductions``
(``_shm_reduce``), and the data movement (broadcast, gathers, scatter,
all-to-all) is here. Point-to-point goes to a separate engine (ZeroMQ).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._reduce import ShmReductions

__all__ = ["ShmEngine"]


def _bytes(buf: Any) -> np.ndarray:
    return buf.view(np.uint8)


class ShmEngine(ShmReductions):
    """Collectives among ranks that share one segment (one machine).

    Constructed as ``ShmPipeline`` (segment, ranks, pids, point-to-point
    engine, checks); ``_shm_rendezvous.connect_local`` builds it.
    """

    # -- data movement -------------------------------------------------------
    def broadcast(self, buf: Any, root: int, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("broadcast", deadline, self._broadcast, _bytes(buf), root, deadline)

    def _broadcast(self, data: np.ndarray, root: int, deadline: float) -> None:
        r, sync, name = self.rank, self._sync, "broadcast"
        src = self._seg.slots(np.dtype(np.uint8))[root]
        step = self._half_bytes
        for start in range(0, data.size, step):
            chunk = data[start : start + step]
            k = self._begin(name, deadline)
            h = k & 1
            if r == root:
                np.copyto(src[h][: chunk.size], chunk)
            else:
                sync.wait(root, 2 * k + 1, name, deadline)
                np.copyto(chunk, src[h][: chunk.size])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def all_gather(self, out: Any, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("all_gather", deadline, self._all_gather, _bytes(out), deadline)

    def _all_gather(self, data: np.ndarray, deadline: float) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "all_gather"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = data.size // n
        step = self._half_bytes
        for start in range(0, m, step):
            c = min(step, m - start)
            k = self._begin(name, deadline)
            h = k & 1
            np.copyto(slots[r][h][:c], data[r * m + start : r * m + start + c])
            sync.signal(2 * k + 1)
            for q in range(n):
                if q != r:
                    sync.wait(q, 2 * k + 1, name, deadline)
                    np.copyto(data[q * m + start : q * m + start + c], slots[q][h][:c])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def gather(self, buf: Any, out: Any | None, root: int, seq: int, deadline: float) -> None:
        if self.size == 1:
            if out is not None:
                np.copyto(out, buf)
            return
        dst = None if out is None or self.rank != root else _bytes(out)
        self._run("gather", deadline, self._gather, _bytes(buf), dst, root, deadline)

    def _gather(self, data: np.ndarray, out: np.ndarray | None, root: int, deadline: float) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "gather"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = data.size
        step = self._half_bytes
        for start in range(0, m, step):
            c = min(step, m - start)
            k = self._begin(name, deadline)
            h = k & 1
            if r != root:
                np.copyto(slots[r][h][:c], data[start : start + c])
            else:
                assert out is not None
                np.copyto(out[r * m + start : r * m + start + c], data[start : start + c])
                for q in range(n):
                    if q != r:
                        sync.wait(q, 2 * k + 1, name, deadline)
                        np.copyto(out[q * m + start : q * m + start + c], slots[q][h][:c])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def scatter(self, buf: Any | None, out: Any, root: int, seq: int, deadline: float) -> None:
        if self.size == 1:
            if buf is not None:
                np.copyto(out, buf)
            return
        src = _bytes(buf) if self.rank == root else None
        self._run("scatter", deadline, self._scatter, src, _bytes(out), root, deadline)

    def _scatter(
        self, data: np.ndarray | None, out: np.ndarray, root: int, deadline: float
    ) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "scatter"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = out.size
        part = self._part_bytes
        for start in range(0, m, part):
            c = min(part, m - start)
            k = self._begin(name, deadline)
            h = k & 1
            if r == root:
                assert data is not None
                for q in range(n):
                    src = data[q * m + start : q * m + start + c]
                    if q == r:
                        np.copyto(out[start : start + c], src)
                    else:
                        np.copyto(slots[r][h][q * part : q * part + c], src)
            else:
                sync.wait(root, 2 * k + 1, name, deadline)
                np.copyto(out[start : start + c], slots[root][h][r * part : r * part + c])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def all_to_all(self, buf: Any, out: Any, seq: int, deadline: float) -> None:
        if self.size == 1:
            np.copyto(out, buf)
            return
        self._run("all_to_all", deadline, self._all_to_all, _bytes(buf), _bytes(out), deadline)

    def _all_to_all(self, data: np.ndarray, out: np.ndarray, deadline: float) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "all_to_all"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = data.size // n
        part = self._part_bytes
        for start in range(0, m, part):
            c = min(part, m - start)
            k = self._begin(name, deadline)
            h = k & 1
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
            sync.signal(2 * k + 2)
            self._step = k + 1
