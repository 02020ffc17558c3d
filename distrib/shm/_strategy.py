"""Which kind of segment new shared arrays get: torch's sharing-strategy names."""

from __future__ import annotations

from .._config import config
from ._segment import FD, FS

__all__ = ["get_all_sharing_strategies", "get_sharing_strategy", "set_sharing_strategy"]

_STRATEGIES = (FD, FS)
# Per-process setting (like torch's); None = not set yet, read DISTRIB_SHARING_STRATEGY.
_strategy: str | None = None


def get_all_sharing_strategies() -> set[str]:
    """The strategies this platform supports: ``file_descriptor`` and ``file_system``."""
    return set(_STRATEGIES)


def get_sharing_strategy() -> str:
    """The strategy for new segments (default ``file_descriptor``, or DISTRIB_SHARING_STRATEGY)."""
    global _strategy
    if _strategy is None:
        _strategy = config().sharing_strategy or FD
    return _strategy


def set_sharing_strategy(new_strategy: str) -> None:
    """Set the strategy for segments created from now on in this process.

    Arrays already shared keep their kind; a receiver attaches either kind.
    """
    global _strategy
    if new_strategy not in _STRATEGIES:
        raise ValueError(
            f"unknown sharing strategy {new_strategy!r}; expected one of {', '.join(_STRATEGIES)}"
        )
    _strategy = new_strategy
