"""The local agent: start this node's workers, watch them, stop them, restart or report.

Everything happens on the main thread, in one ``select`` loop over the workers'
stdout/stderr pipes and a wakeup pipe that SIGCHLD/SIGINT/SIGTERM/SIGHUP write to
(``signal.set_wakeup_fd``), so a worker's exit or a signal is handled at once
and console lines never interleave. Workers are spawned from the main thread
because ``PR_SET_PDEATHSIG`` fires when the *thread* that forked them ends.

The job is a loop of attempts (``Agent._run_attempts``)::

    join the rendezvous -> run an attempt -> trade exits with the other nodes
        -> decide (``_next_action``) -> FINISH | REGROUP | RESTART | FAIL

One attempt (``launcher._attempt``) spawns the workers and steps through the
phases RUNNING -> (LINGERING) -> STOPPING -> KILLING -> DRAINING -> DONE, ending
early at DRAINING once no process is left; it returns an ``AttemptResult`` whose
``AttemptOutcome`` says why it ended: SUCCESS, FAILURE, SIGNAL, TIMEOUT or PEER.
Then, in this order:

- FINISH (exit 0) when it succeeded, no node was lost and no worker anywhere failed;
- REGROUP when the group ended to take in a node that joined (``--nnodes MIN:MAX``):
  the next attempt keeps the restart count;
- FAIL with exit code 128 + N when the launcher received signal N, and with 1
  when ``--timeout`` passed;
- RESTART when the failure is retryable (no worker failed before the script
  started, and no node was lost unless enough remain) and ``--max-restarts``
  allows another attempt;
- FAIL (exit 1) otherwise. FAIL prints the failure report: the root cause, or
  the ranks a hung job waited for.
"""

from __future__ import annotations

import enum
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, BinaryIO, NamedTuple

from distrib._errors import DistError

from ._attempt import Attempt, AttemptContext, AttemptOutcome, AttemptResult, timed_out
from ._bootstrap_code import BOOTSTRAP_CODE
from ._guardian import Guardian
from ._hang import find_hang
from ._job_store import JobStore
from ._options import STDERR, STDOUT, LaunchOptions
from ._output import StreamPump, write_all
from ._procs import set_child_subreaper
from ._rendezvous import Round, SingleNodeRendezvous
from ._report import format_report, root_cause
from ._worker import Worker, WorkerExit, signal_name

__all__ = ["Action", "Agent", "AttemptOutcome", "AttemptResult"]

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Action(enum.Enum):
    """What the agent does once every node has finished an attempt."""

    FINISH = "finish"  # every worker everywhere exited 0: exit 0
    REGROUP = "regroup"  # a node joined: form the group again, same restart count
    RESTART = "restart"  # a retryable failure, restarts left: run the next attempt
    FAIL = "fail"  # print the failure report and exit non-zero


class _Ending(NamedTuple):
    """An attempt as every node saw it."""

    result: AttemptResult  # this node's
    exits: list[WorkerExit]  # the exits of every node's workers
    lost: str | None  # why a node was lost, if one was
    root: WorkerExit | None  # the first failure (report.root_cause)
    hang: Any  # the ranks that never entered a collective (Agent._hang), else None


class _Decision(NamedTuple):
    """``Agent._next_action``'s answer."""

    action: Action
    exit_code: int = 0  # for FINISH and FAIL
    headline: str = ""  # why the attempt failed (RESTART, FAIL)
    hang: Any = None  # for FAIL's report


class Agent:
    """Run one node's share of a job to completion; ``run()`` returns the exit code."""

    def __init__(
        self,
        options: LaunchOptions,
        rendezvous: Any = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
    ) -> None:
        options.validate()
        self.opts = options
        self.rdzv = rendezvous or SingleNodeRendezvous(
            options.nproc, options.master_addr, options.master_port
        )
        self.stdout = stdout or sys.stdout.buffer
        self.stderr = stderr or sys.stderr.buffer
        self.host = socket.gethostname()
        self._pending_signal = 0
        self._guardian: Guardian | None = None
        self._error_dir = ""
        self._log_dir = options.log_dir
        if self._log_dir is None and (options.redirects or options.tee):
            self._log_dir = tempfile.mkdtemp(prefix="distrib-run-logs-")
            self.say(f"logs of --redirects/--tee go to {self._log_dir}")

    def say(self, message: str) -> None:
        """Print a launcher message on stderr."""
        try:
            write_all(self.stderr, f"distrib-run: {message}\n".encode())
        except (BrokenPipeError, ValueError):
            pass

    # -- the whole job -------------------------------------------------------

    def run(self) -> int:
        """Run attempts until success, a non-retryable failure, or restarts run out."""
        self._error_dir = tempfile.mkdtemp(prefix="distrib-run-err-")
        # fork before any thread exists; it removes the error files if we are killed
        self._guardian = Guardian(self.opts.grace_period, self._error_dir)
        set_child_subreaper()
        try:
            self._job_store = JobStore(self.opts)  # its thread starts after the guardian's fork
        except DistError as exc:  # e.g. --master-addr is not an address of this host
            self.say(str(exc))
            shutil.rmtree(self._error_dir, ignore_errors=True)
            self._guardian.close()
            return 1
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in _FORWARDED}
        old_chld = signal.signal(signal.SIGCHLD, _ignore_signal)
        ctx = AttemptContext(
            self.opts,
            self.rdzv,
            self._guardian,
            wake_r,
            pending_signal=lambda: self._pending_signal,
            say=self.say,
        )
        try:
            return self._run_attempts(ctx)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            signal.signal(signal.SIGCHLD, old_chld)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)
            shutil.rmtree(self._error_dir, ignore_errors=True)
            self.rdzv.close()
            self._job_store.close()
            self._guardian.close()

    def _run_attempts(self, ctx: AttemptContext) -> int:
        attempt = 0  # the restart count: a re-formed group keeps it
        while True:
            if self._pending_signal:
                return 128 + self._pending_signal
            try:
                rnd = self.rdzv.join(attempt)
            except DistError as exc:  # a node missing, unreachable, or with the wrong secret
                self.say(str(exc))
                return 1
            ending = self._finish_attempt(attempt, self._run_attempt(rnd, ctx))
            decision = self._next_action(attempt, ending)
            if decision.action is Action.REGROUP:
                self.say("a node joined; re-forming the group (not counted as a restart)")
                continue  # torchrun's membership change: same restart count
            if decision.action is Action.RESTART:
                self.say(
                    f"attempt {attempt + 1} failed ({decision.headline}); restarting all workers "
                    f"(restart {attempt + 1} of {self.opts.max_restarts})"
                )
                attempt += 1
                continue
            if decision.action is Action.FAIL:
                self._report(ending.exits, attempt, decision.headline, decision.hang)
            return decision.exit_code

    def _run_attempt(self, rnd: Round, ctx: AttemptContext) -> AttemptResult:
        """Spawn this node's workers and watch them until they are all gone."""
        sel = selectors.DefaultSelector()
        sel.register(ctx.wake_fd, selectors.EVENT_READ, None)
        workers = self._spawn(rnd, sel)
        return Attempt(ctx, rnd, sel, workers).run()

    def _finish_attempt(self, attempt: int, result: AttemptResult) -> _Ending:
        """Trade exits with the other nodes; find the root cause and any hang."""
        failed = result.outcome is not AttemptOutcome.SUCCESS
        theirs, lost = self.rdzv.finish(
            attempt, result.exits, failed, lambda: bool(self._pending_signal)
        )
        exits = result.exits + theirs
        root = root_cause(exits)
        return _Ending(result, exits, lost, root, self._hang(result, exits, root))

    def _next_action(self, attempt: int, ending: _Ending) -> _Decision:
        """What to do after an attempt: finish, re-form the group, restart, or fail."""
        result = ending.result
        succeeded = result.outcome is AttemptOutcome.SUCCESS
        if succeeded and ending.lost is None and ending.root is None:
            return _Decision(Action.FINISH)
        if getattr(self.rdzv, "regrouping", False) and not self._pending_signal:
            return _Decision(Action.REGROUP)
        # A signal that arrived while the attempt ended for another reason is the
        # reported cause too, except after --timeout, which stays the cause.
        late_signal = self._pending_signal and result.outcome is not AttemptOutcome.TIMEOUT
        if result.outcome is AttemptOutcome.SIGNAL or late_signal:
            signum = result.signum or self._pending_signal
            headline = f"distrib-run received {signal_name(signum)}; workers stopped"
            return _Decision(Action.FAIL, 128 + signum, headline)
        if result.outcome is AttemptOutcome.TIMEOUT:
            headline = f"--timeout {self.opts.timeout:g} s passed"
            if ending.hang is not None:
                headline += f"; hang: {ending.hang.headline()}"
            return _Decision(Action.FAIL, 1, headline, ending.hang)
        return self._after_failure(attempt, ending)

    def _after_failure(self, attempt: int, ending: _Ending) -> _Decision:
        """A worker failed or a node was lost: restart if allowed, else fail."""
        root = ending.root
        # c10d rendezvous: losing nodes is survivable while --nnodes MIN remain
        survivable = ending.lost is None or getattr(self.rdzv, "survivable", False)
        retryable = survivable and (root is None or root.phase != "startup")
        headline = _failure_headline(ending)
        if retryable and attempt < self.opts.max_restarts:
            return _Decision(Action.RESTART, headline=headline)
        return _Decision(Action.FAIL, 1, headline, ending.hang)

    @staticmethod
    def _hang(result: AttemptResult, exits: list[WorkerExit], root: WorkerExit | None) -> Any:
        """The ranks that never entered a collective, when the job hung (else ``None``).

        Only a hang (``--timeout``, or a first failure that is a timeout or a peer's
        abort: a rank that waited for the laggards) makes the laggards the root
        cause; an exception of the user's stays its own root cause.
        """
        if result.outcome is not AttemptOutcome.TIMEOUT and not timed_out(root):
            return None
        hang = find_hang(exits)
        if hang is None or (root is not None and root.rank in hang.laggards):
            return None
        return hang

    def _report(
        self, exits: list[WorkerExit], attempt: int, headline: str, hang: Any = None
    ) -> None:
        text = format_report(
            exits,
            run_id=self.opts.run_id,
            attempt=attempt,
            max_restarts=self.opts.max_restarts,
            headline=headline,
            hang=hang,
        )
        try:
            write_all(self.stderr, text.encode())
        except (BrokenPipeError, ValueError):
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._pending_signal:
            self._pending_signal = signum

    # -- one attempt ---------------------------------------------------------

    def _worker_env(self, rnd: Round, local_rank: int, error_file: str) -> dict[str, str]:
        opts = self.opts
        rank = rnd.rank_offset + local_rank
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(rnd.world_size),
            LOCAL_WORLD_SIZE=str(opts.nproc),
            GROUP_RANK=str(rnd.node_rank),
            GROUP_WORLD_SIZE=str(rnd.nnodes),
            ROLE_NAME=opts.torchrun.role,
            ROLE_RANK=str(rank),
            ROLE_WORLD_SIZE=str(rnd.world_size),
            MASTER_ADDR=rnd.master_addr,
            MASTER_PORT=str(rnd.master_port),
            DISTRIB_RUN_ID=opts.run_id,
            DISTRIB_RESTART_COUNT=str(rnd.attempt),
            DISTRIB_MAX_RESTARTS=str(opts.max_restarts),
            DISTRIB_ERROR_FILE=error_file,
            DISTRIB_LAUNCHER_PID=str(os.getpid()),
            # torch.distributed.elastic names, so torch scripts (and their @record) work
            TORCHELASTIC_RUN_ID=opts.run_id,
            TORCHELASTIC_RESTART_COUNT=str(rnd.attempt),
            TORCHELASTIC_MAX_RESTARTS=str(opts.max_restarts),
            TORCHELASTIC_ERROR_FILE=error_file,
            PYTHONUNBUFFERED="1",
        )
        env.update(self._job_store.worker_env(rnd.attempt, rnd.membership))
        if opts.auth_token is not None:
            env["DISTRIB_AUTH_TOKEN"] = opts.auth_token
        if opts.torchrun.virtual_local_rank:  # torchrun's: one GPU per worker, as device 0
            env["LOCAL_RANK"] = "0"
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(i) for i in range(opts.nproc)]
            env["CUDA_VISIBLE_DEVICES"] = devices[local_rank % len(devices)].strip()
        if opts.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = "1"
        return env

    def _worker_argv(self) -> list[str]:
        opts = self.opts
        mode = "exec" if opts.no_python else "module" if opts.module else "script"
        python = opts.python or sys.executable
        return [python, "-c", BOOTSTRAP_CODE, mode, opts.target, *opts.args]

    def _spawn(self, rnd: Round, sel: selectors.BaseSelector) -> list[Worker]:
        opts = self.opts
        if rnd.attempt == 0 and opts.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
            self.say(
                "setting OMP_NUM_THREADS=1 for each worker to avoid overloading the machine; "
                "set it yourself to tune"
            )
        argv = self._worker_argv()
        err_dir = os.path.join(self._error_dir, f"attempt_{rnd.attempt}")
        os.makedirs(err_dir, exist_ok=True)
        workers = []
        for local_rank in range(opts.nproc):
            rank = rnd.rank_offset + local_rank
            error_file = os.path.join(err_dir, f"rank_{rank}.json")
            env = self._worker_env(rnd, local_rank, error_file)
            w = Worker(rank, local_rank, rnd.node_rank, self.host, argv, env, error_file)
            w.start()
            assert self._guardian is not None and w.proc is not None
            self._guardian.watch(w.pid)
            workers.append(w)
            for bit, pipe, console in (
                (STDOUT, w.proc.stdout, self.stdout),
                (STDERR, w.proc.stderr, self.stderr),
            ):
                assert pipe is not None
                os.set_blocking(pipe.fileno(), False)
                sel.register(pipe, selectors.EVENT_READ, self._pump_for(rnd, w, bit, console))
        return workers

    def _pump_for(self, rnd: Round, w: Worker, bit: int, console: BinaryIO) -> StreamPump:
        opts = self.opts
        hidden = bool(opts.redirects.get(w.local_rank, 0) & bit) and not (
            opts.tee.get(w.local_rank, 0) & bit
        )
        if opts.local_ranks_filter is not None and w.local_rank not in opts.local_ranks_filter:
            hidden = True
        log_path = None
        if self._log_dir is not None:
            name = "stdout.log" if bit == STDOUT else "stderr.log"
            log_path = os.path.join(
                self._log_dir, opts.run_id, f"attempt_{rnd.attempt}", str(w.rank), name
            )
        prefix = f"[{w.rank}]: ".encode() if opts.prefix_output else b""
        pump = StreamPump(prefix, None if hidden else console, log_path)
        w.pumps.append(pump)
        return pump


def _failure_headline(ending: _Ending) -> str:
    """The report's first line for a failed attempt: the hang, the root cause, or the lost node."""
    root, lost, hang = ending.root, ending.lost, ending.hang
    if hang is not None:
        headline = f"hang: {hang.headline()}"
    elif root is not None:
        headline = f"rank {root.rank} on host {root.host}: {root.reason()}"
        if root.phase == "startup":
            headline += " before the script started; not retried"
    else:
        headline = lost or ending.result.peer_reason or "another node failed"
    if lost is not None and root is not None:
        headline += f"; and {lost}"
    return headline


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGCHLD handler: does nothing, but its wakeup byte ends the ``select`` at once.

    (``SIG_IGN`` would not do: ignoring SIGCHLD makes the kernel reap children
    before ``Popen`` can read their exit codes.)
    """
