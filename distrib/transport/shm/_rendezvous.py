"""Find the ranks that share a machine and map one segment among them.

Protocol (all values msgpack, through the group's store under ``prefix``):

1. ``host/<rank>`` = this process's host key; ranks with equal keys share
   memory (same boot, same pid and network namespaces, so ``/proc/<pid>``
   resolves and two simulated hosts in network namespaces stay apart).
2. The first rank of each host creates the memfd segment and sets
   ``seg/<leader>`` = ``[pid, fd, total_bytes, part_bytes]``.
3. Each local rank maps it and sets ``mapped/<rank>`` = ``[ok, pid, addr,
   token]``; once all have answered, the creator closes its descriptor
   (nothing has a name, so nothing can leak). If any rank of the host failed,
   all of them fall back to ZeroMQ together (``None``).
4. Each rank reads every peer's 16-byte token at ``addr`` with
   ``process_vm_readv`` and sets ``cma/<rank>``; single-copy reads are used
   only if every rank could read every peer.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack

from ..._errors import DistTimeoutError, ShmError
from ..._machine import machine
from ._cma import RemoteReader, available
from ._engine import ShmEngine
from ._native import load as load_native
from ._segment import SegmentLayout, SharedSegment

__all__ = ["connect_local", "part_bytes_for"]


def part_bytes_for(local_size: int) -> int:
    """Bytes each rank reduces per pipeline step: one L2 (distrib._machine), less with
    more than 4 local ranks, never below an eighth of it.

    Measured on a 1 MiB L2 (docs/performance.md): at 2 ranks 1 MiB parts beat
    256 KiB from 16 MiB up (Python overhead per step); with more ranks a step is
    ``size`` parts, so parts shrink to keep the segment (2 halves x size x part
    per rank) near 8 L2s per rank. Every local rank uses the leader's value.
    """
    l2 = machine().l2_bytes
    part = max(l2 // 8, min(l2, 4 * l2 // max(local_size, 1)))
    return max(4096, part - part % 4096)  # whole pages: every dtype and cache line aligns


def _wait_keys(store: Any, keys: list[str], deadline: float, op: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DistTimeoutError(f"{op}: timed out before waiting for {keys[:3]}", op=op)
    store.wait(keys, remaining)


def connect_local(
    store: Any,
    prefix: str,
    local_rank: int,
    local_size: int,
    global_ranks: list[int],
    deadline: float,
    part_bytes: int | None = None,
    *,
    check_failed: Callable[[], None] | None = None,
    use_cma: bool = True,
    use_native: bool = True,
) -> ShmEngine | None:
    """Create or map this host's segment and return the engine, or ``None`` to fall back.

    Every local rank must call this collectively. ``global_ranks`` lists the
    global rank of each local rank (local rank 0 creates the segment). The
    keyword arguments are passed to ``ShmEngine``.
    """
    op = "shm_engine.connect"
    part = part_bytes if part_bytes is not None else part_bytes_for(local_size)
    layout = SegmentLayout(local_size, part)
    seg: SharedSegment | None = None
    seg_key = f"{prefix}/seg"
    if local_rank == 0:
        try:
            seg = SharedSegment.create(layout)
            store.set(seg_key, msgpack.packb([os.getpid(), seg.fd, layout.total_bytes, part]))
        except ShmError:
            store.set(seg_key, msgpack.packb([0, -1, 0, part]))
    else:
        _wait_keys(store, [seg_key], deadline, op)
        pid, fd, total, _ = msgpack.unpackb(store.get(seg_key))
        if fd >= 0 and total == layout.total_bytes:
            try:
                seg = SharedSegment.attach(pid, fd, layout)
            except ShmError:
                seg = None
    # a private token each peer must be able to read with process_vm_readv
    token = os.urandom(16)
    token_buf = ctypes.create_string_buffer(token, len(token))
    mine = [seg is not None, os.getpid(), ctypes.addressof(token_buf), token]
    store.set(f"{prefix}/mapped/{local_rank}", msgpack.packb(mine))
    keys = [f"{prefix}/mapped/{q}" for q in range(local_size)]
    try:
        _wait_keys(store, keys, deadline, op)
        answers = [msgpack.unpackb(store.get(k)) for k in keys]
        reader = RemoteReader()
        cma_ok = available() and all(
            reader.probe(pid, addr, tok)
            for q, (_, pid, addr, tok) in enumerate(answers)
            if q != local_rank
        )
        # The C step is used only if every local rank loaded it.
        native_lib = load_native() if use_native else None
        # second round: everyone has probed (token_buf may go) and agrees on CMA
        # and on the native step
        flags = (b"1" if cma_ok else b"0") + (b"1" if native_lib is not None else b"0")
        store.set(f"{prefix}/cma/{local_rank}", flags)
        cma_keys = [f"{prefix}/cma/{q}" for q in range(local_size)]
        _wait_keys(store, cma_keys, deadline, op)
        agreed = [store.get(k) for k in cma_keys]
        cma = all(a[:1] == b"1" for a in agreed)
        native = native_lib if all(a[1:2] == b"1" for a in agreed) else None
    except BaseException:
        if seg is not None:
            seg.close()
        raise
    del token_buf
    if not all(a[0] for a in answers):
        if seg is not None:
            seg.close()
        return None
    assert seg is not None
    return ShmEngine(
        seg,
        local_rank,
        local_size,
        global_ranks,
        [a[1] for a in answers],
        check_failed=check_failed,
        cma=cma and use_cma,
        native=native,
    )
