"""NCCL collectives through ``cupy.cuda.nccl``, one GPU per rank, with a hang watchdog.

Setup: rank 0 makes the unique id and publishes it in the group's store (as a
msgpack list of ints); every rank builds its communicator in a helper thread so
that a missing peer becomes a ``DistTimeoutError`` instead of a hang. Calls
enqueue on the caller's current cupy stream and return. Each call records a
CUDA event; a watchdog thread aborts the communicator (``abort()``) when an
event is still pending past the group timeout or ``check_async_error()``
reports a failure, and the next call raises the stored error. Reductions NCCL
cannot do (bitwise ops, int16, complex products) are done as an
all-gather followed by the fused local kernel, so results match the other
engines exactly.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import numpy as np

from ..._errors import (
    DistBackendError,
    DistClosedError,
    DistPeerLostError,
    DistTimeoutError,
    DistUsageError,
)
from ..._reduce_op import ReduceOp
from ...gpu._driver import check_not_forked, mark_cuda_used
from ...gpu._kernels import copy_async, fused_reduce
from .._calldesc import CallDesc
from .._engine import Engine

__all__ = ["NcclEngine"]

_WATCH_PERIOD_S = 0.01  # watchdog poll period: cheap (event queries), and far below any timeout


def _dtypes(nccl: Any) -> dict[str, int]:
    return {
        "|i1": nccl.NCCL_INT8,
        "|u1": nccl.NCCL_UINT8,
        "|b1": nccl.NCCL_UINT8,
        "<i4": nccl.NCCL_INT32,
        "<u4": nccl.NCCL_UINT32,
        "<i8": nccl.NCCL_INT64,
        "<u8": nccl.NCCL_UINT64,
        "<f2": nccl.NCCL_FLOAT16,
        "<f4": nccl.NCCL_FLOAT32,
        "<f8": nccl.NCCL_FLOAT64,
    }


class NcclEngine(Engine):
    """The ``Engine`` over one NCCL communicator (each rank on its own GPU).

    No fused agreement: the group agrees through the CPU engine before each
    collective, so every method ignores its ``call`` (send and recv too: NCCL
    carries bytes only).
    """

    def __init__(
        self, store: Any, rank: int, size: int, device: int, timeout: float, key: str = "nccl"
    ) -> None:
        import cupy
        from cupy.cuda import nccl

        check_not_forked("NCCL collectives")
        mark_cuda_used()
        self._cupy = cupy
        self._nccl = nccl
        self.rank = rank
        self.size = size
        self.device = device
        self.timeout = timeout
        self._error: BaseException | None = None
        self._closed = False
        self._inflight: list[tuple[Any, float, str]] = []
        self._lock = threading.Lock()
        self._dt = _dtypes(nccl)
        self._ops = {
            ReduceOp.SUM: nccl.NCCL_SUM,
            ReduceOp.PRODUCT: nccl.NCCL_PROD,
            ReduceOp.MIN: nccl.NCCL_MIN,
            ReduceOp.MAX: nccl.NCCL_MAX,
            # AVG accumulates as SUM; the process group divides once (the engine contract).
            ReduceOp.AVG: nccl.NCCL_SUM,
        }
        if rank == 0:
            uid = nccl.get_unique_id()  # bytes in cupy >= 14, a tuple of ints before
            wire = bytes(uid) if isinstance(uid, (bytes, bytearray)) else list(uid)
            store.set(f"{key}/uid", msgpack.packb(wire, use_bin_type=True))
        got = msgpack.unpackb(store.get(f"{key}/uid"), raw=False)
        self.comm = self._init_comm(got, time.monotonic() + timeout)
        with cupy.cuda.Device(device):
            self._scratch = cupy.zeros(1, dtype=cupy.int32)
        self._stop = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"distrib-nccl-watchdog-{rank}", daemon=True
        )
        self._watchdog.start()

    def _init_comm(self, uid: Any, deadline: float) -> Any:
        result: dict[str, Any] = {}
        # cupy 14 takes the id as bytes, older cupy as a tuple of (signed) ints.
        as_bytes = bytes(uid) if isinstance(uid, bytes) else bytes(b & 0xFF for b in uid)
        as_tuple = tuple(b - 256 if b > 127 else b for b in as_bytes)

        def build() -> None:
            try:
                with self._cupy.cuda.Device(self.device):
                    try:
                        comm = self._nccl.NcclCommunicator(self.size, as_bytes, self.rank)
                    except TypeError:
                        comm = self._nccl.NcclCommunicator(self.size, as_tuple, self.rank)
                    result["comm"] = comm
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=build, name="distrib-nccl-init", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise DistTimeoutError(
                f"rank {self.rank}/{self.size}: NCCL communicator setup timed out after "
                f"{self.timeout:.1f}s (a rank did not join; check that every rank called "
                "init_process_group, or raise the timeout)",
                rank=self.rank,
                op="nccl.init",
            )
        if "error" in result:
            exc = result["error"]
            raise DistBackendError(
                f"rank {self.rank}/{self.size}: NCCL communicator setup failed on GPU "
                f"{self.device}: {exc}",
                rank=self.rank,
                op="nccl.init",
            ) from exc
        return result["comm"]

    # ------------------------------------------------------------ watchdog

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_PERIOD_S):
            with self._lock:
                self._inflight = [item for item in self._inflight if not item[0].done]
                late = [item for item in self._inflight if time.monotonic() > item[1]]
            error: BaseException | None = None
            if late:
                _, _, opname = late[0]
                error = DistTimeoutError(
                    f"rank {self.rank}/{self.size}: NCCL {opname} did not complete within "
                    f"{self.timeout:.1f}s; the communicator was aborted (a peer is gone or "
                    "ranks called different collectives)",
                    rank=self.rank,
                    op=opname,
                )
            else:
                try:
                    self.comm.check_async_error()
                except Exception as exc:
                    error = DistBackendError(
                        f"rank {self.rank}/{self.size}: NCCL reported an asynchronous error: "
                        f"{exc}; the communicator was aborted",
                        rank=self.rank,
                        op="nccl",
                    )
            if error is not None:
                self._fail(error)
                return

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
        try:
            self.comm.abort()
        except Exception:
            pass

    def _begin(self, opname: str) -> Any:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise DistClosedError(
                f"rank {self.rank}: {opname} on a closed NCCL engine", rank=self.rank, op=opname
            )
        return self._cupy.cuda.get_current_stream()

    def _end(self, opname: str, stream: Any) -> None:
        ev = self._cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        with self._lock:
            self._inflight.append((ev, time.monotonic() + self.timeout, opname))

    def wait_idle(self, deadline: float) -> None:
        """Block until every enqueued call finished; raise the watchdog's error if any."""
        while True:
            with self._lock:
                pending = [e for e, _, _ in self._inflight if not e.done]
            if self._error is not None:
                raise self._error
            if not pending:
                return
            if time.monotonic() > deadline:
                raise DistTimeoutError(
                    f"rank {self.rank}/{self.size}: NCCL work still pending at the deadline",
                    rank=self.rank,
                    op="nccl.wait",
                )
            time.sleep(0.0005)

    # ------------------------------------------------------------ helpers

    def _native(self, dtype: np.dtype, op: ReduceOp) -> tuple[int, int, int] | None:
        """(nccl dtype, nccl op, element multiplier) if NCCL can reduce it natively."""
        if dtype.kind == "c" and op in (ReduceOp.SUM, ReduceOp.AVG):
            base = "<f4" if dtype.itemsize == 8 else "<f8"
            return self._dt[base], self._ops[op], 2
        if dtype.kind == "b":
            bool_op = {
                ReduceOp.SUM: ReduceOp.MAX,
                ReduceOp.AVG: ReduceOp.MAX,
                ReduceOp.PRODUCT: ReduceOp.MIN,
            }.get(op, op)
            if bool_op in (ReduceOp.MIN, ReduceOp.MAX):
                return self._dt["|u1"], self._ops[bool_op], 1
            return None
        nccl_dt = self._dt.get(dtype.str)
        nccl_op = self._ops.get(op)
        if nccl_dt is None or nccl_op is None:
            return None
        return nccl_dt, nccl_op, 1

    def _gathered_reduce(
        self, buf: Any, op: ReduceOp, stream: Any, dsts: list[int], block: int = 0
    ) -> None:
        """All-gather every rank's ``buf`` (bytes), then reduce locally with the fused kernel."""
        cupy = self._cupy
        src = buf.reshape(-1).view(cupy.uint8) if block == 0 else buf
        nbytes = src.nbytes
        gathered = cupy.empty(nbytes * self.size, dtype=cupy.uint8)
        self.comm.allGather(
            int(src.data.ptr), int(gathered.data.ptr), nbytes, self._dt["|u1"], stream.ptr
        )
        base = int(gathered.data.ptr)
        count = buf.size if block == 0 else block
        srcs = [base + r * nbytes for r in range(self.size)]
        # Dropping `gathered` now is safe: cupy's pool reuses it only on this stream, in order.
        fused_reduce(cupy, srcs, dsts, count, buf.dtype, op, stream)

    # ------------------------------------------------------------ collectives

    def all_reduce(
        self, buf: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        with self._cupy.cuda.Device(self.device):
            stream = self._begin("all_reduce")
            native = self._native(buf.dtype, op)
            ptr = int(buf.data.ptr)
            if native is not None:
                dt, nop, mult = native
                self.comm.allReduce(ptr, ptr, buf.size * mult, dt, nop, stream.ptr)
            else:
                self._gathered_reduce(buf, op, stream, [ptr])
            self._end("all_reduce", stream)

    def reduce(
        self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        with self._cupy.cuda.Device(self.device):
            stream = self._begin("reduce")
            native = self._native(buf.dtype, op)
            ptr = int(buf.data.ptr)
            if native is not None:
                dt, nop, mult = native
                self.comm.reduce(ptr, ptr, buf.size * mult, dt, nop, root, stream.ptr)
            else:
                self._gathered_reduce(buf, op, stream, [ptr] if self.rank == root else [])
            self._end("reduce", stream)

    def broadcast(
        self, buf: Any, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        with self._cupy.cuda.Device(self.device):
            stream = self._begin("broadcast")
            ptr = int(buf.data.ptr)
            # cupy declares broadcast's count as a C int: move 8-byte words when possible.
            wide = buf.nbytes % 8 == 0
            count, dt = (buf.nbytes // 8, "<u8") if wide else (buf.nbytes, "|u1")
            self.comm.broadcast(ptr, ptr, count, self._dt[dt], root, stream.ptr)
            self._end("broadcast", stream)

    def all_gather(self, out: Any, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        if isinstance(out, np.ndarray):  # the group's descriptor check gathers a numpy digest
            with self._cupy.cuda.Device(self.device):
                dev = self._cupy.asarray(out)
                self.all_gather(dev, seq, deadline, call=None)
                out[...] = dev.get()
            return
        with self._cupy.cuda.Device(self.device):
            stream = self._begin("all_gather")
            blk = out.nbytes // self.size
            base = int(out.data.ptr)
            # In place: NCCL allows sendbuff == recvbuff + rank * count.
            self.comm.allGather(base + self.rank * blk, base, blk, self._dt["|u1"], stream.ptr)
            self._end("all_gather", stream)

    def reduce_scatter(
        self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        with self._cupy.cuda.Device(self.device):
            stream = self._begin("reduce_scatter")
            native = self._native(buf.dtype, op)
            if native is not None:
                dt, nop, mult = native
                self.comm.reduceScatter(
                    int(buf.data.ptr), int(out.data.ptr), out.size * mult, dt, nop, stream.ptr
                )
            else:
                blk = out.nbytes
                gathered = self._cupy.empty(blk * self.size * self.size, dtype=self._cupy.uint8)
                # Every rank needs block r of every rank: all-gather the full buffers, reduce ours.
                whole = buf.view(self._cupy.uint8)
                self.comm.allGather(
                    int(whole.data.ptr), int(gathered.data.ptr), whole.nbytes,
                    self._dt["|u1"], stream.ptr,
                )  # fmt: skip
                base = int(gathered.data.ptr)
                srcs = [base + r * whole.nbytes + self.rank * blk for r in range(self.size)]
                fused_reduce(
                    self._cupy, srcs, [int(out.data.ptr)], out.size, out.dtype, op, stream,
                )  # fmt: skip
            self._end("reduce_scatter", stream)

    def _grouped(self, opname: str, pairs: list[tuple[str, int, int, int]]) -> None:
        """Run (kind, ptr, nbytes, peer) sends/recvs as one NCCL group."""
        with self._cupy.cuda.Device(self.device):
            stream = self._begin(opname)
            nccl = self._nccl
            nccl.groupStart()
            try:
                for kind, ptr, nbytes, peer in pairs:
                    if kind == "send":
                        self.comm.send(ptr, nbytes, self._dt["|u1"], peer, stream.ptr)
                    else:
                        self.comm.recv(ptr, nbytes, self._dt["|u1"], peer, stream.ptr)
            finally:
                nccl.groupEnd()
            self._end(opname, stream)

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
        blk = buf.nbytes
        if self.rank != root:
            self._grouped("gather", [("send", int(buf.data.ptr), blk, root)])
            return
        if out is None:
            raise DistUsageError(f"rank {root}: gather needs `out` on the root", op="gather")
        base = int(out.data.ptr)
        with self._cupy.cuda.Device(self.device):
            copy_async(self._cupy, base + root * blk, int(buf.data.ptr), blk, self._begin("gather"))
        pairs = [("recv", base + r * blk, blk, r) for r in range(self.size) if r != root]
        self._grouped("gather", pairs)

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
        blk = out.nbytes
        if self.rank != root:
            self._grouped("scatter", [("recv", int(out.data.ptr), blk, root)])
            return
        if buf is None:
            raise DistUsageError(f"rank {root}: scatter needs `buf` on the root", op="scatter")
        base = int(buf.data.ptr)
        with self._cupy.cuda.Device(self.device):
            copy_async(
                self._cupy, int(out.data.ptr), base + root * blk, blk, self._begin("scatter")
            )
        pairs = [("send", base + r * blk, blk, r) for r in range(self.size) if r != root]
        self._grouped("scatter", pairs)

    def all_to_all(
        self, buf: Any, out: Any, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        blk = buf.nbytes // self.size
        src, dst = int(buf.data.ptr), int(out.data.ptr)
        with self._cupy.cuda.Device(self.device):
            me = self.rank
            copy_async(self._cupy, dst + me * blk, src + me * blk, blk, self._begin("all_to_all"))
        pairs: list[tuple[str, int, int, int]] = []
        for peer in range(self.size):
            if peer != self.rank:
                pairs.append(("send", src + peer * blk, blk, peer))
                pairs.append(("recv", dst + peer * blk, blk, peer))
        self._grouped("all_to_all", pairs)

    def barrier(self, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        with self._cupy.cuda.Device(self.device):
            stream = self._begin("barrier")
            ptr = int(self._scratch.data.ptr)
            self.comm.allReduce(ptr, ptr, 1, self._dt["<i4"], self._nccl.NCCL_SUM, stream.ptr)
            self._end("barrier", stream)
            self.wait_idle(deadline)

    def send(self, buf: Any, dst: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        self._grouped("send", [("send", int(buf.data.ptr), buf.nbytes, dst)])

    def recv(self, buf: Any, src: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        self._grouped("recv", [("recv", int(buf.data.ptr), buf.nbytes, src)])

    # ------------------------------------------------------------ lifecycle

    def abort(self, reason: str, culprit: int | None = None, cls_name: str = "") -> None:
        self._fail(
            DistPeerLostError(
                f"rank {self.rank}/{self.size}: NCCL communicator aborted: {reason}",
                rank=self.rank,
                op="nccl",
            )
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._watchdog.join(timeout=5.0)
        if self._error is None:
            try:
                with self._cupy.cuda.Device(self.device):
                    self.wait_idle(time.monotonic() + self.timeout)
                self.comm.destroy()
            except Exception:
                self.comm.abort()
