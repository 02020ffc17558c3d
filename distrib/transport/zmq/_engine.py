"""The ZeroMQ engine: collective algorithms over ``ZmqLinks`` (the reference engine).

All-reduce: a ring (reduce-scatter, then all-gather; each rank sends
2(n-1)/n of the data) streamed segment by segment: a segment is forwarded the
moment it has been reduced, so sending (zmq's I/O thread), receiving and
reducing (numpy ufunc in place, straight out of the received frame) overlap.
Small messages take recursive doubling (log2 n exchanges of the whole buffer;
non-powers of two fold the extra ranks in first). Broadcast: binomial tree when
small, pipelined chain when large; reduce: binomial tree / pipelined chain
ending at the root. The thresholds below were measured with ``distrib-bench``
(see docs/collectives.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import msgpack
import numpy as np

from ..._errors import DistMismatchError
from ..._reduce_op import ReduceOp, ufunc
from .._calldesc import CallDesc, CallsDiffer, p2p_matches, p2p_mismatch_error, pack, unpack
from .._engine import Engine, EngineContext
from ._links import AGREE, COLLECTIVE, P2P, P2P_ACK, ZmqLinks, frame_array

__all__ = ["ZmqEngine"]

# Messages are cut into segments this large: big enough that per-message Python cost is
# small against the copy, small enough that reduce/forward overlaps the next segment.
SEGMENT_BYTES = 1 << 20
# All-reduce below this many bytes uses recursive doubling instead of the ring
# (crossover measured with distrib-bench --nproc 2/4: see docs/collectives.md).
ALLREDUCE_SMALL_MAX = 96 * 1024
# Broadcast/reduce up to this many bytes use a binomial tree, above it a pipelined chain
# (measured at n=4: reduce tree/chain 232/415 us at 16K, 860/844 at 64K, 1478/1226 at 256K).
TREE_MAX = 64 * 1024


def _segments(view: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive views of at most SEGMENT_BYTES; an empty view yields itself once
    (so every step still carries one message: descriptors are always compared)."""
    n = view.shape[0]
    step = max(1, SEGMENT_BYTES // max(1, view.itemsize))
    if n == 0:
        yield view
        return
    for start in range(0, n, step):
        yield view[start : start + step]


def _blocks(buf: np.ndarray, parts: int) -> list[np.ndarray]:
    """``parts`` contiguous near-equal views of ``buf`` (the first ones one longer)."""
    bounds = [q * buf.shape[0] // parts for q in range(parts + 1)]
    return [buf[bounds[q] : bounds[q + 1]] for q in range(parts)]


class ZmqEngine(Engine):
    """Collectives among a group's ranks over ZeroMQ (any host layout)."""

    def __init__(self, ctx: EngineContext) -> None:
        self.rank, self.size = ctx.rank, ctx.size
        self.links = ZmqLinks(ctx)
        self._sent: dict[tuple[int, int], int] = {}  # (dst, tag) -> P2P messages sent
        self._received: dict[tuple[int, int], int] = {}  # (src, tag) -> P2P messages taken

    # -- call agreement ---------------------------------------------------------

    def agree(self, call: CallDesc, seq: int, deadline: float) -> None:
        """Dissemination all-gather of the packed descriptors: ceil(log2 n) rounds of one
        small message each way; every rank ends with every rank's call."""
        n, r = self.size, self.rank
        if n == 1:
            return
        mine = pack(call)
        known: dict[int, bytes] = {r: mine}
        dist = 1
        while dist < n:
            body = msgpack.packb(list(known.items()))
            self.links.send((r + dist) % n, AGREE, seq, b"", np.frombuffer(body, np.uint8))
            frame = self.links.recv((r - dist) % n, AGREE, seq, call.op, deadline)
            try:
                for q, raw in msgpack.unpackb(bytes(frame), raw=False, strict_map_key=False):
                    if isinstance(q, int) and 0 <= q < n and isinstance(raw, bytes):
                        known.setdefault(q, raw)
            except Exception:
                pass  # unreadable: that rank's call shows as unreadable below
            dist <<= 1
        if all(known.get(q) == mine for q in range(n)):
            return
        calls = [call if q == r else unpack(known.get(q, b"")) for q in range(n)]
        raise CallsDiffer(calls, call.op)

    # -- helpers -------------------------------------------------------------

    def _send(self, peer: int, seq: int, data: np.ndarray, copy: bool = False) -> None:
        self.links.send(peer, COLLECTIVE, seq, b"", data, copy)

    def _recv(self, peer: int, seq: int, op: str, deadline: float) -> Any:
        return self.links.recv(peer, COLLECTIVE, seq, op, deadline)

    def _recv_into(self, peer: int, seq: int, out: np.ndarray, op: str, deadline: float) -> None:
        frame = self._recv(peer, seq, op, deadline)
        data = frame_array(frame, out.dtype)
        self._check_len(data, out, peer, op)
        np.copyto(out, data)

    def _recv_reduce(
        self, peer: int, seq: int, acc: np.ndarray, fn: Any, op: str, deadline: float
    ) -> None:
        frame = self._recv(peer, seq, op, deadline)
        data = frame_array(frame, acc.dtype)
        self._check_len(data, acc, peer, op)
        fn(acc, data, out=acc)

    def _check_len(self, data: np.ndarray, out: np.ndarray, peer: int, op: str) -> None:
        if data.shape != out.shape:
            raise DistMismatchError(
                f"{op}: {self.links.gname(peer)} sent {data.shape[0]} elements where "
                f"{self.links.gname(self.rank)} expected {out.shape[0]}",
                rank=self.links.global_ranks[self.rank],
                op=op,
                peer=self.links.global_ranks[peer],
            )

    # -- ring pieces -----------------------------------------------------------

    def _ring_reduce_scatter(
        self, blocks: list[np.ndarray], fn: Any, seq: int, op: str, deadline: float
    ) -> None:
        """On return ``blocks[rank]`` holds the reduction of everyone's block ``rank``."""
        n, r = self.size, self.rank
        nxt, prv = (r + 1) % n, (r - 1) % n
        for seg in _segments(blocks[(r - 1) % n]):
            self._send(nxt, seq, seg)
        for step in range(n - 1):
            last = step == n - 2
            for seg in _segments(blocks[(r - step - 2) % n]):
                self._recv_reduce(prv, seq, seg, fn, op, deadline)
                if not last:
                    self._send(nxt, seq, seg)  # forward at once: the pipeline

    def _ring_all_gather(
        self, blocks: list[np.ndarray], seq: int, op: str, deadline: float
    ) -> None:
        """On entry ``blocks[rank]`` is final; on return every block is."""
        n, r = self.size, self.rank
        nxt, prv = (r + 1) % n, (r - 1) % n
        for seg in _segments(blocks[r]):
            self._send(nxt, seq, seg)
        for step in range(n - 1):
            last = step == n - 2
            for seg in _segments(blocks[(r - step - 1) % n]):
                self._recv_into(prv, seq, seg, op, deadline)
                if not last:
                    self._send(nxt, seq, seg)

    # -- collectives -----------------------------------------------------------

    def all_reduce(
        self, buf: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size == 1:
            return
        fn = ufunc(op)
        if buf.nbytes <= ALLREDUCE_SMALL_MAX:
            self._recursive_doubling(buf, fn, seq, deadline)
        else:
            blocks = _blocks(buf, self.size)
            self._ring_reduce_scatter(blocks, fn, seq, "all_reduce", deadline)
            self._ring_all_gather(blocks, seq, "all_reduce", deadline)
        self.links.flush("all_reduce", deadline)

    def _recursive_doubling(self, buf: np.ndarray, fn: Any, seq: int, deadline: float) -> None:
        n, r, name = self.size, self.rank, "all_reduce"
        p2 = 1 << (n.bit_length() - 1)
        extra = n - p2
        if r >= p2:  # fold in: hand our data to a partner, get the result back
            self._send(r - p2, seq, buf, copy=True)
            self._recv_into(r - p2, seq, buf, name, deadline)
            return
        if r < extra:
            self._recv_reduce(r + p2, seq, buf, fn, name, deadline)
        mask = 1
        while mask < p2:
            partner = r ^ mask
            self._send(partner, seq, buf, copy=True)  # buf changes right after
            # a op b == b op a bit for bit, so both partners hold identical results.
            self._recv_reduce(partner, seq, buf, fn, name, deadline)
            mask <<= 1
        if r < extra:
            self._send(r + p2, seq, buf)

    def broadcast(
        self, buf: Any, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size == 1:
            return
        if buf.nbytes <= TREE_MAX:
            self._tree_broadcast(buf, root, seq, deadline)
        else:
            n, r = self.size, self.rank
            pos = (r - root) % n
            child = (r + 1) % n if pos < n - 1 else None
            for seg in _segments(buf):
                if pos > 0:
                    self._recv_into((r - 1) % n, seq, seg, "broadcast", deadline)
                if child is not None:
                    self._send(child, seq, seg)
        self.links.flush("broadcast", deadline)

    def _tree_broadcast(self, buf: np.ndarray, root: int, seq: int, deadline: float) -> None:
        n = self.size
        v = (self.rank - root) % n
        mask = 1
        while mask < n:
            if v & mask:
                self._recv_into((v - mask + root) % n, seq, buf, "broadcast", deadline)
                break
            mask <<= 1
        mask >>= 1
        while mask > 0:
            if v + mask < n:
                self._send((v + mask + root) % n, seq, buf)
            mask >>= 1

    def reduce(
        self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size == 1:
            return
        fn, n, r = ufunc(op), self.size, self.rank
        if buf.nbytes <= TREE_MAX:
            v, mask = (r - root) % n, 1
            while mask < n:
                if v & mask:
                    self._send((v - mask + root) % n, seq, buf)
                    break
                if v | mask < n:
                    self._recv_reduce(((v | mask) + root) % n, seq, buf, fn, "reduce", deadline)
                mask <<= 1
        else:
            # Chain root+1 -> root+2 -> ... -> root, segment by segment.
            pos = (r - root - 1) % n
            for seg in _segments(buf):
                if pos > 0:
                    self._recv_reduce((r - 1) % n, seq, seg, fn, "reduce", deadline)
                if pos < n - 1:
                    self._send((r + 1) % n, seq, seg)
        self.links.flush("reduce", deadline)

    def all_gather(self, out: Any, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        if self.size > 1:
            self._ring_all_gather(_blocks(out, self.size), seq, "all_gather", deadline)
            self.links.flush("all_gather", deadline)

    def reduce_scatter(
        self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size == 1:
            np.copyto(out, buf)
            return
        work = buf.copy()  # the ring reduces in place; the caller's input stays intact
        blocks = _blocks(work, self.size)
        self._ring_reduce_scatter(blocks, ufunc(op), seq, "reduce_scatter", deadline)
        np.copyto(out, blocks[self.rank])
        self.links.flush("reduce_scatter", deadline)

    def gather(
        self,
        buf: Any,
        out: Any | None,
        root: int,
        seq: int,
        deadline: float,
        *,
        call: CallDesc | None,
    ) -> None:
        if self.rank != root:
            for seg in _segments(buf):
                self._send(root, seq, seg)
        else:
            blocks = _blocks(cast(np.ndarray, out), self.size)
            np.copyto(blocks[root], buf)
            for peer in range(self.size):
                if peer != root:
                    for seg in _segments(blocks[peer]):
                        self._recv_into(peer, seq, seg, "gather", deadline)
        self.links.flush("gather", deadline)

    def scatter(
        self,
        buf: Any | None,
        out: Any,
        root: int,
        seq: int,
        deadline: float,
        *,
        call: CallDesc | None,
    ) -> None:
        if self.rank == root:
            blocks = _blocks(cast(np.ndarray, buf), self.size)
            for peer in range(self.size):
                if peer != root:
                    for seg in _segments(blocks[peer]):
                        self._send(peer, seq, seg)
            np.copyto(out, blocks[root])
        else:
            for seg in _segments(out):
                self._recv_into(root, seq, seg, "scatter", deadline)
        self.links.flush("scatter", deadline)

    def all_to_all(
        self, buf: Any, out: Any, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        n, r = self.size, self.rank
        ins, outs = _blocks(buf, n), _blocks(out, n)
        # Send to r+1, r+2, ... and receive from r-1, r-2, ...: no two ranks hammer one peer.
        for k in range(1, n):
            for seg in _segments(ins[(r + k) % n]):
                self._send((r + k) % n, seq, seg)
        np.copyto(outs[r], ins[r])
        for k in range(1, n):
            for seg in _segments(outs[(r - k) % n]):
                self._recv_into((r - k) % n, seq, seg, "all_to_all", deadline)
        self.links.flush("all_to_all", deadline)

    def barrier(self, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        # Dissemination barrier: ceil(log2 n) rounds of one empty message each way.
        n, r, dist = self.size, self.rank, 1
        empty = np.empty(0, np.uint8)
        while dist < n:
            self._send((r + dist) % n, seq, empty)
            self._recv_into((r - dist) % n, seq, empty, "barrier", deadline)
            dist <<= 1

    def send(self, buf: Any, dst: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        """Send ``buf`` with its descriptor ``call`` (``None``: one built from ``buf``); the
        receiver checks it before writing and answers (``confirm_send`` waits for that)."""
        desc = call or CallDesc("send", (int(buf.shape[0]),), buf.dtype.str)
        key = (dst, tag)
        self._sent[key] = self._sent.get(key, 0) + 1
        self.links.send(dst, P2P, tag, pack(desc), buf)
        self.links.flush("send", deadline)

    def await_p2p(self, src: int, tag: int, deadline: float, give_way: Callable[[], bool]) -> bool:
        return self.links.await_message(src, P2P, tag, "recv", deadline, give_way)

    def has_p2p(self, src: int, tag: int) -> bool:
        return self.links.has_message(src, P2P, tag)

    def has_verdict(self, dst: int, tag: int, n: int) -> bool:
        return self.links.has_ack(dst, tag, n)

    def last_send(self, dst: int, tag: int) -> int:
        """Number of the latest ``send`` to ``dst`` with ``tag`` (for ``confirm_send``)."""
        return self._sent.get((dst, tag), 0)

    def confirm_send(
        self,
        dst: int,
        tag: int,
        n: int,
        call: CallDesc | None,
        deadline: float,
        give_way: Callable[[], bool] | None = None,
    ) -> bool:
        verdict = self.links.take_ack(dst, tag, n, "send", deadline, give_way)
        if verdict is None:
            return False
        if verdict:
            g = self.links.global_ranks
            raise p2p_mismatch_error(g[self.rank], g[dst], call, unpack(verdict), tag, g[self.rank])
        return True

    def recv(self, buf: Any, src: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        """Receive into ``buf`` after comparing the sender's descriptor with ``call``
        (``None``: one built from ``buf``); the verdict goes back to the sender and a
        mismatch raises here too, before any byte is written."""
        posted = call or CallDesc("recv", (int(buf.shape[0]),), buf.dtype.str)
        desc, frame = self.links.recv_with_desc(src, P2P, tag, "recv", deadline)
        key = (src, tag)
        count = self._received[key] = self._received.get(key, 0) + 1
        sent = unpack(desc)
        data = np.frombuffer(frame, dtype=np.uint8)
        ok = p2p_matches(sent, posted) and data.nbytes == buf.nbytes
        reply = b"" if ok else pack(posted)
        self.links.send(
            src, P2P_ACK, tag, count.to_bytes(8, "little"), np.frombuffer(reply, np.uint8)
        )
        g = self.links.global_ranks
        if not ok:
            if sent is not None and p2p_matches(sent, posted):
                sent = sent._replace(shape=(data.nbytes // max(1, buf.itemsize),))
            raise p2p_mismatch_error(g[src], g[self.rank], sent, posted, tag, g[self.rank])
        np.copyto(buf.view(np.uint8), data)

    def abort(self, reason: str, culprit: int | None = None, cls_name: str = "") -> None:
        """Tell every peer (over our own connections) that this rank failed and whose
        failure it follows, so none of them blames this rank's exit."""
        me = self.links.global_ranks[self.rank]
        self.links.send_abort(me if culprit is None else culprit, cls_name, reason)

    def close(self) -> None:
        self.links.close()
