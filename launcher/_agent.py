"""The local agent: start this node's workers, watch them, stop them, restart or report.

Everything happens on the main thread, in one ``select`` loop over the workers'
stdout/stderr pipes and a wakeup pipe that SIGCHLD/SIGINT/SIGTERM/SIGHUP write to
(``signal.set_wakeup_fd``), so a worker's exit or a signal is handled at once
and console lines never interleave. Workers are spawned from the main thread
because ``PR_SET_PDEATHSIG`` fires when the *thread* that forked them ends.

Lifecycle of an attempt: rendezvous -> spawn -> run until all exit 0, a worker
fails, another node fails, a signal arrives or ``--timeout`` passes -> stop the
rest (SIGTERM to each worker's process group, grace period, SIGKILL) -> drain
output -> success, restart, or failure report.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from distrib._errors import DistError

from ._bootstrap_code import BOOTSTRAP_CODE
from ._guardian import Guardian
from ._hang import find_hang
from ._job_store import JobStore
from ._options import STDERR, STDOUT, LaunchOptions
from ._output import StreamPump, write_all
from ._procs import descendants, set_child_subreaper, signal_pids
from ._rendezvous import Round, SingleNodeRendezvous
from ._report import format_report, root_cause
from ._worker import Worker, WorkerExit, signal_name

__all__ = ["Agent"]

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# After the workers are gone, wait this long for EOF on pipes an escaped process holds.
_DRAIN_S = 1.0
# Processes a successful worker leaves behind get this long to exit on their own
# (multiprocessing's resource tracker exits within milliseconds of its parent).
_LINGER_S = 1.0
# How long a hung job's workers get to write their stack dumps before being stopped.
_DUMP_WAIT_S = 3.0


@dataclass
class AttemptResult:
    """How one attempt ended."""

    outcome: str  # "success" | "failure" | "signal" | "timeout" | "peer"
    exits: list[WorkerExit] = field(default_factory=list)
    signum: int = 0
    peer_reason: str = ""


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
        try:
            return self._run_attempts(wake_r)
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

    def _run_attempts(self, wake_fd: int) -> int:
        attempt = 0
        while True:
            if self._pending_signal:
                return 128 + self._pending_signal
            try:
                rnd = self.rdzv.join(attempt)
            except DistError as exc:  # a node missing, unreachable, or with the wrong secret
                self.say(str(exc))
                return 1
            result = self._run_attempt(rnd, wake_fd)
            failed = result.outcome != "success"
            theirs, lost = self.rdzv.finish(
                attempt, result.exits, failed, lambda: bool(self._pending_signal)
            )
            exits = result.exits + theirs
            root = root_cause(exits)
            hang = self._hang(result, exits, root)
            if not failed and lost is None and root is None:
                return 0
            if getattr(self.rdzv, "regrouping", False) and not self._pending_signal:
                self.say("a node joined; re-forming the group (not counted as a restart)")
                continue  # torchrun's membership change: same restart count
            if result.outcome == "signal" or (self._pending_signal and result.outcome != "timeout"):
                signum = result.signum or self._pending_signal
                name = signal_name(signum)
                self._report(exits, attempt, f"distrib-run received {name}; workers stopped")
                return 128 + signum
            if result.outcome == "timeout":
                headline = f"--timeout {self.opts.timeout:g} s passed"
                if hang is not None:
                    headline += f"; hang: {hang.headline()}"
                self._report(exits, attempt, headline, hang)
                return 1
            # c10d rendezvous: losing nodes is survivable while --nnodes MIN remain
            survivable = lost is None or getattr(self.rdzv, "survivable", False)
            retryable = survivable and (root is None or root.phase != "startup")
            if hang is not None:
                headline = f"hang: {hang.headline()}"
            elif root is not None:
                headline = f"rank {root.rank} on host {root.host}: {root.reason()}"
                if root.phase == "startup":
                    headline += " before the script started; not retried"
            else:
                headline = lost or result.peer_reason or "another node failed"
            if lost is not None and root is not None:
                headline += f"; and {lost}"
            if retryable and attempt < self.opts.max_restarts:
                self.say(
                    f"attempt {attempt + 1} failed ({headline}); restarting all workers "
                    f"(restart {attempt + 1} of {self.opts.max_restarts})"
                )
                attempt += 1
                continue
            self._report(exits, attempt, headline, hang)
            return 1

    @staticmethod
    def _hang(result: AttemptResult, exits: list[WorkerExit], root: WorkerExit | None) -> Any:
        """The ranks that never entered a collective, when the job hung (else ``None``).

        Only a hang (``--timeout``, or a first failure that is a timeout or a peer's
        abort: a rank that waited for the laggards) makes the laggards the root
        cause; an exception of the user's stays its own root cause.
        """
        if result.outcome != "timeout" and not _timed_out(root):
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

    def _pump(self, sel: selectors.BaseSelector, wake_fd: int, timeout: float) -> None:
        """Move worker output to the console; wake early on any signal."""
        for key, _ in sel.select(timeout):
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
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                pump.close()

    def _run_attempt(self, rnd: Round, wake_fd: int) -> AttemptResult:
        sel = selectors.DefaultSelector()
        sel.register(wake_fd, selectors.EVENT_READ, None)
        workers = self._spawn(rnd, sel)
        started = time.monotonic()
        result: AttemptResult | None = None
        stop_sent_at: float | None = None
        killed = False
        stray_signalled = False
        linger_until: float | None = None
        try:
            while True:
                now = time.monotonic()
                if result is None:
                    result = self._check(workers, rnd, started, now)
                    if result is not None and _hang_suspected(result, workers):
                        self._collect_dumps(workers, sel, wake_fd)
                    if result is not None and result.outcome != "success":
                        first = result.signum if result.outcome == "signal" else signal.SIGTERM
                        for w in workers:
                            if w.poll() is None:
                                w.stop_requested = True
                            w.signal_group(first)
                        stop_sent_at = now
                if result is not None:
                    alive = [w for w in workers if w.group_alive()]
                    # Descendants outside the workers' groups: setsid children, daemons
                    # (re-parented to us: we are a subreaper).
                    strays = self._strays(workers)
                    if not alive and not strays:
                        break
                    if stop_sent_at is not None and not stray_signalled and strays:
                        signal_pids(strays, signal.SIGTERM)  # they get the workers' signal
                        stray_signalled = True
                    if stop_sent_at is None and linger_until is None:
                        linger_until = now + _LINGER_S
                    if stop_sent_at is None and linger_until is not None and now < linger_until:
                        pass  # helpers such as multiprocessing's resource tracker exit soon
                    elif stop_sent_at is None:  # success, but a worker left processes behind
                        ranks = [w.rank for w in alive]
                        self.say(
                            f"ranks {ranks} exited 0 but left processes; stopping them"
                            if ranks
                            else f"workers exited 0 but left processes {sorted(strays)}; "
                            "stopping them"
                        )
                        for w in alive:
                            w.signal_group(signal.SIGTERM)
                        signal_pids(strays, signal.SIGTERM)
                        stray_signalled = True
                        stop_sent_at = now
                    elif not killed and now - stop_sent_at > self.opts.grace_period:
                        for w in alive:
                            w.signal_group(signal.SIGKILL)
                        signal_pids(strays, signal.SIGKILL)
                        killed = True
                    elif killed and now - stop_sent_at > self.opts.grace_period + 10:
                        self.say(
                            f"processes of ranks {[w.rank for w in alive]} (and "
                            f"{sorted(strays)}) survive SIGKILL"
                        )
                        break
                    elif killed:
                        signal_pids(strays, signal.SIGKILL)  # newcomers forked while dying
                self.rdzv.heartbeat()  # also while stopping or draining, which can take a while
                self._pump(sel, wake_fd, self.opts.monitor_interval)
            self._drain(sel, wake_fd)
        finally:
            for key in list(sel.get_map().values()):
                if key.data is not None:
                    key.data.close()
                    key.fileobj.close()  # type: ignore[union-attr]
            sel.close()
            for w in workers:
                assert self._guardian is not None and w.proc is not None
                if not w.group_alive():
                    self._guardian.forget(w.pid)
            for w in workers:
                w.close_dump_pipe()
        exits = [w.poll() for w in workers]
        result.exits = [e for e in exits if e is not None]
        for e, w in zip(exits, workers, strict=True):
            if e is not None:
                e.dump = w.read_dump()
        for w in workers:
            if w.exit is not None:
                lines = [p.last_line for p in w.pumps if p.last_line]
                w.exit.last_output = lines[-1].decode(errors="replace") if lines else ""
        if result.outcome == "success" and any(e.exitcode != 0 for e in result.exits):
            result.outcome = "failure"
        return result

    def _check(
        self, workers: list[Worker], rnd: Round, started: float, now: float
    ) -> AttemptResult | None:
        """Decide whether the attempt is over (and why); ``None`` while it runs on."""
        if self._pending_signal:
            return AttemptResult("signal", signum=self._pending_signal)
        exits = [w.poll() for w in workers]
        if any(e is not None and e.exitcode != 0 for e in exits):
            return AttemptResult("failure")
        if all(e is not None for e in exits):
            return AttemptResult("success")
        peer = self.rdzv.peer_failures()
        if peer:
            return AttemptResult("peer", peer_reason=peer)
        if self.opts.timeout is not None and now - started > self.opts.timeout:
            return AttemptResult("timeout")
        return None

    def _collect_dumps(
        self, workers: list[Worker], sel: selectors.BaseSelector, wake_fd: int
    ) -> None:
        """Ask every running worker for its stacks; wait (bounded) for the answers."""
        asked = [w for w in workers if w.request_dump()]
        end = time.monotonic() + _DUMP_WAIT_S
        while asked and time.monotonic() < end:
            self._pump(sel, wake_fd, 0.02)
            asked = [w for w in asked if not w.dump_answered()]
        if asked:
            self.say(f"ranks {[w.rank for w in asked]} gave no stack dump within {_DUMP_WAIT_S} s")

    def _strays(self, workers: list[Worker]) -> set[int]:
        """Live descendants of ours other than the worker processes themselves.

        Includes what left the workers' groups or sessions (re-parented to us, a
        child subreaper, when their parent exited). Reaps those that already exited (they were re-parented to us); worker
        processes themselves are left to their ``Popen``.
        """
        assert self._guardian is not None
        me = os.getpid()
        leaders = {w.pid for w in workers}
        tree = descendants(me, exclude=frozenset({self._guardian.pid}))
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

    def _drain(self, sel: selectors.BaseSelector, wake_fd: int) -> None:
        end = time.monotonic() + _DRAIN_S
        while len(sel.get_map()) > 1 and time.monotonic() < end:
            self._pump(sel, wake_fd, 0.05)


def _timed_out(e: WorkerExit | None) -> bool:
    """Whether a worker failed waiting for others (a timeout, or a peer's abort)."""
    return e is not None and any(k in e.message for k in ("TimeoutError", "PeerLostError"))


def _hang_suspected(result: AttemptResult, workers: list[Worker]) -> bool:
    """A hang, not a plain error: ``--timeout``, another node's failure, or a timeout."""
    if result.outcome in ("timeout", "peer"):
        return True
    return result.outcome == "failure" and any(_timed_out(w.exit) for w in workers)


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGCHLD handler: does nothing, but its wakeup byte ends the ``select`` at once.

    (``SIG_IGN`` would not do: ignoring SIGCHLD makes the kernel reap children
    before ``Popen`` can read their exit codes.)
    """
