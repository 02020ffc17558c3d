"""The pickler our queues, pipes and processes use: numpy arrays become handles.

``ArrayPickler`` is a ``ForkingPickler`` subclass with its own reducer table,
so the standard module's pickler is left exactly as it was: stdlib queues keep
copying arrays, ours share them. ``Preserialized`` carries bytes produced by
``ArrayPickler`` through code paths that pickle with the stdlib pickler (a
Queue's feeder thread, a spawned Process's arguments); it unpickles into the
original object on the other side.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np

from ..._config import config
from ...shm import _client
from ...shm._array import block_of, handle_of, rebuild_array, share

__all__ = ["ArrayPickler", "Preserialized", "dumps", "inline_threshold", "loads", "reduce_ndarray"]

# Private arrays up to this many bytes are pickled inline instead of copied into
# shared memory: below it a pickled copy beats creating and mapping a segment
# (measured with benchmarks/bench_passing.py --inline-sweep: see docs/shm.md).
DEFAULT_INLINE_THRESHOLD = 128 * 1024


def inline_threshold() -> int:
    """Bytes up to which a private array is pickled inline (DISTRIB_INLINE_THRESHOLD)."""
    value = config().inline_threshold
    return DEFAULT_INLINE_THRESHOLD if value is None else value


def reduce_ndarray(arr: np.ndarray) -> tuple:
    """Reduce a numpy array to a shared-memory handle (or inline, when that is right).

    Shared arrays always travel as handles, so writes stay visible both ways.
    Object arrays and small private arrays are pickled the ordinary way.
    """
    block = block_of(arr)
    if block is None:
        if arr.dtype.hasobject or arr.nbytes <= _threshold_cache.get():
            return arr.__reduce_ex__(4)  # type: ignore[return-value]
        arr = share(arr)  # copied once; the copy lives on through the handle's ticket
        block = block_of(arr)
        if block is None:
            raise RuntimeError("distrib.shm.share returned an unshared array")  # not reached
    return rebuild_array, (handle_of(arr, block),)


class _ThresholdCache:
    """The inline threshold, read once per process (config() parses the environment)."""

    def __init__(self) -> None:
        self.value: int | None = None

    def get(self) -> int:
        if self.value is None:
            self.value = inline_threshold()
        return self.value


_threshold_cache = _ThresholdCache()


class ArrayPickler(ForkingPickler):
    """ForkingPickler that sends numpy arrays as shared-memory handles."""

    # Our own table: registering here never touches ForkingPickler's.
    _extra_reducers: dict[type, Any] = {np.ndarray: reduce_ndarray}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = copyreg.dispatch_table.copy()
        table.update(ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
        table.update(type(self)._extra_reducers)
        self.dispatch_table = table

    @classmethod
    def register(cls, type: type, reduce: Any) -> None:
        """Register a reducer for ``type`` with this pickler only."""
        cls._extra_reducers[type] = reduce

    def dump(self, obj: Any) -> None:
        # One message to the daemon for all the arrays in ``obj``, sent before
        # the bytes leave this process.
        with _client.batch():
            super().dump(obj)

    @classmethod
    def dumps(cls, obj: Any, protocol: int | None = None) -> memoryview:
        buf = io.BytesIO()
        cls(buf, protocol).dump(obj)
        return buf.getbuffer()


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with ArrayPickler."""
    return bytes(ArrayPickler.dumps(obj))


def loads(data: Any) -> Any:
    """Unpickle ``data`` and send the daemon the ticket releases that caused."""
    try:
        return pickle.loads(data)
    finally:
        _client.flush()


class Preserialized:
    """Bytes from ArrayPickler that unpickle, anywhere, into the object they hold."""

    __slots__ = ("data",)

    def __init__(self, obj: Any) -> None:
        self.data = dumps(obj)

    def __reduce__(self) -> tuple:
        return loads, (self.data,)
