"""``FileStore``: torch's file-backed store for ranks sharing a filesystem.

The file is an append-only log of msgpack records ``[key, value]`` (``value``
``None`` deletes the key), read and written under an exclusive ``flock``, so
processes on one host or a shared filesystem see one consistent map. Waiting
for a key re-reads the log with a short backoff (files have no notification);
every wait is bounded by the store's timeout. Never unpickles.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable
from typing import Any

import msgpack

from .._config import config
from .._errors import DistStoreError, DistTimeoutError
from ._base import DEFAULT_STORE_TIMEOUT_S, Store, _as_bytes, _as_key, to_seconds

__all__ = ["FileStore"]

_MAX_BACKOFF_S = 0.05  # re-read the file at most this far apart while waiting


class FileStore(Store):
    """Key-value store in the file ``file_name`` (created if missing)."""

    def __init__(self, file_name: str, world_size: int | None = None, timeout: Any = None) -> None:
        if not isinstance(file_name, (str, os.PathLike)) or not str(file_name):
            raise TypeError(f"FileStore: file_name must be a path, got {file_name!r}")
        self.path = os.fspath(file_name)
        self.world_size = world_size
        cfg = config()
        if timeout is not None:
            self.timeout = to_seconds(timeout)
        elif cfg.timeout is not None:
            self.timeout = to_seconds(cfg.timeout, "DISTRIB_TIMEOUT")
        else:
            self.timeout = DEFAULT_STORE_TIMEOUT_S
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise DistStoreError(
                f"FileStore: cannot open {self.path!r}: {exc}", op="store.init", peer=self.path
            ) from None
        os.close(fd)

    def __repr__(self) -> str:
        return f"FileStore({self.path!r})"

    def _locked(self, update: Any = None) -> dict[str, bytes]:
        """Read the map under the lock; apply ``update(map) -> records`` and append them."""
        with open(self.path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                data: dict[str, bytes] = {}
                unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 30)
                try:
                    for record in unpacker:
                        key, value = record
                        if value is None:
                            data.pop(key, None)
                        else:
                            data[key] = value
                except (ValueError, msgpack.UnpackException) as exc:
                    raise DistStoreError(
                        f"FileStore: {self.path!r} is corrupt ({exc}); delete it and restart",
                        op="store.read",
                        peer=self.path,
                    ) from None
                if update is not None:
                    records = update(data)
                    if records:
                        f.seek(0, os.SEEK_END)
                        f.write(b"".join(msgpack.packb(r, use_bin_type=True) for r in records))
                        f.flush()
                return data
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _wait_for(self, keys: list[str], seconds: float, op: str) -> dict[str, bytes]:
        deadline = time.monotonic() + seconds
        delay = 0.001
        while True:
            data = self._locked()
            missing = [k for k in keys if k not in data]
            if not missing:
                return data
            if time.monotonic() >= deadline:
                raise DistTimeoutError(
                    f"{op}: keys {missing} did not appear in {self.path!r} within {seconds:.1f} s",
                    op=op,
                    peer=self.path,
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def set(self, key: str, value: str | bytes) -> None:
        record = [_as_key(key), _as_bytes(value, "value")]
        self._locked(lambda data: [record])

    def get(self, key: str) -> bytes:
        key = _as_key(key)
        return self._wait_for([key], self.timeout, "store.get")[key]

    def add(self, key: str, amount: int) -> int:
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"store.add: amount must be an int, got {amount!r}")
        key = _as_key(key)
        result = []

        def update(data: dict[str, bytes]) -> list[Any]:
            total = int(data.get(key, b"0")) + amount
            result.append(total)
            return [[key, str(total).encode()]]

        self._locked(update)
        return result[0]

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        key = _as_key(key)
        expected = _as_bytes(expected_value, "expected_value")
        desired = _as_bytes(desired_value, "desired_value")
        result = []

        def update(data: dict[str, bytes]) -> list[Any]:
            current = data.get(key)
            if (current is None and expected == b"") or current == expected:
                result.append(desired)
                return [[key, desired]]
            result.append(expected if current is None else current)
            return []

        self._locked(update)
        return result[0]

    def wait(self, keys: Iterable[str], timeout: Any = None) -> None:
        if isinstance(keys, str):
            raise TypeError("store.wait: keys must be a list of strings, not one string")
        seconds = self.timeout if timeout is None else to_seconds(timeout)
        self._wait_for([_as_key(k) for k in keys], seconds, "store.wait")

    def check(self, keys: Iterable[str]) -> bool:
        if isinstance(keys, str):
            raise TypeError("store.check: keys must be a list of strings, not one string")
        data = self._locked()
        return all(_as_key(k) in data for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes | None]:
        data = self._locked()
        return [data.get(_as_key(k)) for k in keys]

    def delete_key(self, key: str) -> bool:
        key = _as_key(key)
        existed = []

        def update(data: dict[str, bytes]) -> list[Any]:
            existed.append(key in data)
            return [[key, None]] if key in data else []

        self._locked(update)
        return existed[0]

    def num_keys(self) -> int:
        return len(self._locked())

    def clone(self) -> FileStore:
        """Another handle on the same file (its own timeout; no state is shared)."""
        return FileStore(self.path, self.world_size, timeout=self.timeout)
