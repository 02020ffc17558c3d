"""The store interface (torch's ``Store``) and ``PrefixStore``, a namespace inside a store.

Every store (``TCPStore``, ``FileStore``, the client of torchrun's store)
implements ``Store``; keys are strings, values bytes (``str`` is encoded).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._errors import DistUsageError
from .._validate import check_timeout

__all__ = ["DEFAULT_STORE_TIMEOUT_S", "PrefixStore", "Store", "to_seconds"]

DEFAULT_STORE_TIMEOUT_S = 300.0  # torch's default store timeout (5 minutes)


def to_seconds(timeout: Any, what: str = "timeout") -> float:
    """Accept a ``datetime.timedelta`` or a number of seconds; reject the rest.

    NaN, infinities, zero, negatives and more than a year raise ``DistUsageError``
    (a ``ValueError``) naming ``what``; a non-number raises ``TypeError``.
    """
    return check_timeout(timeout, what, DistUsageError)


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, got {type(value).__name__}")


def _as_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"store key must be a string, got {type(key).__name__}")
    return key


class Store:
    """Base of the key-value stores: torch's methods, each bounded by ``timeout``."""

    timeout: float

    def set(self, key: str, value: str | bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def add(self, key: str, amount: int) -> int:
        raise NotImplementedError

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        raise NotImplementedError

    def wait(self, keys: Iterable[str], timeout: Any = None) -> None:
        raise NotImplementedError

    def check(self, keys: Iterable[str]) -> bool:
        raise NotImplementedError

    def delete_key(self, key: str) -> bool:
        raise NotImplementedError

    def num_keys(self) -> int:
        raise NotImplementedError

    def multi_get(self, keys: list[str]) -> list[bytes | None]:
        """Values of ``keys`` (``None`` where missing) without waiting."""
        return [self.get(k) if self.check([k]) else None for k in keys]

    def set_timeout(self, timeout: Any) -> None:
        self.timeout = to_seconds(timeout)

    def clone(self) -> Store:
        """A store on the same data with its own connection (for another thread)."""
        return self

    def close(self) -> None:
        """Release sockets (and stop the server if this store hosts it)."""


class PrefixStore(Store):
    """A view of ``store`` where every key is prefixed with ``prefix + "/"``."""

    def __init__(self, prefix: str, store: Store) -> None:
        self.prefix = prefix
        self.store = store

    @property  # type: ignore[override]
    def timeout(self) -> float:  # type: ignore[override]
        return self.store.timeout

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{_as_key(key)}"

    def set(self, key: str, value: str | bytes) -> None:
        self.store.set(self._k(key), value)

    def get(self, key: str) -> bytes:
        return self.store.get(self._k(key))

    def add(self, key: str, amount: int) -> int:
        return self.store.add(self._k(key), amount)

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        return self.store.compare_set(self._k(key), expected_value, desired_value)

    def wait(self, keys: Iterable[str], timeout: Any = None) -> None:
        self.store.wait([self._k(k) for k in keys], timeout)

    def check(self, keys: Iterable[str]) -> bool:
        return self.store.check([self._k(k) for k in keys])

    def multi_get(self, keys: list[str]) -> list[bytes | None]:
        return self.store.multi_get([self._k(k) for k in keys])

    def delete_key(self, key: str) -> bool:
        return self.store.delete_key(self._k(key))

    def num_keys(self) -> int:
        return self.store.num_keys()

    def set_timeout(self, timeout: Any) -> None:
        self.store.set_timeout(timeout)

    def clone(self) -> PrefixStore:
        return PrefixStore(self.prefix, self.store.clone())

    def close(self) -> None:
        """A prefix view does not own the underlying store: nothing to close."""
