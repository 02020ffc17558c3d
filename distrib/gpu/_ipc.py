"""cupy arrays through multiprocessing channels as CUDA IPC handles, never through the host.

Protocol (producer = the process that pickles, consumer = the one that unpickles):

1. The producer finds the ``cudaMalloc`` allocation that holds the array (cupy's
   pool sub-allocates), gets its IPC memory handle, and on its current stream
   sets a *lease slot* to 1 and records an interprocess event after the work
   that wrote the array. It keeps the array's memory and the event alive in
   that slot. Lease slots are int32 words of a small device array (a slab)
   that is itself exported by IPC.
2. The consumer opens the handle (once per process: opened handles are cached
   and reference-counted), makes its current stream wait on the event, and
   wraps the memory as a cupy array with the sender's shape, strides, dtype
   and offset. Writes are visible both ways: it is the same device memory.
3. When the last array built from that message dies, the consumer zeroes the
   slot on its current stream (so the release is ordered after its queued
   work) and closes the mapping once no array of that allocation is left.
4. The producer frees slots that read 0 (on later sends and in
   ``ipc_collect()``) and drops its references; cupy's pool may then reuse
   the memory.

Lifetime caveat (as in torch): the producer must outlive every consumer's use.
When the producer exits, CUDA frees its allocations and consumers' arrays point
at released memory. At exit the producer warns if leases are still held; keep
the producer alive (join the consumers first) or copy the array
(``arr.copy()``) in the consumer. An array re-sent by a consumer travels by
the original handle, and the re-sender holds its own copy alive meanwhile.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import weakref
from multiprocessing import util as mp_util
from typing import Any, NamedTuple

from .._errors import DistBackendError, DistUsageError
from ._driver import (
    MEMORY_TYPE_MANAGED,
    allocation_range,
    bind_device,
    check_not_forked,
    import_cupy,
    mark_cuda_used,
)

__all__ = [
    "CupyArrayHandle",
    "Export",
    "export_allocation",
    "ipc_collect",
    "open_allocation",
    "register_reducers",
    "release_mapping",
]

_SLAB_SLOTS = 1024  # lease slots per slab (4 KiB of device memory each)
# Sends between automatic collections; collecting costs one 4 KiB device read.
_COLLECT_EVERY = 32
_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


# ---------------------------------------------------------------- exporting


class _Slab:
    """One device array of lease slots on one device, exported once."""

    def __init__(self, cupy: Any) -> None:
        self.array = cupy.zeros(_SLAB_SLOTS, dtype=cupy.int32)
        self.where = export_allocation(self.array)
        self.free = list(range(_SLAB_SLOTS - 1, -1, -1))


class _Producer:
    """Per-process bookkeeping of exported arrays (rebuilt in a forked child)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.slabs: dict[int, list[_Slab]] = {}  # device id -> slabs
        # (device, slab index, slot) -> (memory kept alive, event kept alive, event handle,
        # whether this process allocated the memory: only then does our exit free it)
        self.held: dict[tuple[int, int, int], tuple[Any, Any, bytes, bool]] = {}
        self.sends = 0
        self.collect_streams: dict[int, Any] = {}
        # event handle -> event, for a receiver in this very process (CUDA refuses to
        # open one's own IPC handles)
        self.events: dict[bytes, Any] = {}

    def lease(self, cupy: Any, device: int) -> tuple[int, int, _Slab]:
        slabs = self.slabs.setdefault(device, [])
        for index, slab in enumerate(slabs):
            if slab.free:
                return index, slab.free.pop(), slab
        slabs.append(_Slab(cupy))
        slab = slabs[-1]
        return len(slabs) - 1, slab.free.pop(), slab

    def collect(self, cupy: Any) -> int:
        """Release the slots consumers have zeroed; return how many are still held."""
        by_device: dict[int, list[tuple[int, int, int]]] = {}
        for key in self.held:
            by_device.setdefault(key[0], []).append(key)
        for device, keys in by_device.items():
            with cupy.cuda.Device(device):
                # Only a slot whose 'set to 1' already ran can be judged by its value:
                # query the events first, then read the slabs.
                settled = [k for k in keys if self.held[k][1].done]
                if not settled:
                    continue
                stream = self.collect_streams.get(device)
                if stream is None:
                    stream = cupy.cuda.Stream(non_blocking=True)
                    self.collect_streams[device] = stream
                values = [s.array.get(stream=stream) for s in self.slabs[device]]
                for key in settled:
                    _, index, slot = key
                    if values[index][slot] == 0:
                        self.events.pop(self.held[key][2], None)
                        del self.held[key]
                        self.slabs[device][index].free.append(slot)
        return len(self.held)


_producer: _Producer | None = None


def _get_producer() -> _Producer:
    global _producer
    if _producer is None or _producer.pid != os.getpid():
        _producer = _Producer()
        atexit.register(_warn_held_at_exit)
        # multiprocessing children leave through os._exit, which skips atexit.
        mp_util.Finalize(None, _warn_held_at_exit, exitpriority=100)
    return _producer


def _warn_held_at_exit() -> None:
    prod = _producer
    if prod is None or prod.pid != os.getpid() or not prod.held:
        return
    try:
        prod.collect(import_cupy("ipc_collect"))
    except Exception:
        pass
    # Arrays we only forwarded stay valid: their owner, not our exit, frees them.
    still = sum(1 for held in prod.held.values() if held[3])
    if still:
        sys.stderr.write(
            f"distrib: process {os.getpid()} is exiting while {still} cupy array(s) it sent "
            "by CUDA IPC are still held by other processes; their memory is freed now and "
            "those arrays become invalid. Keep the producer alive until consumers are done "
            "(join them first), or copy received arrays with arr.copy().\n"
        )
        sys.stderr.flush()
        prod.held.clear()
        prod.events.clear()


class Export(NamedTuple):
    """Where an array's memory lives: IPC handle of its allocation and the offset in it."""

    handle: bytes
    size: int  # bytes in the whole allocation
    offset: int  # of the array's first byte, from the allocation's base
    origin_pid: int  # the process that allocated it (it maps it at origin_base)
    origin_base: int


class CupyArrayHandle(NamedTuple):
    """What another process on this machine needs to open a cupy array sent to it.

    ``data`` is ``None`` for an empty array. The sender keeps the memory alive
    until the receiver is done with it: ``event`` (an IPC event recorded after
    the sender's pending work) orders the receiver's stream, and the 4-byte slot
    at ``slot_offset`` in the sender's ``slab`` stays 1 while the receiver holds
    the array (the sender collects slots that went back to 0).
    """

    host: str
    pid: int  # the sender
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    bus: str  # PCI bus id of the device (device numbers differ between processes)
    device: int  # the sender's device number, for messages
    data: Export | None
    event: bytes = b""
    slab: Export | None = None
    slot_offset: int = 0


def export_allocation(arr: Any) -> Export:
    """Describe the ``cudaMalloc`` allocation that holds a cupy array, for another process."""
    cupy = import_cupy("export_allocation")
    ptr = int(arr.data.ptr)
    mapped = _mapped_by_base_lookup(ptr)
    if mapped is not None:  # memory we imported ourselves: forward the original handle
        m, offset = mapped
        return Export(m.handle, m.size, offset, m.origin_pid, m.origin_base)
    with cupy.cuda.Device(arr.device.id):
        bind_device(cupy, arr.device.id)
        attrs = cupy.cuda.runtime.pointerGetAttributes(ptr)
        if attrs.type == MEMORY_TYPE_MANAGED or isinstance(
            arr.data.mem, cupy.cuda.memory.ManagedMemory
        ):
            raise DistUsageError(
                "cannot share a cupy array in managed (unified) memory across processes: "
                "CUDA IPC exports only device allocations. Copy it into a regular device "
                "array first (cupy.array(arr)) or use the default cupy allocator.",
                op="cuda_ipc.export",
            )
        base, size = allocation_range(ptr, what="cuda_ipc.export")
        handle = cupy.cuda.runtime.ipcGetMemHandle(base)
    return Export(bytes(handle), size, ptr - base, os.getpid(), base)


def _reduce_cupy_array(arr: Any) -> tuple[Any, tuple[CupyArrayHandle]]:
    cupy = import_cupy("pickling a cupy array")
    check_not_forked("pickling a cupy array")
    mark_cuda_used()
    device = arr.device.id
    empty = CupyArrayHandle(
        host=socket.gethostname(),
        pid=os.getpid(),
        shape=tuple(arr.shape),
        strides=tuple(arr.strides),
        dtype=arr.dtype.str,
        bus=cupy.cuda.runtime.deviceGetPCIBusId(device),
        device=device,
        data=None,
    )
    if arr.size == 0 or arr.data.ptr == 0:
        return _rebuild_cupy_array, (empty,)
    where = export_allocation(arr)
    prod = _get_producer()
    with prod.lock, cupy.cuda.Device(device):
        bind_device(cupy, device)
        prod.sends += 1
        if prod.held and prod.sends % _COLLECT_EVERY == 0:
            prod.collect(cupy)
        index, slot, slab = prod.lease(cupy, device)
        stream = cupy.cuda.get_current_stream()
        slot_ptr = int(slab.array.data.ptr) + 4 * slot
        cupy.cuda.runtime.memsetAsync(slot_ptr, 1, 4, stream.ptr)
        event = cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
        event.record(stream)
        event_handle = bytes(cupy.cuda.runtime.ipcGetEventHandle(event.ptr))
        own = where.origin_pid == os.getpid()
        prod.held[(device, index, slot)] = (arr.data.mem, event, event_handle, own)
        prod.events[event_handle] = event
        handle = empty._replace(
            data=where,
            event=event_handle,
            slab=slab.where,
            slot_offset=slab.where.offset + 4 * slot,
        )
    return _rebuild_cupy_array, (handle,)


def register_reducers(pickler: Any) -> None:
    """Register the cupy-array reducer with a ``ForkingPickler``-like class."""
    cupy = import_cupy("register_reducers")
    pickler.register(cupy.ndarray, _reduce_cupy_array)


def ipc_collect() -> int:
    """Free memory whose consumers have released it; return the number of arrays still held.

    Call it in a producer after consumers drop arrays, when memory is tight
    (sends also collect every few calls).
    """
    prod = _producer
    if prod is None or prod.pid != os.getpid() or not prod.held:
        return 0
    cupy = import_cupy("ipc_collect")
    with prod.lock:
        return prod.collect(cupy)


# ---------------------------------------------------------------- importing


class _Mapping:
    """One opened IPC memory handle in this process, shared by every array built on it."""

    __slots__ = (
        "__weakref__",
        "device",
        "handle",
        "local",
        "origin_base",
        "origin_pid",
        "ptr",
        "refs",
        "size",
    )

    def __init__(
        self, handle: bytes, ptr: int, size: int, device: int, origin: tuple[int, int]
    ) -> None:
        self.handle = handle
        self.ptr = ptr
        self.size = size
        self.device = device
        self.origin_pid, self.origin_base = origin
        self.local = origin[0] == os.getpid()  # our own memory: nothing to open or close
        self.refs = 0


class _Importer:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.by_handle: dict[bytes, _Mapping] = {}
        self.by_ptr: dict[int, _Mapping] = {}


_importer: _Importer | None = None


def _get_importer() -> _Importer:
    global _importer
    if _importer is None or _importer.pid != os.getpid():
        _importer = _Importer()
        atexit.register(_flush_releases)
        mp_util.Finalize(None, _flush_releases, exitpriority=100)
    return _importer


def _flush_releases() -> None:
    """At exit, let queued slot releases reach the device before the context goes away."""
    imp = _importer
    if imp is None or imp.pid != os.getpid():
        return
    try:
        import_cupy("exit").cuda.runtime.deviceSynchronize()
    except Exception:
        pass


def _mapped_by_base_lookup(ptr: int) -> tuple[_Mapping, int] | None:
    imp = _importer
    if imp is None or imp.pid != os.getpid() or not imp.by_ptr:
        return None
    with imp.lock:
        for base, mapping in imp.by_ptr.items():
            if base <= ptr < base + mapping.size:
                return mapping, ptr - base
    return None


def open_allocation(
    handle: bytes, size: int, device: int, origin_pid: int, origin_base: int
) -> _Mapping:
    """Open (or reuse) the mapping of an IPC handle; the caller must ``release_mapping`` it.

    Memory that this very process allocated (an array sent back to its owner)
    is used in place: CUDA refuses to open one's own handle.
    """
    origin = (origin_pid, origin_base)
    if origin_pid == os.getpid():
        return _Mapping(handle, origin_base, size, device, origin)
    cupy = import_cupy("open_allocation")
    imp = _get_importer()
    with imp.lock:
        mapping = imp.by_handle.get(handle)
        if mapping is None:
            with cupy.cuda.Device(device):
                bind_device(cupy, device)
                ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle, _IPC_LAZY_PEER_ACCESS)
            mapping = _Mapping(handle, int(ptr), size, device, origin)
            imp.by_handle[handle] = mapping
            imp.by_ptr[mapping.ptr] = mapping
        mapping.refs += 1
        return mapping


def release_mapping(mapping: _Mapping) -> None:
    """Drop one reference; close the handle when none is left."""
    if mapping.local:
        return
    imp = _importer
    if imp is None or imp.pid != os.getpid():
        return
    with imp.lock:
        mapping.refs -= 1
        if mapping.refs > 0:
            return
        imp.by_handle.pop(mapping.handle, None)
        imp.by_ptr.pop(mapping.ptr, None)
    try:
        cupy = import_cupy("release_mapping")
        with cupy.cuda.Device(mapping.device):
            bind_device(cupy, mapping.device)
            cupy.cuda.runtime.ipcCloseMemHandle(mapping.ptr)
    except Exception:  # interpreter shutdown: the driver unmaps at exit anyway
        pass


class _Lease:
    """Owner of one received array's memory; its death releases the producer's slot."""

    def __init__(self, data: _Mapping, slab: _Mapping, slot_ptr: int) -> None:
        weakref.finalize(self, _release_lease, data, slab, slot_ptr)


def _release_lease(data: _Mapping, slab: _Mapping, slot_ptr: int) -> None:
    try:
        cupy = import_cupy("release")
        with cupy.cuda.Device(slab.device):
            bind_device(cupy, slab.device)
            stream = cupy.cuda.get_current_stream()
            cupy.cuda.runtime.memsetAsync(slot_ptr, 0, 4, stream.ptr)
    except Exception:  # interpreter shutdown: the producer keeps the memory (a leak, no crash)
        pass
    release_mapping(data)
    release_mapping(slab)


def _local_device(meta: CupyArrayHandle) -> int:
    cupy = import_cupy("receiving a cupy array")
    host = socket.gethostname()
    if meta.host != host:
        raise DistBackendError(
            f"received a cupy array sent from host {meta.host} (pid {meta.pid}) on host "
            f"{host}: CUDA IPC works only between processes on one machine",
            op="cuda_ipc.open",
        )
    try:
        return int(cupy.cuda.runtime.deviceGetByPCIBusId(meta.bus))
    except Exception:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            count = f"none ({exc})"
        raise DistBackendError(
            f"received a cupy array on GPU {meta.bus} (device {meta.device} of pid "
            f"{meta.pid}), but this process (pid {os.getpid()}) cannot see that GPU "
            f"(visible devices: {count}; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})",
            op="cuda_ipc.open",
        ) from None


def _rebuild_cupy_array(meta: CupyArrayHandle) -> Any:
    check_not_forked("receiving a cupy array")
    cupy = import_cupy("receiving a cupy array")
    device = _local_device(meta)
    mark_cuda_used()
    dtype = cupy.dtype(meta.dtype)
    if meta.data is None or meta.slab is None:
        with cupy.cuda.Device(device):
            return cupy.empty(meta.shape, dtype=dtype)
    where, slab_where = meta.data, meta.slab
    with cupy.cuda.Device(device):
        bind_device(cupy, device)
        data = open_allocation(
            where.handle, where.size, device, where.origin_pid, where.origin_base
        )
        try:
            slab = open_allocation(
                slab_where.handle, slab_where.size, device, meta.pid, slab_where.origin_base
            )
        except BaseException:
            release_mapping(data)
            raise
        lease = _Lease(data, slab, slab.ptr + meta.slot_offset)
        stream = cupy.cuda.get_current_stream()
        if meta.pid == os.getpid():  # sent to ourselves: wait on the event object itself
            prod = _producer
            own = prod.events.get(meta.event) if prod is not None else None
            if own is not None:
                stream.wait_event(own)
        else:
            event = cupy.cuda.runtime.ipcOpenEventHandle(meta.event)
            try:
                cupy.cuda.runtime.streamWaitEvent(stream.ptr, event, 0)
            finally:
                cupy.cuda.runtime.eventDestroy(event)
        mem = cupy.cuda.UnownedMemory(data.ptr, data.size, lease, device)
        memptr = cupy.cuda.MemoryPointer(mem, where.offset)
        return cupy.ndarray(meta.shape, dtype=dtype, memptr=memptr, strides=meta.strides)
