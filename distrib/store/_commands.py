"""The TCPStore's key-value map: every command validated, every limit enforced.

``KeyValueMap.execute`` checks each argument's type and size before touching
the map and raises ``RequestError`` (status + message naming the argument or
limit) for anything else. ``get``/``wait`` on missing keys park a waiter, indexed
by the one key it still misses and by deadline, so a ``set`` wakes only its own
waiters and memory stays bounded by ``max_parked`` however clients behave.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _wire as wire

__all__ = ["KeyValueMap", "RequestError", "Result", "Woken"]

_INT64 = (-(1 << 63), (1 << 63) - 1)


class RequestError(Exception):
    """A request that cannot be served; the reply carries ``status`` and the message."""

    def __init__(self, status: wire.Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Woken:
    """A parked request that can now be answered."""

    conn_fd: int
    seq: int
    value: Any


@dataclass
class Result:
    value: Any = None
    parked: bool = False
    woken: list[Woken] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Waiter:
    ident: int
    conn_fd: int
    seq: int
    command: str
    keys: list[str]
    deadline: float
    done: bool = False


class KeyValueMap:
    """The store's data, its limits and its parked waiters."""

    def __init__(self, limits: wire.Limits) -> None:
        self.limits = limits
        self.data: dict[str, bytes] = {}
        self.total_bytes = 0
        self.parked = 0
        self._by_key: dict[str, dict[int, _Waiter]] = {}
        self._by_conn: dict[int, dict[int, _Waiter]] = {}
        self._heap: list[tuple[float, int, _Waiter]] = []
        self._ids = itertools.count()
        self._commands: dict[str, tuple[int, Callable[..., Any]]] = {
            "set": (2, self._set),
            "get": (2, self._get),
            "add": (2, self._add),
            "compare_set": (3, self._compare_set),
            "wait": (2, self._wait),
            "check": (1, self._check),
            "multi_get": (1, self._multi_get),
            "delete_key": (1, self._delete),
            "num_keys": (0, lambda: len(self.data)),
            "ping": (0, lambda: None),
        }

    # -- entry points ----------------------------------------------------------

    def execute(self, conn_fd: int, seq: int, command: Any, args: Any, conn_parked: int) -> Result:
        """Run one request; ``RequestError`` if it is invalid or over a limit."""
        if not isinstance(command, str) or command not in self._commands:
            raise RequestError(wire.Status.ERROR, f"unknown command {str(command)[:64]!r}")
        arity, handler = self._commands[command]
        if not isinstance(args, list) or len(args) != arity:
            raise RequestError(
                wire.Status.ERROR, f"{command}: expected a list of {arity} arguments"
            )
        self._request = (conn_fd, seq, conn_parked)
        out = handler(*args)
        return out if isinstance(out, Result) else Result(out)

    def next_timeout(self, idle: float) -> float:
        """Seconds until the nearest parked deadline (at most ``idle``)."""
        if not self.parked:
            self._heap.clear()  # only answered waiters' entries are left
            return idle
        return max(0.0, min(idle, self._heap[0][0] - time.monotonic()))

    def expire(self, now: float) -> Iterator[tuple[int, int, wire.Status, Any]]:
        """Time out the waiters whose deadline passed: (conn fd, seq, TIMEOUT, missing keys)."""
        while self._heap and self._heap[0][0] <= now:
            _, _, w = heapq.heappop(self._heap)
            if w.done:
                continue
            self._retire(w)
            yield w.conn_fd, w.seq, wire.Status.TIMEOUT, [k for k in w.keys if k not in self.data]

    def forget_connection(self, conn_fd: int) -> None:
        """Drop the waiters of a closed connection."""
        for w in list(self._by_conn.get(conn_fd, {}).values()):
            self._retire(w)
        self._by_conn.pop(conn_fd, None)

    # -- validation --------------------------------------------------------------

    def _key(self, obj: Any, what: str = "key") -> str:
        if not isinstance(obj, str):
            raise RequestError(
                wire.Status.ERROR, f"{what} must be a string, got {type(obj).__name__}"
            )
        if len(obj.encode()) > self.limits.max_key_bytes:
            raise RequestError(
                wire.Status.LIMIT,
                f"{what} of {len(obj.encode())} bytes exceeds the store's limit of "
                f"{self.limits.max_key_bytes} bytes (max_key_bytes)",
            )
        return obj

    def _keys(self, obj: Any) -> list[str]:
        if not isinstance(obj, list):
            raise RequestError(wire.Status.ERROR, f"keys must be a list, got {type(obj).__name__}")
        if len(obj) > self.limits.max_keys_per_request:
            raise RequestError(
                wire.Status.LIMIT,
                f"{len(obj)} keys in one request exceed the store's limit of "
                f"{self.limits.max_keys_per_request} (max_keys_per_request)",
            )
        return [self._key(k) for k in obj]

    def _value(self, obj: Any, what: str = "value") -> bytes:
        if not isinstance(obj, bytes):
            raise RequestError(wire.Status.ERROR, f"{what} must be bytes, got {type(obj).__name__}")
        if len(obj) > self.limits.max_value_bytes:
            raise RequestError(
                wire.Status.LIMIT,
                f"{what} of {len(obj)} bytes exceeds the store's limit of "
                f"{self.limits.max_value_bytes} bytes (max_value_bytes)",
            )
        return obj

    def _timeout(self, obj: Any) -> float:
        try:
            return wire.check_timeout(obj, self.limits)
        except ValueError as exc:
            raise RequestError(wire.Status.ERROR, str(exc)) from None

    # -- writes --------------------------------------------------------------------

    def _store(self, key: str, value: bytes) -> list[Woken]:
        old = self.data.get(key)
        if old is None and len(self.data) >= self.limits.max_keys:
            raise RequestError(
                wire.Status.LIMIT,
                f"the store holds {len(self.data)} keys, its limit (max_keys); delete some",
            )
        size = len(key) + len(value)
        total = self.total_bytes + size - (0 if old is None else len(key) + len(old))
        if total > self.limits.max_total_bytes:
            raise RequestError(
                wire.Status.LIMIT,
                f"storing {size} bytes would bring the store to {total} bytes, over its limit "
                f"of {self.limits.max_total_bytes} bytes (max_total_bytes)",
            )
        self.data[key] = value
        self.total_bytes = total
        return self._wake(key)

    def _set(self, key: Any, value: Any) -> Result:
        return Result(None, woken=self._store(self._key(key), self._value(value)))

    def _add(self, key: Any, amount: Any) -> Result:
        key = self._key(key)
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise RequestError(wire.Status.ERROR, f"add: amount must be an integer, got {amount!r}")
        raw = self.data.get(key, b"0")
        try:
            current = int(raw) if len(raw) <= 24 else None
        except ValueError:
            current = None
        if current is None:
            raise RequestError(wire.Status.ERROR, f"add: key {key!r} does not hold an integer")
        total = current + amount
        if not _INT64[0] <= total <= _INT64[1]:
            raise RequestError(
                wire.Status.ERROR, f"add: {current} + {amount} leaves the int64 range"
            )
        return Result(total, woken=self._store(key, str(total).encode()))

    def _compare_set(self, key: Any, expected: Any, desired: Any) -> Result:
        key = self._key(key)
        expected, desired = (
            self._value(expected, "expected_value"),
            self._value(desired, "desired_value"),
        )
        stored = self.data.get(key)
        if (stored is None and expected == b"") or stored == expected:
            return Result(desired, woken=self._store(key, desired))
        return Result(expected if stored is None else stored)

    def _delete(self, key: Any) -> bool:
        key = self._key(key)
        old = self.data.pop(key, None)
        if old is None:
            return False
        self.total_bytes -= len(key) + len(old)
        return True

    # -- reads -----------------------------------------------------------------------

    def _check(self, keys: Any) -> bool:
        return all(k in self.data for k in self._keys(keys))

    def _multi_get(self, keys: Any) -> list[bytes | None]:
        values = [self.data.get(k) for k in self._keys(keys)]
        size = sum(len(v) for v in values if v is not None)
        if size > 2 * self.limits.max_value_bytes:
            raise RequestError(
                wire.Status.LIMIT,
                f"multi_get: {size} bytes exceed the store's reply limit of "
                f"{2 * self.limits.max_value_bytes} bytes; ask for fewer keys",
            )
        return values

    def _get(self, key: Any, timeout: Any) -> Result:
        return self._park_or_answer("get", [self._key(key)], self._timeout(timeout))

    def _wait(self, keys: Any, timeout: Any) -> Result:
        return self._park_or_answer("wait", self._keys(keys), self._timeout(timeout))

    def _park_or_answer(self, command: str, keys: list[str], timeout: float) -> Result:
        missing = [k for k in keys if k not in self.data]
        if not missing:
            return Result(self.data[keys[0]] if command == "get" else None)
        if timeout == 0:
            raise RequestError(wire.Status.TIMEOUT, repr(missing))
        conn_fd, seq, conn_parked = self._request
        if self.parked >= self.limits.max_parked:
            raise RequestError(
                wire.Status.LIMIT,
                f"the store already holds {self.parked} waiting get/wait requests, its limit "
                "(max_parked)",
            )
        if conn_parked >= self.limits.max_parked_per_connection:
            raise RequestError(
                wire.Status.LIMIT,
                f"this connection already has {conn_parked} waiting get/wait requests, the "
                "limit (max_parked_per_connection)",
            )
        w = _Waiter(next(self._ids), conn_fd, seq, command, keys, time.monotonic() + timeout)
        self._by_key.setdefault(missing[0], {})[w.ident] = w
        self._by_conn.setdefault(conn_fd, {})[w.ident] = w
        heapq.heappush(self._heap, (w.deadline, w.ident, w))
        self.parked += 1
        if len(self._heap) > 2 * self.parked + 1024:  # drop answered waiters' entries
            self._heap = [e for e in self._heap if not e[2].done]
            heapq.heapify(self._heap)
        return Result(parked=True)

    def _wake(self, key: str) -> list[Woken]:
        waiters = self._by_key.pop(key, None)
        if not waiters:
            return []
        woken = []
        for w in waiters.values():
            missing = next((k for k in w.keys if k not in self.data), None)
            if missing is not None:  # still incomplete: index it under what it misses now
                self._by_key.setdefault(missing, {})[w.ident] = w
                continue
            self._retire(w, indexed=False)
            woken.append(
                Woken(w.conn_fd, w.seq, self.data[w.keys[0]] if w.command == "get" else None)
            )
        return woken

    def _retire(self, w: _Waiter, indexed: bool = True) -> None:
        if w.done:
            return
        w.done = True
        self.parked -= 1
        self._by_conn.get(w.conn_fd, {}).pop(w.ident, None)
        if indexed:
            for k in w.keys:
                bucket = self._by_key.get(k)
                if bucket is not None and bucket.pop(w.ident, None) is not None and not bucket:
                    del self._by_key[k]
