"""How launchers agree on the world for one attempt (the single-node case).

A rendezvous hands the agent a ``Round`` per attempt (world size, this node's
first global rank, where rank 0 listens) and tells it, while workers run,
whether another node failed. One node needs no traffic at all; the multi-node
version over ``distrib.TCPStore`` lives in ``_multinode``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from ._worker import WorkerExit

__all__ = ["Round", "SingleNodeRendezvous", "free_port"]


@dataclass(frozen=True)
class Round:
    """The world of one attempt, as every node sees it."""

    attempt: int
    world_size: int
    rank_offset: int  # global rank of this node's local rank 0
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    membership: int = 0  # elastic jobs: the rendezvous round (it changes without a restart)


def free_port(host: str = "") -> int:
    """A TCP port nobody listens on right now; rank 0 binds it right after.

    The socket is closed before returning, leaving the port free for the worker
    (torch's ``env://`` rank 0 binds ``MASTER_PORT`` itself).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SingleNodeRendezvous:
    """All ranks on this host: nothing to agree on, no peers to watch."""

    def __init__(self, nproc: int, master_addr: str, master_port: int | None) -> None:
        self.nproc = nproc
        self.master_addr = master_addr
        self.master_port = master_port

    def join(self, attempt: int) -> Round:
        # A new free port per attempt: the previous rank 0 may have left it in TIME_WAIT.
        port = self.master_port if self.master_port is not None else free_port()
        return Round(attempt, self.nproc, 0, 1, 0, self.master_addr, port)

    def heartbeat(self) -> None:
        """Tell other nodes this launcher is alive (nobody to tell)."""

    def peer_failures(self) -> str | None:
        """Why the job must stop because of another node (never, on one node)."""
        return None

    def finish(
        self, attempt: int, exits: list[WorkerExit], failed: bool, interrupted: Callable[[], bool]
    ) -> tuple[list[WorkerExit], str | None]:
        """Publish this node's exits, wait for the others'; (their exits, lost-node reason)."""
        return [], None

    def close(self) -> None:
        """Leave the rendezvous for good."""
