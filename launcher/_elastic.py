"""The c10d rendezvous (torchrun's semantics): node ranks by join order, ``--nnodes MIN:MAX``.

Launchers meet in a ``distrib.TCPStore`` at ``--rdzv-endpoint`` (served by the
launcher with ``--rdzv-conf is_host=1``, or by whichever first binds the
endpoint). Rounds are numbered; in round k (all keys under ``e/``):

- ``k/joined``   counter: a joiner's ticket is its node rank (join order);
- ``k/node/{t}`` node t's record (id, address, nproc, run id, worker port);
- ``k/closed``   set by ticket 0: the node count ``n`` once MAX joined, or MIN
  joined and ``last_call_timeout`` passed with no newcomer; tickets >= n are late;
- ``k/waiting``  counter of late nodes: the running group re-forms at once;
- ``k/failed``   a node's workers failed; ``k/end/{t}`` node t's worker exits;
- ``k/over``     the round ended: late nodes move on to round k+1;
- ``hb/{id}``    heartbeat counter of each launcher, ``k/bye`` goodbyes, ``done``.

A node silent for ``--node-timeout`` is lost: the survivors restart in a new
round if at least MIN remain (counted against ``--max-restarts``); a newcomer
re-forms the group without counting a restart. Values are msgpack, never pickle.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack

from distrib._errors import DistError, DistStoreError

from ._options import LaunchOptions
from ._rendezvous import Round, free_port
from ._store_budget import REQUEST_S, stretched
from ._worker import WorkerExit

__all__ = ["ElasticRendezvous"]

_POLL_S = 0.1


def _route_to(host: str, port: int) -> str:
    """The local address that reaches ``host`` (no packet is sent)."""
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return host
    if ip.startswith("127."):
        return ip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, port))
            return s.getsockname()[0]
    except OSError:
        return ip


class ElasticRendezvous:
    """Rounds of launchers agreeing on the world; the agent's rendezvous interface."""

    elastic = True

    def __init__(self, options: LaunchOptions) -> None:
        self.opts = options
        self.compat = options.torchrun
        self.min_nodes, self.max_nodes = self.compat.min_nodes, self.compat.max_nodes
        self.id = uuid.uuid4().hex[:12]
        self.addr = self.compat.local_addr or _route_to(
            options.master_addr, options.master_port or 29400
        )
        self.beat = min(1.0, options.node_timeout / 5)
        self._store: Any = None
        self._round = -1
        self._ticket = -1
        self._peers: dict[int, str] = {}  # ticket -> node id of this round
        self._seen: dict[str, tuple[int, float]] = {}
        self._last_beat = 0.0
        self._last_poll = 0.0
        self._last_ok = time.monotonic()
        self._lost: str | None = None
        self.regrouping = False  # the round ended to take in a newcomer (not a restart)
        self.survivable = False  # the round lost nodes but at least MIN remain

    # -- store plumbing ---------------------------------------------------------

    def _where(self) -> str:
        return f"{self.opts.master_addr}:{self.opts.master_port}"

    def _connect(self) -> Any:
        if self._store is not None:
            return self._store
        from distrib.store import TCPStore

        kwargs: dict[str, Any] = dict(
            timeout=REQUEST_S, wait_for_workers=False, auth_token=self.opts.auth_token
        )
        host, port = self.opts.master_addr, self.opts.master_port or 29400
        if self.compat.is_host is not False:
            try:
                self._store = TCPStore(host, port, is_master=True, **kwargs)
                return self._store
            except DistError:
                if self.compat.is_host:  # told to host, and cannot: say why
                    raise
        self._store = TCPStore(socket.gethostbyname(host), port, is_master=False, **kwargs)
        return self._store

    def _beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= self.beat:
            self._connect().add(f"e/hb/{self.id}", 1)
            self._last_beat = self._last_ok = now

    def _k(self, suffix: str, rnd: int | None = None) -> str:
        return f"e/{self._round if rnd is None else rnd}/{suffix}"

    # -- joining ----------------------------------------------------------------

    def _wait_key(self, key: str, deadline: float, what: str) -> None:
        store = self._connect()
        while True:
            try:
                store.wait([key], timeout=REQUEST_S)
                return
            except DistError as exc:
                if isinstance(exc, PermissionError):
                    raise
                self.heartbeat()
                if time.monotonic() > deadline:
                    raise DistStoreError(
                        f"c10d rendezvous at {self._where()}: {what} within "
                        f"{self.opts.join_timeout:g} s (--rdzv-conf join_timeout)",
                        op="launcher.join",
                        peer=self._where(),
                    ) from None

    def _close_round(self, deadline: float) -> None:
        """Ticket 0: decide when the round is complete and how many nodes it has."""
        store = self._connect()
        min_since: float | None = None
        while True:
            joined = int(store.add(self._k("joined"), 0))
            now = time.monotonic()
            if joined >= self.min_nodes and min_since is None:
                min_since = now
            last_call = min_since is not None and now - min_since >= self.compat.last_call_timeout
            if joined >= self.max_nodes or last_call:
                n = min(joined, self.max_nodes)
                store.compare_set(self._k("closed"), b"", str(n).encode())
                store.set("e/round", str(self._round).encode())
                return
            if now > deadline:
                raise DistStoreError(
                    f"c10d rendezvous at {self._where()}: only {joined} node(s) joined within "
                    f"{self.opts.join_timeout:g} s, --nnodes needs at least {self.min_nodes}",
                    op="launcher.join",
                    peer=self._where(),
                )
            self.heartbeat()
            time.sleep(_POLL_S)

    def join(self, attempt: int) -> Round:
        """Join the next round that forms; returns this node's share of its world."""
        store = self._connect()
        self.regrouping = self.survivable = False
        self._lost = None
        deadline = time.monotonic() + self.opts.join_timeout
        try:
            # First contact: the node hosting the store may not be up yet (it can start
            # later than we do); wait for it as long as joining may take.
            with stretched(store, self.opts.join_timeout):
                self._beat(force=True)
            with stretched(store, self.opts.node_timeout):
                return self._join_round(attempt, store, deadline)
        except DistError as exc:
            raise type(exc)(
                f"node {self.addr}: {exc}", op="launcher.join", peer=self._where()
            ) from None

    def _join_round(self, attempt: int, store: Any, deadline: float) -> Round:
        """Take a ticket in the next open round and wait until it is decided."""
        if self._round < 0:
            self._round = int(store.get("e/round")) if store.check(["e/round"]) else 0
        else:
            self._round += 1
        while True:
            if store.check(["e/done"]):
                raise DistStoreError(
                    f"c10d rendezvous at {self._where()}: the job already finished",
                    op="launcher.join",
                )
            if store.check([self._k("over")]):
                self._round += 1
                continue
            if store.check([self._k("closed")]):  # formed without us: wait for the next
                store.add(self._k("waiting"), 1)
                self._wait_key(self._k("over"), deadline, f"round {self._round} did not end")
                self._round += 1
                continue
            ticket = int(store.add(self._k("joined"), 1)) - 1
            record: dict[str, Any] = {
                "id": self.id,
                "addr": self.addr,
                "host": socket.gethostname(),
                "nproc": self.opts.nproc,
            }
            if ticket == 0:
                record.update(run_id=self.opts.run_id, worker_port=free_port(self.addr))
            store.set(self._k(f"node/{ticket}"), msgpack.packb(record))
            if ticket == 0:
                self._close_round(deadline)
            else:
                self._wait_key(self._k("closed"), deadline, "the group did not form")
            n = int(store.get(self._k("closed")))
            if ticket >= n:  # joined after the round was decided
                store.add(self._k("waiting"), 1)
                self._wait_key(self._k("over"), deadline, f"round {self._round} did not end")
                self._round += 1
                continue
            break
        keys = [self._k(f"node/{t}") for t in range(n)]
        for key in keys:
            self._wait_key(key, deadline, "a node did not publish its record")
        records = [msgpack.unpackb(v) for v in store.multi_get(keys)]
        self._ticket = ticket
        self._peers = {t: str(r["id"]) for t, r in enumerate(records)}
        now = time.monotonic()
        self._seen = {i: (-1, now) for t, i in self._peers.items() if t != ticket}
        head = records[0]
        self.opts.run_id = str(head["run_id"])
        offset = sum(int(r["nproc"]) for r in records[:ticket])
        world = sum(int(r["nproc"]) for r in records)
        return Round(
            attempt, world, offset, n, ticket, str(head["addr"]), int(head["worker_port"]),
            membership=self._round,
        )  # fmt: skip

    # -- while workers run ----------------------------------------------------------

    def heartbeat(self) -> None:
        """Tell the others this launcher is alive (errors are judged by ``_poll``)."""
        try:
            self._beat()
        except DistError:
            pass

    def _poll(self, waiting_for: list[int]) -> str | None:
        """Lost-node reason or ``None``; reads heartbeats of ``waiting_for`` tickets."""
        store = self._connect()
        now = time.monotonic()
        try:
            self._beat()
            ids = [self._peers[t] for t in waiting_for]
            beats = store.multi_get([f"e/hb/{i}" for i in ids])
            self._last_ok = now
        except DistError as exc:
            if isinstance(exc, PermissionError):
                raise
            if now - self._last_ok > self.opts.node_timeout:
                self._lost = (
                    f"node {self._ticket} lost contact with the rendezvous store at "
                    f"{self._where()} for {now - self._last_ok:.1f} s: {exc}"
                )
            return self._lost
        gone = []
        for t, i, raw in zip(waiting_for, ids, beats, strict=True):
            value = int(raw) if raw is not None else -1
            last = self._seen.get(i)
            if last is None or last[0] != value:
                self._seen[i] = (value, now)
            elif now - last[1] > self.opts.node_timeout:
                gone.append(t)
        if gone:
            left = len(self._peers) - len(gone)
            self.survivable = left >= self.min_nodes
            self._lost = (
                f"node(s) {gone} sent no heartbeat for {self.opts.node_timeout:g} s "
                f"(--node-timeout); {left} node(s) remain, --nnodes needs {self.min_nodes}"
            )
            for t in gone:
                self._peers.pop(t, None)
        return self._lost

    def peer_failures(self) -> str | None:
        """Why this node must stop its workers now (a failure, a lost node, a newcomer)."""
        now = time.monotonic()
        if now - self._last_poll < max(self.opts.monitor_interval, 0.2):
            return None
        self._last_poll = now
        others = [t for t in self._peers if t != self._ticket]
        lost = self._poll(others)
        if lost is not None:
            return lost
        try:
            failed, waiting = self._connect().multi_get([self._k("failed"), self._k("waiting")])
        except DistError:
            return None
        if failed is not None:
            return "another node's workers failed"
        if waiting is not None and int(waiting) > 0 and len(self._peers) < self.max_nodes:
            self.regrouping = True
            return "a new node joined; re-forming the group to take it in"
        return None

    def _newcomer_waiting(self) -> bool:
        try:
            waiting = self._connect().multi_get([self._k("waiting")])[0]
        except DistError:
            return False
        return waiting is not None and int(waiting) > 0 and len(self._peers) < self.max_nodes

    def finish(
        self, attempt: int, exits: list[WorkerExit], failed: bool, interrupted: Callable[[], bool]
    ) -> tuple[list[WorkerExit], str | None]:
        """Publish this node's exits, collect the others' (lost ones excepted)."""
        store = self._connect()
        if failed and not self.regrouping and self._lost is None and self._newcomer_waiting():
            # Another node saw the newcomer first and stopped its workers; ours failed
            # because of that (a peer left mid-collective): a re-form, not a failure.
            self.regrouping = True
        own_failure = failed and not self.regrouping and self._lost is None
        try:
            if interrupted():
                store.set(self._k("abort"), f"node {self._ticket} was interrupted".encode())
            if own_failure:
                store.set(self._k("failed"), b"1")
            store.set(self._k(f"end/{self._ticket}"), msgpack.packb([e.to_wire() for e in exits]))
            store.set(self._k("over"), b"1")
        except DistError as exc:
            return [], f"node {self._ticket} could not reach the rendezvous store: {exc}"
        theirs: dict[int, list[WorkerExit]] = {}
        while not interrupted():
            waiting = [t for t in self._peers if t != self._ticket and t not in theirs]
            if not waiting:
                break
            self._poll(waiting)
            waiting = [t for t in waiting if t in self._peers]
            try:
                values = store.multi_get([self._k(f"end/{t}") for t in waiting])
            except DistError:
                values = [None] * len(waiting)
            for t, raw in zip(waiting, values, strict=True):
                if raw is not None:
                    theirs[t] = [WorkerExit.from_wire(d) for d in msgpack.unpackb(raw)]
            time.sleep(_POLL_S)
        try:
            abort, peer_failed = store.multi_get([self._k("abort"), self._k("failed")])
        except DistError:
            abort = peer_failed = None
        if peer_failed is not None:
            self.regrouping = False  # a real failure in this round: counted as a restart
        lost = self._lost
        if abort is not None and not interrupted():
            lost, self.survivable = abort.decode(errors="replace"), False
        exits_all = [e for t in sorted(theirs) for e in theirs[t]]
        if lost is None and not failed and not any(e.failed for e in exits_all):
            try:
                store.set("e/done", b"1")  # the job is over: a late node must not wait
            except DistError:
                pass
        return exits_all, lost

    def close(self) -> None:
        """Leave; the launcher serving the store stays until this round's nodes left."""
        store = self._store
        if store is None:
            return
        try:
            left = int(store.add(self._k("bye"), 1))
            if getattr(store, "is_master", False):
                end = time.monotonic() + self.opts.node_timeout
                while left < len(self._peers) and time.monotonic() < end:
                    time.sleep(0.05)
                    left = int(store.add(self._k("bye"), 0))
        except DistError:
            pass
        finally:
            store.close()
