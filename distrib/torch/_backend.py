"""``DistribProcessGroup``: torch.distributed's ``ProcessGroup`` over distrib's collectives.

torch calls these methods with the GIL held, from Python (``dist.all_reduce``)
or from C++ (DistributedDataParallel's reducer). A call with
``opts.asyncOp=False`` runs on the caller's thread, as distrib's own
synchronous collectives do; otherwise it is handed to the distrib group's
progress thread and the caller gets a ``Work`` whose future resolves (with the
output tensors) when the collective finishes there. Tensors travel as
``.numpy()`` views: nothing is copied on the way in or out.

Rendezvous: the group's rank 0 starts a distrib ``TCPStore`` (port 0) on the
address of torch's store and publishes it through torch's store; every rank
then joins a distrib ``ProcessGroup`` through it, which picks shared memory on
one host and the ZeroMQ ring across hosts.
"""

from __future__ import annotations

import datetime
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as _tdist

from .. import comm as dcomm
from .._config import config
from .._errors import DistUsageError
from ..comm._group import ProcessGroup as _Group
from ..store import PrefixStore, TCPStore
from ..store._leave import leave
from ..store._rendezvous import _bind_host_towards
from ._tensors import Staged, as_array, reduce_op
from ._work import TorchWork

# torch's stubs do not describe the Python ProcessGroup API this module uses.
tdist: Any = _tdist

__all__ = ["BACKEND_NAME", "DistribProcessGroup", "create"]

BACKEND_NAME = "distrib"
_ADDR_KEY = "distrib/store_addr"


def _store_host(store: Any) -> str:
    """The host of torch's TCPStore under ``store`` (127.0.0.1 for file and hash stores)."""
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return str(getattr(store, "host", "") or "127.0.0.1")


def _seconds(timeout: Any) -> float:
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


class DistribProcessGroup(tdist.ProcessGroup):  # type: ignore[misc]
    """A torch ``ProcessGroup`` whose collectives are distrib's (CPU tensors)."""

    def __init__(
        self,
        store: Any,
        rank: int,
        size: int,
        timeout: Any,
        global_ranks: list[int] | None = None,
        group_name: str = "",
    ) -> None:
        super().__init__(rank, size)
        self._group_name = group_name
        seconds = _seconds(timeout)
        host = _store_host(store)
        if rank == 0:
            self._store = TCPStore(host, 0, is_master=True, timeout=seconds, wait_for_workers=False)
            store.set(_ADDR_KEY, f"{self._store.port}")
        else:
            port = int(store.get(_ADDR_KEY).decode())
            self._store = TCPStore(host, port, timeout=seconds)
            # named if the connection drops: the group's rank 0 died
            self._store.hosted_by = f"rank {global_ranks[0] if global_ranks else 0}"
        bind_host = "127.0.0.1" if host.startswith("127.") else _bind_host_towards(host, 0)
        try:
            self._group = _Group(
                PrefixStore(f"distrib/torch/{group_name}", self._store),
                rank,
                size,
                list(global_ranks) if global_ranks else list(range(size)),
                seconds,
                BACKEND_NAME,
                bind_host,
                config().transport or "auto",
            )
        except BaseException:
            self._store.close()
            raise
        self._closed = False

    # -- identity --------------------------------------------------------------
    def getBackendName(self) -> str:
        return BACKEND_NAME

    def name(self) -> str:
        return BACKEND_NAME

    # torch keeps a group's name in its C++ backends, which a Python ProcessGroup has
    # none of: kept here, destroy_process_group(group) finds the group by it.
    @property
    def group_name(self) -> str:
        return self._group_name

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    def __repr__(self) -> str:
        return f"<DistribProcessGroup rank {self.rank()}/{self.size()}>"

    # torch asks a group for its per-device backends; this group is its own, on CPU.
    supports_splitting = False
    supports_coalescing = False
    supports_time_estimate = False

    @property
    def _device_types(self) -> list[torch.device]:
        return [torch.device("cpu")]

    def _get_backend(self, device: Any) -> DistribProcessGroup:
        kind = torch.device(device).type
        if kind != "cpu":
            raise DistUsageError(
                f"_get_backend: the 'distrib' backend runs CPU tensors only, not {kind}; "
                "create a separate group for them (dist.new_group(backend='nccl'))",
                rank=self._group.global_rank,
                op="_get_backend",
            )
        return self

    # -- issue -----------------------------------------------------------------
    def _run(
        self,
        where: str,
        opts: Any,
        calls: Sequence[Callable[..., Any]],
        outputs: list[torch.Tensor],
        staged: Staged,
        source_rank: int | None = None,
    ) -> TorchWork:
        """Run the distrib calls in order; a torch ``Work`` that resolves to ``outputs``."""
        rank = self._group.global_rank
        if not getattr(opts, "asyncOp", True):
            # Issue every part before waiting on any: a send completes once its receiver
            # accepted it, so each rank's receives must be queued behind its sends.
            pending = []
            for call in calls:
                part = call(False)
                if part is not None:  # point-to-point parts of a composite call
                    pending.append(part)
            for part in pending:
                part.wait()
            staged.finish()
            return TorchWork(where, rank, outputs, source_rank, finished=True)
        work = TorchWork(where, rank, outputs, source_rank)
        parts = [part for part in (call(True) for call in calls) if part is not None]
        _settle_when_all_done(parts, work, staged)
        return work

    def _arrays(self, ts: list[Any], arg: str, where: str, staged: Staged, arith: bool) -> list:
        rank = self._group.global_rank
        return [as_array(t, f"{arg}[{i}]", where, staged, arith, rank) for i, t in enumerate(ts)]

    def _root(self, opts: Any, where: str) -> int:
        return self._peer(opts.rootRank, "root", where)

    def _peer(self, index: Any, arg: str, where: str) -> int:
        """The global rank of group rank ``index`` (torch passes group ranks), checked."""
        n = self._group.size()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise DistUsageError(
                f"{where}: {arg}={index!r} is not a rank of this group of {n} "
                f"(expected 0..{n - 1})",
                rank=self._group.global_rank,
                op=where,
            )
        return self._group.global_ranks[index]

    def _tag(self, tag: Any, where: str) -> int:
        if isinstance(tag, bool) or not isinstance(tag, int) or tag < 0:
            raise DistUsageError(
                f"{where}: tag must be a non-negative int, got {tag!r}",
                rank=self._group.global_rank,
                op=where,
            )
        return tag

    # -- collectives -------------------------------------------------------------
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        opts = opts or tdist.AllreduceOptions()
        s = Staged()
        op = reduce_op(opts.reduceOp, "allreduce", self._group.global_rank)
        arrs = self._arrays(tensors, "tensors", "allreduce", s, True)
        g = self._group
        calls = [lambda a_, a=a: dcomm.all_reduce(a, op, g, a_) for a in arrs]
        return self._run("allreduce", opts, calls, tensors, s)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        opts = opts or tdist.BroadcastOptions()
        s = Staged()
        arrs = self._arrays(tensors, "tensors", "broadcast", s, False)
        root, g = self._root(opts, "broadcast"), self._group
        calls = [lambda a_, a=a: dcomm.broadcast(a, root, g, a_) for a in arrs]
        return self._run("broadcast", opts, calls, tensors, s)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        opts = opts or tdist.ReduceOptions()
        s = Staged()
        op = reduce_op(opts.reduceOp, "reduce", self._group.global_rank)
        arrs = self._arrays(tensors, "tensors", "reduce", s, True)
        root, g = self._root(opts, "reduce"), self._group
        calls = [lambda a_, a=a: dcomm.reduce(a, root, op, g, a_) for a in arrs]
        return self._run("reduce", opts, calls, tensors, s)

    def allgather(
        self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        opts = opts or tdist.AllgatherOptions()
        s = Staged()
        ins = self._arrays(inputs, "input_tensors", "allgather", s, False)
        outs = [self._arrays(o, "output_tensors", "allgather", s, False) for o in output_lists]
        g = self._group
        calls = [
            lambda a_, o=o, i=i: dcomm.all_gather(o, i, g, a_)
            for o, i in zip(outs, ins, strict=True)
        ]
        return self._run("allgather", opts, calls, output_lists, s)  # type: ignore[arg-type]

    def allgather_coalesced(
        self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        opts = opts or tdist.AllgatherOptions()
        s = Staged()
        g = self._group
        calls = []
        for out_list, t in zip(output_lists, inputs, strict=True):
            i = as_array(
                t, "input_tensor_list", "allgather_coalesced", s, False, self._group.global_rank
            )
            o = self._arrays(out_list, "output_tensor_lists", "allgather_coalesced", s, False)
            calls.append(lambda a_, o=o, i=i: dcomm.all_gather(o, i, g, a_))
        return self._run("allgather_coalesced", opts, calls, output_lists, s)  # type: ignore[arg-type]

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        return self._gather_single([output], [input], opts or tdist.AllgatherOptions())

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        return self.all_gather_single(output, input, opts)

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self._gather_single(outputs, inputs, opts or tdist.AllgatherOptions())

    def allgather_into_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self._gather_single(outputs, inputs, opts or tdist.AllgatherOptions())

    def _gather_single(self, outputs: list, inputs: list, opts: Any) -> Any:
        s = Staged()
        o = self._arrays(outputs, "output_tensor", "all_gather_single", s, False)
        i = self._arrays(inputs, "input_tensor", "all_gather_single", s, False)
        g = self._group
        calls = [
            lambda a_, x=x, y=y: dcomm.all_gather_into_tensor(x, y, g, a_)
            for x, y in zip(o, i, strict=True)
        ]
        return self._run("all_gather_single", opts, calls, outputs, s)

    def gather(
        self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        opts = opts or tdist.GatherOptions()
        s = Staged()
        i = as_array(inputs[0], "tensor", "gather", s, False, self._group.global_rank)
        out = (
            self._arrays(output_lists[0], "gather_list", "gather", s, False)
            if output_lists
            else None
        )
        root, g = self._root(opts, "gather"), self._group
        calls = [lambda a_: dcomm.gather(i, out, root, g, a_)]
        return self._run("gather", opts, calls, output_lists, s)  # type: ignore[arg-type]

    def scatter(
        self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        opts = opts or tdist.ScatterOptions()
        s = Staged()
        o = as_array(outputs[0], "tensor", "scatter", s, False, self._group.global_rank)
        ins = (
            self._arrays(input_lists[0], "scatter_list", "scatter", s, False)
            if input_lists
            else None
        )
        root, g = self._root(opts, "scatter"), self._group
        calls = [lambda a_: dcomm.scatter(o, ins, root, g, a_)]
        return self._run("scatter", opts, calls, outputs, s)

    def reduce_scatter(
        self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        opts = opts or tdist.ReduceScatterOptions()
        s = Staged()
        op = reduce_op(opts.reduceOp, "reduce_scatter", self._group.global_rank)
        g = self._group
        calls = []
        for out, in_list in zip(outputs, input_lists, strict=True):
            o = as_array(out, "output", "reduce_scatter", s, True, self._group.global_rank)
            i = self._arrays(in_list, "input_list", "reduce_scatter", s, True)
            calls.append(lambda a_, o=o, i=i: dcomm.reduce_scatter(o, i, op, g, a_))
        return self._run("reduce_scatter", opts, calls, outputs, s)

    def reduce_scatter_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> Any:
        return self._scatter_single([output], [input], opts or tdist.ReduceScatterOptions())

    def _reduce_scatter_base(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> Any:
        return self.reduce_scatter_single(output, input, opts)

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self._scatter_single(outputs, inputs, opts or tdist.ReduceScatterOptions())

    def reduce_scatter_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self._scatter_single(outputs, inputs, opts or tdist.ReduceScatterOptions())

    def _scatter_single(self, outputs: list, inputs: list, opts: Any) -> Any:
        s = Staged()
        op = reduce_op(opts.reduceOp, "reduce_scatter_single", self._group.global_rank)
        o = self._arrays(outputs, "output", "reduce_scatter_single", s, True)
        i = self._arrays(inputs, "input", "reduce_scatter_single", s, True)
        g = self._group
        calls = [
            lambda a_, x=x, y=y: dcomm.reduce_scatter_tensor(x, y, op, g, a_)
            for x, y in zip(o, i, strict=True)
        ]
        return self._run("reduce_scatter_single", opts, calls, outputs, s)

    def alltoall(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        opts = opts or tdist.AllToAllOptions()
        s = Staged()
        o = self._arrays(outputs, "output_tensor_list", "alltoall", s, False)
        i = self._arrays(inputs, "input_tensor_list", "alltoall", s, False)
        g = self._group  # blocks of any size (distrib.all_to_all agrees on them first)
        return self._run("alltoall", opts, [lambda a_: dcomm.all_to_all(o, i, g, a_)], outputs, s)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> Any:
        opts = opts or tdist.AllToAllOptions()
        s = Staged()
        o = as_array(output, "output", "all_to_all_single", s, False, self._group.global_rank)
        i = as_array(input, "input", "all_to_all_single", s, False, self._group.global_rank)
        outs, ins = list(output_split_sizes), list(input_split_sizes)  # empty: even
        g = self._group
        calls = [lambda a_: dcomm.all_to_all_single(o, i, outs or None, ins or None, g, a_)]
        return self._run("all_to_all_single", opts, calls, [output], s)

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> Any:
        return self.all_to_all_single(output, input, output_split_sizes, input_split_sizes, opts)

    def barrier(self, opts: Any = None) -> Any:
        opts = opts or tdist.BarrierOptions()
        g = self._group
        # torch's barrier(timeout=...) arrives as opts.timeout; unset, it is negative
        seconds = opts.timeout.total_seconds()
        limit = seconds if seconds > 0 else None
        calls = [lambda a_: dcomm.barrier(g, a_, timeout=limit)]
        return self._run("barrier", opts, calls, [], Staged())

    # -- point to point (peers are group ranks, as torch passes them) -----------------
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> Any:
        s = Staged()
        arrs = self._arrays(tensors, "tensor", "send", s, False)
        peer, g = self._peer(dst, "dst", "send"), self._group
        tag = self._tag(tag, "send")
        calls = [lambda a_, a=a: dcomm.isend(a, peer, g, tag) for a in arrs]
        return self._run("send", None, calls, tensors, s)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> Any:
        s = Staged()
        arrs = self._arrays(tensors, "tensor", "recv", s, False)
        peer, g = self._peer(src, "src", "recv"), self._group
        tag = self._tag(tag, "recv")
        calls = [lambda a_, a=a: dcomm.irecv(a, peer, g, tag) for a in arrs]
        return self._run("recv", None, calls, tensors, s, source_rank=src)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> Any:
        raise DistUsageError(
            "recv: the 'distrib' backend has no receive from any source; pass src=<rank>",
            rank=self._group.global_rank,
            op="recv",
        )

    def monitored_barrier(self, *args: Any, **kwargs: Any) -> Any:
        raise DistUsageError(
            "monitored_barrier: torch only forwards it to gloo; call distrib.monitored_barrier() "
            "(same arguments, names the late ranks) or use a gloo group",
            rank=self._group.global_rank,
            op="monitored_barrier",
        )

    # -- lifecycle ---------------------------------------------------------------
    def shutdown(self) -> None:
        """Finish queued work, close the distrib group and its store (rank 0, which
        hosts it, last: ``distrib.store._leave``)."""
        self._close(linger=True)

    def abort(self) -> None:
        self._close(linger=False)

    def _close(self, linger: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._group.close()
            if linger and self._group.failure is None:
                leave(self._store, self._group.size())
        finally:
            self._store.close()


def _settle_when_all_done(parts: list[Any], work: TorchWork, staged: Staged) -> None:
    """Settle ``work`` once every part finished (a send's verdict can come after later
    receives), or with the first part's error."""
    left = [len(parts)]
    lock = threading.Lock()

    def settle(exc: BaseException | None) -> None:
        if exc is None:
            try:
                staged.finish()
            except Exception as e:  # a failed copy back must still settle the work
                exc = e
        work.settle(exc)

    def done(part: Any) -> None:
        exc = part.exception()
        with lock:
            if left[0] <= 0:  # already settled by an earlier error
                return
            left[0] = 0 if exc is not None else left[0] - 1
            now = left[0] == 0
        if now:
            settle(exc)

    if not parts:
        settle(None)
    for part in parts:
        part.add_done_callback(done)


def _other_backends() -> dict[str, str]:
    """The devices that the group being created maps to other backends than "distrib"
    (``"cpu:distrib,cuda:nccl"``), read from torch's caller, which does not pass them."""
    frame = sys._getframe(1)
    while frame is not None:
        config = frame.f_locals.get("backend_config")
        if isinstance(config, tdist.distributed_c10d.BackendConfig):
            devices = config.get_device_backend_map()
            return {d: str(b) for d, b in devices.items() if str(b).lower() != BACKEND_NAME}
        frame = frame.f_back  # type: ignore[assignment]
    return {}


def create(opts: Any, pg_options: Any = None) -> DistribProcessGroup:
    """torch's backend creator (extended API): one ``DistribProcessGroup`` per torch group."""
    if pg_options is not None:
        raise DistUsageError(
            "init_process_group: the 'distrib' backend takes no pg_options", op="init_process_group"
        )
    others = _other_backends()
    if others:
        # torch replaces the whole group with a Python backend's: the others would be lost.
        mixed = ",".join(f"{d}:{b}" for d, b in others.items())
        raise DistUsageError(
            f"init_process_group: the 'distrib' backend cannot share a group with other "
            f"backends ({mixed}): torch lets a Python backend replace the whole group. Create "
            f"them as separate groups, e.g. init_process_group('nccl') then "
            f"dist.new_group(backend='distrib') for CPU tensors",
            rank=opts.group_rank,
            op="init_process_group",
        )
    return DistribProcessGroup(
        opts.store,
        opts.group_rank,
        opts.group_size,
        opts.timeout,
        list(opts.global_ranks_in_group or []),
        str(opts.group_id or ""),
    )
