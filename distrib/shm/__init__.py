"""Shared-memory numpy arrays.

``empty``/``zeros``/``full`` allocate ordinary ``numpy.ndarray`` objects whose
memory is shared; ``share`` copies an array in (an array already shared comes
back as is); ``is_shared`` tells them apart. Through ``distrib.multiprocessing``
such arrays travel between processes as small handles, never as data.
"""

from __future__ import annotations

from ._array import empty, full, is_shared, share, zeros
from ._strategy import get_all_sharing_strategies, get_sharing_strategy, set_sharing_strategy

__all__ = [
    "empty",
    "full",
    "get_all_sharing_strategies",
    "get_sharing_strategy",
    "is_shared",
    "set_sharing_strategy",
    "share",
    "zeros",
]
