"""The rendezvous store: a small authenticated key-value server and its clients.

``TCPStore`` (client, optionally hosting the server), ``FileStore`` (a shared
file), ``PrefixStore`` (a namespace inside another store), and torch's own
TCPStore wire protocol (a distrib job inside ``torchrun`` uses the agent's
store). Importing this package loads no collective, engine or array code: the
launcher depends on it alone.
"""

from __future__ import annotations

from ._base import PrefixStore, Store, to_seconds
from ._client import TCPStore
from ._file_store import FileStore
from ._ports import PortReservation, reserve_port

__all__ = [
    "FileStore",
    "PortReservation",
    "PrefixStore",
    "Store",
    "TCPStore",
    "reserve_port",
    "to_seconds",
]
