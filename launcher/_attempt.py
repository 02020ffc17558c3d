"""One attempt of this node's workers, as a state machine: run, stop, drain, describe.

The agent spawns the workers and hands them to an ``Attempt``, whose ``run()``
loops one *tick* at a time: act for the current ``Phase``, then (unless the
attempt is down to draining) send the rendezvous heartbeat and wait up to
``--monitor-interval`` for worker output or a signal. The phases:

    =========  ==============================================  =======================
    phase      what it does                                    next
    =========  ==============================================  =======================
    RUNNING    asks ``_check`` each tick whether it is over    LINGERING: all exited 0
                                                               STOPPING: anything else
    LINGERING  gives leftovers ``_LINGER_S``, then SIGTERM     STOPPING
    STOPPING   gives ``--grace-period``, then SIGKILL          KILLING
    KILLING    SIGKILLs newcomers; gives up after 10 s         DRAINING
    DRAINING   reads the pipes to EOF, for up to ``_DRAIN_S``  DONE
    =========  ==============================================  =======================

LINGERING, STOPPING and KILLING also move to DRAINING as soon as neither a
worker's process group nor a stray (see below) is alive.

- ``RUNNING``: each tick asks ``_check`` whether the attempt is over and why
  (an ``AttemptOutcome``). On anything but success the workers' process groups
  get SIGTERM (or the signal the launcher received) and the grace period starts;
  when the ending looks like a hang, running workers are first asked for their
  stacks. A phase that RUNNING hands over to acts in the same tick, with no wait.
- ``LINGERING``: every worker exited 0, but processes they started (in their
  groups, or escaped with ``setsid``) may remain; they get ``_LINGER_S`` to exit
  on their own (multiprocessing's resource tracker does), then are stopped.
- ``STOPPING``: SIGTERM was sent; escaped descendants ("strays") get it too. After
  ``--grace-period`` the groups and strays get SIGKILL.
- ``KILLING``: SIGKILL was sent; strays forked since then get it as well. After
  10 s more the launcher says what survived and gives up on it.
- ``DRAINING``: no process is left (or the survivors are given up on); output
  still in the pipes (held open by an escaped process, say) is read for up to
  ``_DRAIN_S``.
- ``DONE``: the pipes are closed and the ``AttemptResult`` is assembled.
"""

from __future__ import annotations

import enum
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._guardian import Guardian
from ._options import LaunchOptions
from ._output import StreamPump
from ._procs import descendants, signal_pids
from ._rendezvous import Round
from ._worker import Worker, WorkerExit

__all__ = [
    "Attempt",
    "AttemptContext",
    "AttemptOutcome",
    "AttemptResult",
    "Phase",
    "timed_out",
]

# After the workers are gone, wait this long for EOF on pipes an escaped process holds.
_DRAIN_S = 1.0
# Processes a successful worker leaves behind get this long to exit on their own
# (multiprocessing's resource tracker exits within milliseconds of its parent).
_LINGER_S = 1.0
# How long a hung job's workers get to write their stack dumps before being stopped.
_DUMP_WAIT_S = 3.0
# How long processes that survive SIGKILL are waited for before being given up on.
_KILL_WAIT_S = 10.0


class AttemptOutcome(enum.Enum):
    """Why an attempt ended (as this node saw it)."""

    SUCCESS = "success"  # every worker exited 0
    FAILURE = "failure"  # a worker exited non-zero or was killed
    SIGNAL = "signal"  # the launcher received SIGINT, SIGTERM or SIGHUP
    TIMEOUT = "timeout"  # --timeout passed
    PEER = "peer"  # another node's workers failed, or the node was lost


@dataclass
class AttemptResult:
    """How one attempt ended."""

    outcome: AttemptOutcome
    exits: list[WorkerExit] = field(default_factory=list)
    signum: int = 0  # the signal received, for AttemptOutcome.SIGNAL
    peer_reason: str = ""  # what another node reported, for AttemptOutcome.PEER


class Phase(enum.Enum):
    """Where a running attempt is (the module docstring draws the transitions)."""

    RUNNING = "running"
    LINGERING = "lingering"
    STOPPING = "stopping"
    KILLING = "killing"
    DRAINING = "draining"
    DONE = "done"


@dataclass
class _AttemptState:
    """What changes while an attempt runs."""

    started: float  # time.monotonic() once the workers were spawned
    phase: Phase = Phase.RUNNING
    # When the current phase acts next: LINGERING stops leftovers at it, STOPPING
    # sends SIGKILL after it, KILLING gives up after it.
    deadline: float = 0.0
    result: AttemptResult | None = None
    strays_signalled: bool = False  # escaped descendants got SIGTERM already


@dataclass(frozen=True)
class AttemptContext:
    """What an attempt needs from the agent that runs it; the same for every attempt."""

    opts: LaunchOptions
    rdzv: Any  # the rendezvous: heartbeat() and peer_failures()
    guardian: Guardian
    wake_fd: int  # readable when a signal arrived (signal.set_wakeup_fd)
    pending_signal: Callable[[], int]  # the signal the launcher received, else 0
    say: Callable[[str], None]  # print a launcher message


class Attempt:
    """Watch one attempt's spawned workers until they and their descendants are gone."""

    def __init__(
        self, ctx: AttemptContext, rnd: Round, sel: selectors.BaseSelector, workers: list[Worker]
    ) -> None:
        self.ctx = ctx
        self.rnd = rnd
        self.sel = sel  # the workers' pipes, and the wakeup fd (with data None)
        self.workers = workers
        self.state = _AttemptState(started=time.monotonic())
        self._steps: dict[Phase, Callable[[float, list[Worker], set[int]], None]] = {
            Phase.LINGERING: self._step_lingering,
            Phase.STOPPING: self._step_stopping,
            Phase.KILLING: self._step_killing,
        }

    def run(self) -> AttemptResult:
        """Step through the phases until DONE; return how the attempt ended."""
        try:
            while self.state.phase is not Phase.DONE:
                self._tick(time.monotonic())
        finally:
            self._close()
        assert self.state.result is not None
        return self._describe(self.state.result)

    # -- the phases ----------------------------------------------------------

    def _tick(self, now: float) -> None:
        """Act once for the current phase, then wait for output or a signal."""
        state = self.state
        if state.phase is Phase.RUNNING:
            self._step_running(now)
            if state.phase is Phase.RUNNING:
                self._wait()
                return
            # the attempt just ended: look at what is left in this same tick
        if state.phase is Phase.DRAINING:
            self._drain()
            state.phase = Phase.DONE
            return
        alive = [w for w in self.workers if w.group_alive()]
        # Descendants outside the workers' groups: setsid children, daemons
        # (re-parented to us: we are a subreaper).
        strays = self._strays()
        if not alive and not strays:
            state.phase = Phase.DRAINING
            return
        self._steps[state.phase](now, alive, strays)
        if state.phase is not Phase.DRAINING:
            self._wait()

    def _step_running(self, now: float) -> None:
        """RUNNING: end the attempt when ``_check`` finds a reason to."""
        result = self._check(now)
        if result is None:
            return
        self.state.result = result
        if _hang_suspected(result, self.workers):
            self._collect_dumps()
        if result.outcome is AttemptOutcome.SUCCESS:
            self.state.phase, self.state.deadline = Phase.LINGERING, now + _LINGER_S
            return
        first = result.signum if result.outcome is AttemptOutcome.SIGNAL else signal.SIGTERM
        for w in self.workers:
            if w.poll() is None:
                w.stop_requested = True
            w.signal_group(first)
        self._enter_stopping(now)

    def _step_lingering(self, now: float, alive: list[Worker], strays: set[int]) -> None:
        """LINGERING: all exited 0; stop what they left once it had its time to exit."""
        if now < self.state.deadline:
            return  # helpers such as multiprocessing's resource tracker exit soon
        ranks = [w.rank for w in alive]
        self.ctx.say(
            f"ranks {ranks} exited 0 but left processes; stopping them"
            if ranks
            else f"workers exited 0 but left processes {sorted(strays)}; stopping them"
        )
        for w in alive:
            w.signal_group(signal.SIGTERM)
        signal_pids(strays, signal.SIGTERM)
        self.state.strays_signalled = True
        self._enter_stopping(now)

    def _enter_stopping(self, now: float) -> None:
        self.state.phase = Phase.STOPPING
        self.state.deadline = now + self.ctx.opts.grace_period

    def _step_stopping(self, now: float, alive: list[Worker], strays: set[int]) -> None:
        """STOPPING: SIGTERM sent; SIGKILL everything once the grace period is over."""
        self._term_strays(strays)
        if now <= self.state.deadline:
            return
        for w in alive:
            w.signal_group(signal.SIGKILL)
        signal_pids(strays, signal.SIGKILL)
        self.state.phase = Phase.KILLING
        self.state.deadline += _KILL_WAIT_S

    def _step_killing(self, now: float, alive: list[Worker], strays: set[int]) -> None:
        """KILLING: SIGKILL sent; kill newcomers, give up on survivors after a while."""
        self._term_strays(strays)
        if now > self.state.deadline:
            self.ctx.say(
                f"processes of ranks {[w.rank for w in alive]} (and "
                f"{sorted(strays)}) survive SIGKILL"
            )
            self.state.phase = Phase.DRAINING
            return
        signal_pids(strays, signal.SIGKILL)  # newcomers forked while dying

    def _term_strays(self, strays: set[int]) -> None:
        """Escaped descendants get the workers' SIGTERM, once."""
        if strays and not self.state.strays_signalled:
            signal_pids(strays, signal.SIGTERM)
            self.state.strays_signalled = True

    def _check(self, now: float) -> AttemptResult | None:
        """Decide whether the attempt is over (and why); ``None`` while it runs on."""
        signum = self.ctx.pending_signal()
        if signum:
            return AttemptResult(AttemptOutcome.SIGNAL, signum=signum)
        exits = [w.poll() for w in self.workers]
        if any(e is not None and e.exitcode != 0 for e in exits):
            return AttemptResult(AttemptOutcome.FAILURE)
        if all(e is not None for e in exits):
            return AttemptResult(AttemptOutcome.SUCCESS)
        peer = self.ctx.rdzv.peer_failures()
        if peer:
            return AttemptResult(AttemptOutcome.PEER, peer_reason=peer)
        timeout = self.ctx.opts.timeout
        if timeout is not None and now - self.state.started > timeout:
            return AttemptResult(AttemptOutcome.TIMEOUT)
        return None

    # -- output and processes ------------------------------------------------

    def _wait(self) -> None:
        """End of a tick: heartbeat, then move output until the next one is due."""
        self.ctx.rdzv.heartbeat()  # also while stopping, which can take a while
        self._pump(self.ctx.opts.monitor_interval)

    def _pump(self, timeout: float) -> None:
        """Move worker output to the console; wake early on any signal."""
        wake_fd = self.ctx.wake_fd
        for key, _ in self.sel.select(timeout):
            if key.fileobj == wake_fd:
                try:
                    while os.read(wake_fd, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            pump: StreamPump = key.data
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                pump.feed(data)
            else:
                self.sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                pump.close()

    def _drain(self) -> None:
        """DRAINING: read the pipes until EOF (only the wakeup fd left) or ``_DRAIN_S``."""
        end = time.monotonic() + _DRAIN_S
        while len(self.sel.get_map()) > 1 and time.monotonic() < end:
            self._pump(0.05)

    def _collect_dumps(self) -> None:
        """Ask every running worker for its stacks; wait (bounded) for the answers."""
        asked = [w for w in self.workers if w.request_dump()]
        end = time.monotonic() + _DUMP_WAIT_S
        while asked and time.monotonic() < end:
            self._pump(0.02)
            asked = [w for w in asked if not w.dump_answered()]
        if asked:
            self.ctx.say(
                f"ranks {[w.rank for w in asked]} gave no stack dump within {_DUMP_WAIT_S} s"
            )

    def _strays(self) -> set[int]:
        """Live descendants of ours other than the worker processes themselves.

        Includes what left the workers' groups or sessions (re-parented to us, a
        child subreaper, when their parent exited). Reaps those that already
        exited (they were re-parented to us); worker processes themselves are
        left to their ``Popen``.
        """
        leaders = {w.pid for w in self.workers}
        tree = descendants(os.getpid(), exclude=frozenset({self.ctx.guardian.pid}))
        live = set()
        for pid, (state, _) in tree.items():
            if pid in leaders:
                continue
            if state == b"Z":
                try:
                    os.waitpid(pid, os.WNOHANG)  # ours only if re-parented to us
                except ChildProcessError:
                    pass
            else:
                live.add(pid)
        return live

    # -- the end -------------------------------------------------------------

    def _close(self) -> None:
        """Close the pipes and the selector; stop guarding workers whose groups are gone."""
        for key in list(self.sel.get_map().values()):
            if key.data is not None:
                key.data.close()
                key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()
        for w in self.workers:
            assert w.proc is not None
            if not w.group_alive():
                self.ctx.guardian.forget(w.pid)
        for w in self.workers:
            w.close_dump_pipe()

    def _describe(self, result: AttemptResult) -> AttemptResult:
        """Fill in the workers' exits, with their stack dumps and last output lines."""
        exits = [w.poll() for w in self.workers]
        result.exits = [e for e in exits if e is not None]
        for e, w in zip(exits, self.workers, strict=True):
            if e is not None:
                e.dump = w.read_dump()
        for w in self.workers:
            if w.exit is not None:
                w.exit.last_output = _last_output(w)
        if result.outcome is AttemptOutcome.SUCCESS and any(e.exitcode != 0 for e in result.exits):
            result.outcome = AttemptOutcome.FAILURE
        return result


def _last_output(w: Worker) -> str:
    """A worker's last stderr line, else its last stdout line (for the report)."""
    lines = [p.last_line for p in w.pumps if p.last_line]
    return lines[-1].decode(errors="replace") if lines else ""


def timed_out(e: WorkerExit | None) -> bool:
    """Whether a worker failed waiting for others (a timeout, or a peer's abort)."""
    return e is not None and any(k in e.message for k in ("TimeoutError", "PeerLostError"))


def _hang_suspected(result: AttemptResult, workers: list[Worker]) -> bool:
    """A hang, not a plain error: ``--timeout``, another node's failure, or a timeout."""
    if result.outcome in (AttemptOutcome.TIMEOUT, AttemptOutcome.PEER):
        return True
    return result.outcome is AttemptOutcome.FAILURE and any(timed_out(w.exit) for w in workers)
