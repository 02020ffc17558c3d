"""Rendezvous stores, process groups and collectives (torch.distributed's API).

Stores: ``TCPStore`` (ZeroMQ, msgpack, optional HMAC authentication),
``FileStore`` and ``PrefixStore``.
"""

from __future__ import annotations

from ._file_store import FileStore
from ._store import PrefixStore, Store, TCPStore

__all__ = [
    "FileStore",
    "PrefixStore",
    "Store",
    "TCPStore",
]
