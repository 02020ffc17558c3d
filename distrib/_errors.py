"""The distrib exception hierarchy.

One root, ``DistError``; subclasses are named by cause (a timeout passed, a peer
is gone, ranks disagree, the caller misused the API, memory ran out) and also
inherit the matching builtin, so ``except TimeoutError`` keeps working. Every
error carries ``rank``, ``op``, ``peer`` and ``caused_by`` (any may be ``None``)
and pickles with them, so an error raised in a worker arrives intact in its parent.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DistAuthError",
    "DistBackendError",
    "DistClosedError",
    "DistError",
    "DistMismatchError",
    "DistPeerLostError",
    "DistStoreError",
    "DistTimeoutError",
    "DistUsageError",
    "ShmError",
    "ShmFdLimitError",
    "ShmOutOfMemoryError",
]


class DistError(RuntimeError):
    """Root of every error distrib raises on purpose.

    Args:
        message: what went wrong, where, and how to fix it.
        rank: the rank that raised (``None`` outside a process group).
        op: the operation that failed (``"all_reduce"``, ``"store.get"`` ...).
        peer: the other rank (or address) involved, when there is one.
        caused_by: set when this error is a consequence of another rank's failure
            (that rank died, or failed and stopped the group): the global rank
            whose failure it follows. ``None`` for the original failure.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        op: str | None = None,
        peer: Any = None,
        caused_by: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.rank = rank
        self.op = op
        self.peer = peer
        self.caused_by = caused_by

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes do not survive BaseException's default reduce.
        return (
            _rebuild,
            (type(self), self.message, self.rank, self.op, self.peer, self.caused_by),
        )

    def __str__(self) -> str:
        return self.message


def _rebuild(
    cls: type[DistError], message: str, rank: Any, op: Any, peer: Any, caused_by: Any = None
) -> DistError:
    return cls(message, rank=rank, op=op, peer=peer, caused_by=caused_by)


class DistTimeoutError(DistError, TimeoutError):
    """An operation did not complete within its timeout."""


class DistPeerLostError(DistError, ConnectionError):
    """A peer died, closed its connection, or was reported failed by another rank."""


class DistMismatchError(DistError, ValueError):
    """Ranks called collectives that do not match (op, shape, dtype, root, order)."""


class DistUsageError(DistError, ValueError):
    """The caller used the API wrongly (bad argument, wrong state)."""


class DistClosedError(DistError):
    """The object (process group, store, queue) was already closed or destroyed."""


class DistBackendError(DistError):
    """A backend (ZeroMQ, NCCL, CUDA) failed or is unavailable."""


class DistStoreError(DistError):
    """The rendezvous store refused or failed a request."""


class DistAuthError(DistStoreError, PermissionError):
    """A request failed authentication (wrong or missing shared secret)."""


class ShmError(DistError, OSError):
    """Shared memory could not be created, mapped or passed."""


class ShmOutOfMemoryError(ShmError, MemoryError):
    """Not enough shared memory for an allocation; raised at allocation, never later."""


class ShmFdLimitError(ShmError):
    """A process hit its open-file limit while receiving shared-memory descriptors."""
