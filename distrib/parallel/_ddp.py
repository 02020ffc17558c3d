"""DistributedDataParallel over a model given as a mapping of names to arrays.

Lifecycle of one step: the caller hands in each gradient with ``grad_ready``
as backward produces it (or writes it straight into ``ddp.grads[name]``, a view
into the bucket's flat buffer). When a bucket is full its all-reduce is issued
asynchronously, so it overlaps the rest of backward. Buckets are issued strictly
in bucket order on every rank (a full bucket waits for the earlier ones), which
keeps the collective sequence identical across ranks whatever order gradients
arrive in. ``synchronize()`` waits for every bucket and leaves the averaged
gradients in place; then the next step starts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .._errors import DistMismatchError, DistTimeoutError, DistUsageError
from .._xp import is_cupy, xp_of
from ._buckets import Bucket, ParamSpec, assign_buckets, build_buckets
from ._hooks import CommHook, allreduce_hook

__all__ = ["DistributedDataParallel"]

_MB = 1024 * 1024


class DistributedDataParallel:
    """Synchronous data parallelism: bucketed, overlapped gradient averaging.

    Args:
        params: mapping ``name -> array`` in registration (forward) order; any
            array numpy can view without copying works (a torch CPU tensor's
            ``.numpy()``), or cupy arrays.
        group: the process group (default: the default group).
        bucket_cap_mb: cap of every bucket but the first, in MiB.
        first_bucket_mb: cap of the first bucket (the last layers), in MiB.
        last_bucket_mb: if set, the last bucket (the first layers, whose
            gradients come last) holds the first parameter and those after it
            up to this many MiB more, so less communication is left once
            backward ends; ``None`` (default): torch's layout.
        broadcast: copy rank 0's parameters to every rank at construction.
        comm_hook: how buckets travel (``allreduce_hook``, ``fp16_compress_hook``).
        timeout: seconds ``synchronize`` waits per bucket (default: the group's).

    Raises:
        DistMismatchError: ranks disagree on parameter names, shapes or dtypes.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        *,
        group: Any = None,
        bucket_cap_mb: float = 25,
        first_bucket_mb: float = 1,
        last_bucket_mb: float | None = None,
        broadcast: bool = True,
        comm_hook: CommHook = allreduce_hook,
        timeout: float | None = None,
    ) -> None:
        from .. import comm

        if not isinstance(params, Mapping) or not params:
            raise TypeError(
                "DistributedDataParallel: params must be a non-empty mapping of name -> array"
            )
        last = 1.0 if last_bucket_mb is None else last_bucket_mb
        if min(bucket_cap_mb, first_bucket_mb, last) <= 0:
            raise ValueError(
                f"DistributedDataParallel: bucket_cap_mb={bucket_cap_mb}, "
                f"first_bucket_mb={first_bucket_mb} and last_bucket_mb={last_bucket_mb} "
                "must be > 0"
            )
        if not isinstance(comm_hook, CommHook):
            raise TypeError(
                f"DistributedDataParallel: comm_hook must be a CommHook, got {comm_hook!r}"
            )
        if group is None and not comm.is_initialized():
            raise DistUsageError(
                "DistributedDataParallel: no process group; call "
                "distrib.init_process_group() first (or run under distrib-run)",
                op="DistributedDataParallel",
            )
        self.group = group
        self.rank = comm.get_rank(group)
        self.world_size = comm.get_world_size(group)
        self.timeout = timeout
        self.comm_hook = comm_hook
        self.params: dict[str, Any] = {}
        specs = []
        for name, p in params.items():
            if not isinstance(name, str):
                raise TypeError(f"DistributedDataParallel: parameter name {name!r} is not a str")
            arr = p if is_cupy(p) else np.asarray(p)
            if not (is_cupy(arr) or np.shares_memory(arr, p) or arr is p):
                raise TypeError(
                    f"DistributedDataParallel: parameter {name!r} ({type(p).__name__}) cannot "
                    "be viewed as an array without a copy"
                )
            if not np.issubdtype(arr.dtype, np.floating):
                raise TypeError(
                    f"DistributedDataParallel: parameter {name!r} has dtype {arr.dtype}; "
                    "expected a floating dtype"
                )
            self.params[name] = arr
            specs.append(ParamSpec(name, tuple(arr.shape), np.dtype(arr.dtype)))
        self._specs = specs
        self._check_replicas_agree()
        xp = xp_of(next(iter(self.params.values())))
        groups = assign_buckets(
            specs,
            first_cap_bytes=max(1, int(first_bucket_mb * _MB)),
            cap_bytes=max(1, int(bucket_cap_mb * _MB)),
            last_cap_bytes=None if last_bucket_mb is None else max(1, int(last_bucket_mb * _MB)),
        )
        self.buckets: list[Bucket] = build_buckets(specs, groups, xp)
        self._bucket_of: dict[str, Bucket] = {n: b for b in self.buckets for n in b.names}
        # name -> view into its bucket: write gradients here to skip the copy.
        self.grads: dict[str, Any] = {n: self._bucket_of[n].views[n] for n in self.params}
        self._user_out: dict[str, Any] = {}  # arrays handed in that get the average back
        self._next_launch = 0  # buckets [0, _next_launch) have been issued this step
        self._accumulating = False  # inside no_sync(): add into buckets, do not communicate
        self._has_accum: set[str] = set()  # names holding accumulated no_sync gradients
        self.comm_wait_seconds = 0.0  # time spent blocked in synchronize(), cumulative
        if broadcast:
            self.broadcast_parameters()

    # -- construction helpers ------------------------------------------------
    def _check_replicas_agree(self) -> None:
        from .. import comm

        if self.world_size == 1:
            return
        mine = [[s.name, list(s.shape), s.dtype.str] for s in self._specs]
        everyone: list[Any] = [None] * self.world_size
        comm.all_gather_object(everyone, mine, group=self.group)
        ref = everyone[0]
        for r, sig in enumerate(everyone):
            if sig == ref:
                continue
            ref_map = {n: (tuple(s), d) for n, s, d in ref}
            their = {n: (tuple(s), d) for n, s, d in sig}
            missing = sorted(set(ref_map) - set(their))
            extra = sorted(set(their) - set(ref_map))
            differ = [
                f"{n}: rank 0 {ref_map[n]} vs rank {r} {their[n]}"
                for n in ref_map
                if n in their and ref_map[n] != their[n]
            ]
            parts = []
            if missing:
                parts.append(f"missing on rank {r}: {missing}")
            if extra:
                parts.append(f"only on rank {r}: {extra}")
            if differ:
                parts.append("shape/dtype differ: " + "; ".join(differ))
            if not parts:
                parts.append(f"registration order differs on rank {r}")
            raise DistMismatchError(
                f"DistributedDataParallel (rank {self.rank} of {self.world_size}): "
                f"replicas' parameters differ; " + "; ".join(parts),
                rank=self.rank,
                op="DistributedDataParallel",
                peer=r,
            )

    def broadcast_parameters(self, src: int = 0) -> None:
        """Copy rank ``src``'s parameter values into every replica (one broadcast per dtype)."""
        from .. import comm

        if self.world_size == 1:
            return
        xp = xp_of(next(iter(self.params.values())))
        by_dtype: dict[np.dtype, list[str]] = {}
        for s in self._specs:
            by_dtype.setdefault(s.dtype, []).append(s.name)
        for dtype, names in by_dtype.items():
            flat = xp.concatenate([self.params[n].reshape(-1) for n in names]).astype(
                dtype, copy=False
            )
            comm.broadcast(flat, src=src, group=self.group)
            pos = 0
            for n in names:
                p = self.params[n]
                p[...] = flat[pos : pos + p.size].reshape(p.shape)
                pos += p.size

    # -- the step ------------------------------------------------------------
    def grad_ready(self, name: str, grad: Any) -> None:
        """Hand in ``name``'s gradient; a bucket that becomes full starts its all-reduce.

        ``grad`` is copied into the bucket unless it already is ``ddp.grads[name]``.
        Inside ``no_sync()`` gradients are added to what earlier micro-steps left.

        Raises:
            DistUsageError: unknown name, a gradient handed in twice in one step,
                or a shape that differs from the parameter's.
        """
        bucket = self._bucket_of.get(name)
        if bucket is None:
            raise DistUsageError(
                f"grad_ready (rank {self.rank}): gradient for unknown parameter {name!r}; "
                f"known: {list(self.params)}",
                rank=self.rank,
                op="grad_ready",
            )
        if name in bucket.ready:
            raise DistUsageError(
                f"grad_ready (rank {self.rank}): gradient for {name!r} handed in twice in one "
                "step; call synchronize() (or start a new no_sync() block) between steps",
                rank=self.rank,
                op="grad_ready",
            )
        view = bucket.views[name]
        if tuple(grad.shape) != tuple(view.shape):
            raise DistUsageError(
                f"grad_ready (rank {self.rank}): gradient for {name!r} has shape "
                f"{tuple(grad.shape)}, parameter has shape {tuple(view.shape)}",
                rank=self.rank,
                op="grad_ready",
            )
        in_place = _same_memory(grad, view)
        if not in_place:
            if name in self._has_accum:
                view += grad
            else:
                view[...] = grad
            if not self._accumulating and _writeable(grad):
                self._user_out[name] = grad
        bucket.ready.add(name)
        if self._accumulating:
            self._has_accum.add(name)
        elif bucket.full:
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        from .. import comm

        # Issue in bucket order only: every rank then issues the same sequence.
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].full:
            bucket = self.buckets[self._next_launch]
            buf = self.comm_hook.compress(bucket.flat, self.world_size, bucket)
            if self.world_size > 1:
                avg = self.comm_hook.reduce_op(buf) == "avg"
                op = comm.ReduceOp.AVG if avg else comm.ReduceOp.SUM
                bucket.work = comm.all_reduce(buf, op=op, group=self.group, async_op=True)
            else:
                bucket.work = comm.Work.completed("all_reduce")
            bucket.sent = buf
            self._next_launch += 1

    def synchronize(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for every bucket; leave averaged gradients in place and return them.

        The averages are in ``ddp.grads`` (views into the buckets) and are also
        copied back into the arrays handed to ``grad_ready``.

        Raises:
            DistUsageError: some gradients were never handed in (they are named),
                or called inside ``no_sync()``.
            DistTimeoutError: a bucket's all-reduce did not finish in time.
        """
        if self._accumulating:
            raise DistUsageError(
                f"synchronize (rank {self.rank}): called inside no_sync(); leave the "
                "no_sync() block for the step that communicates",
                rank=self.rank,
                op="synchronize",
            )
        missing = [n for n in self.params if n not in self._bucket_of[n].ready]
        if missing:
            raise DistUsageError(
                f"synchronize (rank {self.rank} of {self.world_size}): no gradient handed in "
                f"for {len(missing)} parameter(s): {missing}; call grad_ready() for each "
                "(pass zeros for parameters that did not take part)",
                rank=self.rank,
                op="synchronize",
            )
        timeout = self.timeout if timeout is None else timeout
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for bucket in self.buckets:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    bucket.work.wait(timeout=left)
                except DistTimeoutError:
                    if bucket.work.is_completed():
                        raise  # the all-reduce itself failed: its own error explains it
                    raise DistTimeoutError(
                        f"synchronize (rank {self.rank} of {self.world_size}): bucket "
                        f"{bucket.index} ({bucket.nbytes} bytes) not reduced within "
                        f"{timeout} s",
                        rank=self.rank,
                        op="synchronize",
                    ) from None
                self.comm_hook.decompress(bucket.sent, bucket.flat, self.world_size)
        finally:
            self.comm_wait_seconds += time.perf_counter() - t0
        for name, out in self._user_out.items():
            out[...] = self.grads[name]
        self._reset_step()
        return self.grads

    def allreduce_gradients(
        self, grads: Mapping[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Average ``grads`` (all of them, at once, in place) across replicas."""
        for name in reversed(list(self.params)):
            if name not in grads:
                continue
            self.grad_ready(name, grads[name])
        return self.synchronize(timeout=timeout)

    def _reset_step(self) -> None:
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.work = None
            bucket.sent = None
        self._next_launch = 0
        self._user_out.clear()
        self._has_accum.clear()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) for one micro-step.

        Each block is one micro-step: hand in each gradient once; it is added to
        what earlier blocks left. The next step outside ``no_sync`` adds its own
        gradients and communicates the sum.
        """
        if not self._accumulating and (self._next_launch or any(b.ready for b in self.buckets)):
            raise DistUsageError(
                f"no_sync (rank {self.rank}): entered in the middle of a step; synchronize() first",
                rank=self.rank,
                op="no_sync",
            )
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = False
            for bucket in self.buckets:
                bucket.ready.clear()

    def zero_grad(self) -> None:
        """Set every bucket to zero (for callers that accumulate into ``ddp.grads``)."""
        for bucket in self.buckets:
            bucket.flat[...] = 0

    def __repr__(self) -> str:
        sizes = ", ".join(f"{b.nbytes / _MB:.2f}" for b in self.buckets)
        return (
            f"DistributedDataParallel(rank={self.rank}, world_size={self.world_size}, "
            f"{len(self.params)} params, buckets MiB=[{sizes}], hook={self.comm_hook.name})"
        )


def _same_memory(a: Any, b: Any) -> bool:
    if is_cupy(a) or is_cupy(b):
        return bool(getattr(a, "data", None) is not None and a.data.ptr == b.data.ptr)
    if not isinstance(a, np.ndarray):
        return False
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
    )


def _writeable(a: Any) -> bool:
    return is_cupy(a) or (isinstance(a, np.ndarray) and a.flags.writeable)
