"""Multi-node rendezvous: launchers agree on the world through a ``distrib.TCPStore``.

Node 0's launcher serves the store on ``--master-addr:--master-port``; every
launcher (node 0 included) is a client. Values are msgpack (never pickle); the
store signs requests with HMAC when a shared secret is set. Keys, per attempt k:

- ``r{k}/node/{n}``  node n's record: host, nproc, and from node 0 the run id,
  ``--max-restarts`` and the free port its rank 0 will bind (workers' MASTER_PORT);
- ``hb/{n}``         node n's heartbeat counter, bumped every ``beat`` seconds;
- ``r{k}/failed``    set by any node whose attempt failed: the others stop theirs;
- ``r{k}/end/{n}``   node n's worker exit records once its workers are all gone;
- ``bye``            counts launchers leaving for good; node 0 keeps the store up
  until all have said bye (or ``--node-timeout`` passes).

A node is lost when its heartbeat has not moved, or the store has not answered,
for ``--node-timeout`` seconds: the survivors stop their workers and report.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import msgpack

from distrib._errors import DistError

from ._options import LaunchOptions
from ._rendezvous import Round, free_port
from ._store_budget import REQUEST_S, stretched
from ._worker import WorkerExit

__all__ = ["StoreRendezvous"]

# Store requests while monitoring are short (REQUEST_S) so a cut link cannot stall the
# agent's loop for long; a node is declared lost only after --node-timeout of such misses.


class StoreRendezvous:
    """Rendezvous and failure propagation among ``nnodes`` launchers."""

    def __init__(self, options: LaunchOptions) -> None:
        self.opts = options
        self.n = options.node_rank
        self.nnodes = options.nnodes
        self.host = socket.gethostname()
        self.beat = min(1.0, options.node_timeout / 5)
        self.join_timeout = options.join_timeout
        self._store: Any = None
        self._last_beat = 0.0
        self._last_ok = time.monotonic()
        self._last_poll = 0.0
        self._seen: dict[int, tuple[int, float]] = {}  # node -> (heartbeat, when it moved)
        self._attempt = 0
        self._lost: str | None = None  # once a node is lost, the job is over: stop talking
        self._everyone_joined = False
        self._peer_failed = False  # node 0 waits for goodbyes only from nodes that came

    # -- store plumbing --------------------------------------------------------

    def _connect(self) -> Any:
        # Imported here: single-node jobs never load ZeroMQ. Created lazily (not in
        # __init__) so the agent forks its guardian before the store's threads exist.
        if self._store is None:
            from distrib.store import TCPStore

            self._store = TCPStore(
                self.opts.master_addr,
                self.opts.master_port or 0,
                is_master=self.n == 0,
                timeout=REQUEST_S,
                wait_for_workers=False,
                auth_token=self.opts.auth_token,
            )
        return self._store

    def _where(self) -> str:
        return f"{self.opts.master_addr}:{self.opts.master_port}"

    def _beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= self.beat:
            self._connect().add(f"hb/{self.n}", 1)
            self._last_beat = now
            self._last_ok = now

    def _lost_nodes(self, waiting_for: list[int]) -> str | None:
        """Reason a node counts as lost, or ``None``; updates heartbeat bookkeeping."""
        store = self._connect()
        now = time.monotonic()
        try:
            self._beat()
            *beats, failed = store.multi_get(
                [f"hb/{i}" for i in waiting_for] + [f"r{self._attempt}/failed"]
            )
            self._last_ok = now
            self._peer_failed = failed is not None
        except DistError as exc:
            if isinstance(exc, PermissionError):
                raise
            silent = now - self._last_ok
            if silent > self.opts.node_timeout:
                self._lost = (
                    f"node {self.n} lost contact with the launchers' store at {self._where()} "
                    f"for {silent:.1f} s (--node-timeout {self.opts.node_timeout:g}): {exc}"
                )
            return self._lost
        for i, raw in zip(waiting_for, beats, strict=True):
            value = int(raw) if raw is not None else -1
            last = self._seen.get(i)
            if last is None or last[0] != value:
                self._seen[i] = (value, now)
            elif now - last[1] > self.opts.node_timeout:
                self._lost = (
                    f"node {i}'s launcher sent no heartbeat for {now - last[1]:.1f} s "
                    f"(--node-timeout {self.opts.node_timeout:g}); it died or its network failed"
                )
                return self._lost
        return None

    # -- the rendezvous interface used by the agent ------------------------------

    def join(self, attempt: int) -> Round:
        """Meet every node for ``attempt``; returns this node's share of the world."""
        store = self._connect()
        self._attempt = attempt
        self._peer_failed = False
        record: dict[str, Any] = {"host": self.host, "nproc": self.opts.nproc}
        if self.n == 0:
            record.update(
                run_id=self.opts.run_id,
                max_restarts=self.opts.max_restarts,
                worker_port=free_port(self.opts.master_addr),
            )
        keys = [f"r{attempt}/node/{i}" for i in range(self.nnodes)]
        deadline = time.monotonic() + self.join_timeout
        try:
            # First contact: node 0, which hosts the store, may start later than this
            # node; wait for it as long as joining may take.
            with stretched(store, self.join_timeout):
                store.set(keys[self.n], msgpack.packb(record))
            with stretched(store, self.opts.node_timeout):
                self._beat(force=True)
                while True:
                    try:
                        store.wait(keys, timeout=REQUEST_S)
                        break
                    except DistError as exc:
                        self.heartbeat()  # a node still waiting here is alive, not lost
                        if isinstance(exc, PermissionError) or time.monotonic() > deadline:
                            raise
                records = [msgpack.unpackb(v) for v in store.multi_get(keys)]
        except DistError as exc:
            have = ""
            try:
                have = (
                    f" ({sum(1 for k in keys if store.check([k]))} of {self.nnodes} nodes joined)"
                )
            except DistError:
                pass
            raise type(exc)(
                f"node {self.n}: rendezvous for attempt {attempt} at {self._where()} failed"
                f"{have}: {exc}",
                op="launcher.join",
                peer=self._where(),
            ) from None
        self._everyone_joined = True
        head = records[0]
        if self.n != 0:
            self.opts.run_id = str(head["run_id"])
        self.opts.max_restarts = int(head["max_restarts"])  # node 0's value wins
        now = time.monotonic()
        self._seen = {i: (-1, now) for i in range(self.nnodes) if i != self.n}
        offset = sum(int(r["nproc"]) for r in records[: self.n])
        world = sum(int(r["nproc"]) for r in records)
        return Round(
            attempt,
            world,
            offset,
            self.nnodes,
            self.n,
            self.opts.master_addr,
            int(head["worker_port"]),
        )

    def heartbeat(self) -> None:
        """Tell the other nodes this launcher is alive (rate-limited; errors wait for polls)."""
        try:
            self._beat()
        except DistError:
            pass  # silence is judged by _lost_nodes, on both sides

    def peer_failures(self) -> str | None:
        """While workers run: why the job must stop because of another node, else ``None``."""
        now = time.monotonic()
        if now - self._last_poll < self.opts.monitor_interval:
            return None
        self._last_poll = now
        others = [i for i in range(self.nnodes) if i != self.n]
        lost = self._lost_nodes(others)  # also reads the attempt's "failed" flag
        if lost is not None:
            return lost
        return "another node's workers failed" if self._peer_failed else None

    def finish(
        self, attempt: int, exits: list[WorkerExit], failed: bool, interrupted: Callable[[], bool]
    ) -> tuple[list[WorkerExit], str | None]:
        """Publish this node's exits and wait for every node's; returns (theirs, lost reason)."""
        if self._lost is not None:
            return [], self._lost
        store = self._connect()
        doc = msgpack.packb([e.to_wire() for e in exits])
        leaving = interrupted()
        try:
            if leaving:  # a signal stops this launcher for good: nobody may restart
                note = f"node {self.n}'s launcher was interrupted by a signal and left"
                store.set(f"r{attempt}/abort", note.encode())
            if failed:
                store.set(f"r{attempt}/failed", b"1")
            store.set(f"r{attempt}/end/{self.n}", doc)
        except DistError as exc:
            return (
                [],
                f"node {self.n} could not reach the launchers' store at {self._where()}: {exc}",
            )
        keys = {i: f"r{attempt}/end/{i}" for i in range(self.nnodes) if i != self.n}
        theirs: dict[int, list[WorkerExit]] = {}
        lost = None
        while len(theirs) < len(keys) and not interrupted():
            waiting = [i for i in keys if i not in theirs]
            lost = self._lost_nodes(waiting)
            if lost is not None:
                break
            try:
                values = store.multi_get([keys[i] for i in waiting])
            except DistError:
                continue  # _lost_nodes decides when silence means lost
            for i, raw in zip(waiting, values, strict=True):
                if raw is not None:
                    theirs[i] = [WorkerExit.from_wire(d) for d in msgpack.unpackb(raw)]
            if len(theirs) < len(keys):
                time.sleep(self.opts.monitor_interval)
        if lost is None and not leaving:
            try:
                abort = store.multi_get([f"r{attempt}/abort"])[0]
            except DistError:
                abort = None
            if abort is not None:
                lost = abort.decode(errors="replace")  # not retryable, like a lost node
        return [e for i in sorted(theirs) for e in theirs[i]], lost

    def close(self) -> None:
        """Leave for good; node 0 keeps serving until every node has left (bounded)."""
        store = self._store
        if store is None:
            return
        if self._lost is not None and self.n != 0:
            store.close()  # the store is unreachable: saying goodbye would only time out
            return
        try:
            left = store.add("bye", 1)
            if self.n == 0 and self._everyone_joined and self._lost is None:
                end = time.monotonic() + self.opts.node_timeout
                while left < self.nnodes and time.monotonic() < end:
                    time.sleep(0.05)
                    left = store.add("bye", 0)
        except DistError:
            pass
        finally:
            store.close()
