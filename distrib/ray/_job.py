"""The driver side of a job on Ray: place, start, watch, stop, restart, clean up.

One attempt: a placement group with one bundle per rank, one ``RankHost`` actor
per bundle, ranks assigned by Ray node (``_layout``), every rank started with
torchrun's variables, then a loop that long-polls every actor for output and
exit. The first failure (an exit that is not 0, or an actor/node that died)
stops the other ranks (SIGTERM, then SIGKILL after the grace period); the
attempt ends with the failure report of ``distrib-run``. Whatever happens, the
actors are ended and the placement group removed before the attempt returns.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from launcher._output import StreamPump
from launcher._report import format_report, root_cause
from launcher._worker import WorkerExit

from .._errors import DistError
from ._layout import ActorInfo, RankSlot, assign_ranks

__all__ = ["JobSpec", "launch"]

_TITLE = "distrib.ray"
_SECONDARY = ("DistPeerLostError", "DistTimeoutError")  # errors a lost peer causes
# An actor's poll returns at once on news (output, the rank's exit), else after
# this long. Each idle return is a Ray call that takes CPU from the ranks on that
# node (every 0.25 s per actor cost the ranks 2.5% of a saturated 2-core node),
# and nothing needs it sooner: a dead actor fails its pending poll at once.
_IDLE_POLL_S = 2.0
_TICK_S = 0.25  # how often the driver checks the deadline and the stop escalation
_PLACEMENT_WAIT_S = 300.0  # placement wait when no timeout is given
_PLACEMENT_NOTICE_S = 10.0  # after this long without a placement, say what we wait for
_CALL_WAIT_S = 120.0  # actor start-up (a new worker process) and small calls
_STOP_EXTRA_S = 10.0  # after SIGKILL, how long ranks may take to report before we give up
_END_WAIT_S = 10.0  # how long to wait for ended actors to be gone


@dataclass
class JobSpec:
    """A validated job: what each rank runs and how the ranks are placed."""

    num_workers: int
    run_id: str
    payload: bytes | None = None  # cloudpickled (fn, args, kwargs), or
    command: list[str] | None = None  # launcher._bootstrap's [mode, target, *args]
    cwd: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement: str = "PACK"
    max_restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # wall-clock limit of one attempt, placement included
    grace_period: float = 5.0
    prefix_output: bool = True


class _Console:
    """Binary writes to the current ``sys.stdout``/``sys.stderr`` (tests swap them)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, data: bytes) -> int:
        stream = getattr(sys, self.name)
        stream.flush()
        raw = getattr(stream, "buffer", None)
        if raw is None:
            stream.write(bytes(data).decode(errors="replace"))
            return len(data)
        n = raw.write(data)
        return len(data) if n is None else n

    def flush(self) -> None:
        stream = getattr(sys, self.name)
        raw = getattr(stream, "buffer", stream)
        raw.flush()


class AttemptFailed(Exception):
    """One attempt failed; ``report`` is the text for the user."""

    def __init__(self, report: str, root: WorkerExit | None, retriable: bool) -> None:
        super().__init__(report)
        self.report = report
        self.root = root
        self.retriable = retriable


def _node_desc(info: ActorInfo) -> str:
    return f"{info.hostname} (Ray node {info.node_id[:12]}, {info.node_ip})"


def _ray_death(exc: BaseException) -> str:
    """A one-line reason from Ray's actor-death error."""
    text = str(exc)
    low = text.lower()
    if "node" in low and ("died" in low or "dead" in low) and "worker process has died" not in low:
        head = "its Ray node was lost"
    else:
        head = "its Ray actor died"
    detail = ""
    for key in ("Worker exit detail:", "The actor is dead because", "The actor died because"):
        at = text.find(key)
        if at >= 0:
            detail = text[at:].split(". ")[0].strip()
            break
    return f"{head} ({detail})" if detail else head


def _root_cause(exits: list[WorkerExit]) -> WorkerExit | None:
    """The earliest failure that is not only a lost peer.

    A rank leaving (``sys.exit`` runs exit handlers first) can be seen by its
    peers before its own process has ended, so their lost-peer errors may carry
    earlier times than the rank that caused them.
    """
    failed = [e for e in exits if e.failed]
    primary = [e for e in failed if not e.message.startswith(_SECONDARY)]
    return root_cause(primary or failed)


class _Attempt:
    """One placement of the group, from placement group to cleanup."""

    def __init__(self, spec: JobSpec, attempt: int) -> None:
        import ray

        self.ray = ray
        self.spec = spec
        self.attempt = attempt
        self.pg: Any = None
        self.actors: list[Any] = []
        self.infos: list[ActorInfo] = []
        self.slots: list[RankSlot] = []
        self.started = time.monotonic()
        self.deadline = None if spec.timeout is None else self.started + spec.timeout

    # -- placement -----------------------------------------------------------

    def _wait(self, refs: list[Any], limit: float, what: str) -> list[Any]:
        if self.deadline is not None:
            limit = min(limit, max(self.deadline - time.monotonic(), 0.0))
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=limit)
        if len(ready) < len(refs):
            if self.deadline is not None and time.monotonic() >= self.deadline - 0.05:
                raise DistError(
                    f"{_TITLE}: job {self.spec.run_id} timed out: {what} did not finish "
                    f"within timeout={self.spec.timeout:g} s",
                    op="distrib.ray.run",
                )
            raise DistError(
                f"{_TITLE}: {what} did not finish within {limit:.0f} s", op="distrib.ray.run"
            )
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayActorError as exc:
            raise DistError(f"{_TITLE}: {what} failed: {_ray_death(exc)}", op="distrib.ray.run")

    def place(self) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ._actor import RankHost

        spec = self.spec
        bundle = {"CPU": spec.cpus_per_worker}
        if spec.gpus_per_worker:
            bundle["GPU"] = spec.gpus_per_worker
        bundle = {k: v for k, v in bundle.items() if v}
        self.pg = placement_group(
            [dict(bundle) for _ in range(spec.num_workers)],
            strategy=spec.placement,
            name=f"distrib-{spec.run_id}-{self.attempt}",
        )
        try:
            ready = self.pg.ready()
            # Say what we wait for when the cluster cannot place the group at once.
            notice = _PLACEMENT_NOTICE_S
            if self.deadline is not None:
                notice = min(notice, max(self.deadline - time.monotonic(), 0.0))
            if not self.ray.wait([ready], timeout=notice)[0]:
                print(
                    f"{_TITLE}: waiting for Ray to place {spec.num_workers} worker(s) of "
                    f"{bundle} ({spec.placement}); free now: {self.ray.available_resources()}",
                    file=sys.stderr,
                    flush=True,
                )
            self._wait([ready], _PLACEMENT_WAIT_S, "placement")
        except DistError:
            raise DistError(
                f"{_TITLE}: could not place {spec.num_workers} worker(s) of {bundle} with "
                f"placement={spec.placement} (waited "
                f"{min(_PLACEMENT_WAIT_S, spec.timeout or _PLACEMENT_WAIT_S):.0f} s); the "
                f"cluster has {self.ray.cluster_resources()} in total, "
                f"{self.ray.available_resources()} free",
                op="distrib.ray.run",
            ) from None
        host = self.ray.remote(RankHost)
        for i in range(spec.num_workers):
            self.actors.append(
                host.options(
                    num_cpus=spec.cpus_per_worker,
                    num_gpus=spec.gpus_per_worker,
                    max_restarts=0,
                    max_task_retries=0,
                    # a stop or shutdown must not queue behind a poll that is waiting
                    max_concurrency=4,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=i
                    ),
                ).remote()
            )
        docs = self._wait([a.info.remote() for a in self.actors], _CALL_WAIT_S, "actor start-up")
        self.infos = [ActorInfo(**d) for d in docs]
        self.slots = assign_ranks(self.infos)

    # -- start ---------------------------------------------------------------

    def start(self, auth_token: str) -> None:
        spec = self.spec
        master = self.infos[self.slots[0].actor]
        port = self._wait(
            [self.actors[self.slots[0].actor].free_port.remote(master.node_ip)],
            _CALL_WAIT_S,
            "port selection",
        )[0]
        refs = []
        for s in self.slots:
            info = self.infos[s.actor]
            env = dict(spec.env)
            env.update(
                RANK=str(s.rank),
                LOCAL_RANK=str(s.local_rank),
                WORLD_SIZE=str(spec.num_workers),
                LOCAL_WORLD_SIZE=str(s.local_world_size),
                GROUP_RANK=str(s.group_rank),
                GROUP_WORLD_SIZE=str(s.group_world_size),
                ROLE_RANK=str(s.rank),
                ROLE_WORLD_SIZE=str(spec.num_workers),
                ROLE_NAME="default",
                MASTER_ADDR=master.node_ip,
                MASTER_PORT=str(port),
                DISTRIB_AUTH_TOKEN=auth_token,
                DISTRIB_NODE_ID=info.node_id,
                DISTRIB_RUN_ID=spec.run_id,
                DISTRIB_RESTART_COUNT=str(self.attempt),
                DISTRIB_MAX_RESTARTS=str(spec.max_restarts),
                TORCHELASTIC_RUN_ID=spec.run_id,
                TORCHELASTIC_RESTART_COUNT=str(self.attempt),
                TORCHELASTIC_MAX_RESTARTS=str(spec.max_restarts),
            )
            refs.append(
                self.actors[s.actor].start.remote(
                    {
                        "rank": s.rank,
                        "local_rank": s.local_rank,
                        "group_rank": s.group_rank,
                        "env": env,
                        "grace": spec.grace_period,
                        "payload": spec.payload,
                        "command": spec.command,
                        "cwd": spec.cwd,
                    }
                )
            )
        self.pids = self._wait(refs, _CALL_WAIT_S, "starting the ranks")

    # -- watch ---------------------------------------------------------------

    def _lost(self, s: RankSlot, why: str, seen: float, stopping: bool) -> WorkerExit:
        return WorkerExit(
            rank=s.rank,
            local_rank=s.local_rank,
            node_rank=s.group_rank,
            host=_node_desc(self.infos[s.actor]),
            pid=self.pids[s.rank],
            exitcode=1,
            time=seen,
            lost=why,
            stopped_by_launcher=stopping,
        )

    def watch(self) -> list[Any]:
        """Relay output until every rank has ended; results in rank order, or raise."""
        ray, spec = self.ray, self.spec
        console: dict[int, Any] = {1: _Console("stdout"), 2: _Console("stderr")}
        pumps = {
            (s.rank, k): StreamPump(
                f"[{s.rank}]: ".encode() if spec.prefix_output else b"", console[k], None
            )
            for s in self.slots
            for k in (1, 2)
        }
        polls = {self.actors[s.actor].poll.remote(_IDLE_POLL_S): s for s in self.slots}
        last_seen = {s.rank: time.time() for s in self.slots}
        exits: dict[int, WorkerExit] = {}
        results: dict[int, Any] = {}
        headline: str | None = None
        stop_at: float | None = None
        killed = False
        try:
            while polls:
                ready, _ = ray.wait(list(polls), num_returns=1, timeout=_TICK_S)
                for ref in ready:
                    s = polls.pop(ref)
                    try:
                        msg = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        exits[s.rank] = self._lost(
                            s, _ray_death(exc), last_seen[s.rank], stop_at is not None
                        )
                        continue
                    except ray.exceptions.RayError as exc:  # e.g. the call's owner is gone
                        why = f"its Ray actor could not be reached: {str(exc).splitlines()[0]}"
                        exits[s.rank] = self._lost(s, why, last_seen[s.rank], stop_at is not None)
                        continue
                    last_seen[s.rank] = time.time()
                    for stream, data in msg["chunks"]:
                        pumps[(s.rank, stream)].feed(data)
                    if msg["exit"] is not None:
                        ex = WorkerExit.from_wire(msg["exit"])
                        ex.host = _node_desc(self.infos[s.actor])
                        exits[s.rank] = ex
                        if msg["has_result"]:
                            results[s.rank] = msg["result"]
                    else:
                        polls[self.actors[s.actor].poll.remote(_IDLE_POLL_S)] = s
                now = time.monotonic()
                if headline is None:
                    bad = [e for e in exits.values() if e.failed]
                    if bad:
                        first = min(bad, key=lambda e: (e.time, e.rank))
                        headline = f"rank {first.rank} on host {first.host}: {first.reason()}"
                    elif self.deadline is not None and now > self.deadline and polls:
                        headline = (
                            f"timed out: the attempt ran longer than timeout={spec.timeout:g} s"
                        )
                    if headline is not None:
                        stop_at = now
                        self._signal(polls.values(), 15)
                elif stop_at is not None and not killed and now - stop_at > spec.grace_period:
                    self._signal(polls.values(), 9)
                    killed = True
                elif killed and stop_at and now - stop_at > spec.grace_period + _STOP_EXTRA_S:
                    for s in polls.values():
                        exits[s.rank] = self._lost(
                            s, "did not stop after SIGKILL", last_seen[s.rank], True
                        )
                    break
        finally:
            for p in pumps.values():
                p.close()
        ordered = [exits[s.rank] for s in self.slots]
        for s, ex in zip(self.slots, ordered, strict=True):
            lines = [pumps[(s.rank, k)].last_line for k in (1, 2) if pumps[(s.rank, k)].last_line]
            ex.last_output = lines[-1].decode(errors="replace") if lines else ""
        root = _root_cause(ordered)
        timed_out = headline is not None and headline.startswith("timed out")
        if root is not None and not timed_out:  # the earliest failure, not the first we heard of
            headline = f"rank {root.rank} on host {root.host}: {root.reason()}"
        elif headline is None and any(e.exitcode != 0 for e in ordered):
            headline = "a rank failed"
        if headline is not None:
            report = format_report(
                ordered,
                run_id=spec.run_id,
                attempt=self.attempt,
                max_restarts=spec.max_restarts,
                headline=headline,
                title=_TITLE,
                root=root,
            )
            retriable = root is None or root.phase != "startup"
            raise AttemptFailed(report, root, retriable)
        return [results.get(s.rank) for s in self.slots]

    def _signal(self, slots: Any, sig: int) -> None:
        for s in list(slots):
            self.actors[s.actor].stop.remote(sig)

    # -- cleanup -------------------------------------------------------------

    def close(self) -> None:
        """End every actor (rank processes with them) and remove the placement group."""
        ray = self.ray
        if self.actors:
            refs = [a.shutdown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=_END_WAIT_S)
            for a in self.actors:
                ray.kill(a, no_restart=True)
            # A call on a killed actor fails once Ray has seen it die: wait for that.
            probes = [a.info.remote() for a in self.actors]
            ray.wait(probes, num_returns=len(probes), timeout=_END_WAIT_S)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:
                pass


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()  # Ray's own choice: RAY_ADDRESS, a running local cluster, or a new one


def launch(spec: JobSpec, auth_token: str) -> list[Any]:
    """Run the job to completion (restarting up to ``max_restarts`` times).

    Returns the ranks' results in rank order; raises ``DistError`` with the report.
    """
    _ensure_ray()
    attempt = 0
    while True:
        job = _Attempt(spec, attempt)
        try:
            job.place()
            job.start(auth_token)
            return job.watch()
        except AttemptFailed as failed:
            if failed.retriable and attempt < spec.max_restarts:
                print(
                    f"{_TITLE}: job {spec.run_id} attempt {attempt + 1} failed "
                    f"({failed.report.splitlines()[1].split('FAILED: ', 1)[-1]}); restarting "
                    f"the whole group (restart {attempt + 1} of {spec.max_restarts})",
                    file=sys.stderr,
                    flush=True,
                )
                attempt += 1
                continue
            root = failed.root
            raise DistError(
                failed.report,
                rank=None if root is None else root.rank,
                op="distrib.ray.run",
                peer=None if root is None else root.host,
            ) from None
        finally:
            job.close()
