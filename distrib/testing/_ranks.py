"""Run a function on N local ranks (child processes) and collect one result per rank.

``run_local_ranks`` starts ``world_size`` processes. By default each joins the
default process group through a store the parent provides and runs
``fn(rank, world_size, *args)``; its return value, or the exception it raised
(with its traceback), comes back as a ``RankResult``. With ``init_group=False``
the ranks join nothing, for code that sets up its own rendezvous, store or
engine (and tests exactly that).

Every rank reports through its own pipe, so a rank killed mid-write cannot
block or corrupt another's report, and a closed pipe tells a rank that died
from one still working. Everything is bounded by ``timeout``: a rank still
running then prints its threads' stacks to its stderr and is killed.
"""

from __future__ import annotations

import contextlib
import enum
import faulthandler
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

__all__ = ["Outcome", "RankResult", "StartMethod", "run_local_ranks"]

StartMethod = Literal["spawn", "fork", "forkserver"]

# A rank that reported stays this long at least to exit by itself (closing its
# group, flushing output) before it is killed; until the deadline if that is later.
_EXIT_GRACE_S = 10.0
# How long a rank still running at the deadline gets to print its stacks.
_DUMP_GRACE_S = 1.0


class Outcome(enum.Enum):
    """How a rank ended, as the parent saw it."""

    RETURNED = "returned"  # fn returned; RankResult.value holds what it returned
    RAISED = "raised"  # fn (or joining the group) raised; see error and trace
    DIED = "died"  # the process ended without a report (a signal, os._exit)
    TIMED_OUT = "timed out"  # no report by the deadline: the process was killed


@dataclass
class RankResult:
    """What one rank did: its return value, or the exception it raised, or how it died.

    ``exitcode`` is the process's exit status (negative: the signal that ended it);
    ``elapsed`` the seconds from the rank's start to its report.
    """

    rank: int
    value: Any = None
    error: BaseException | None = None
    trace: str = ""
    exitcode: int | None = None
    elapsed: float = 0.0
    outcome: Outcome = Outcome.RETURNED

    @property
    def ok(self) -> bool:
        """The rank returned and its process exited cleanly."""
        return self.outcome is Outcome.RETURNED and self.exitcode in (0, None)

    @property
    def reported(self) -> bool:
        """The rank got as far as reporting (a return value or an exception)."""
        return self.outcome in (Outcome.RETURNED, Outcome.RAISED)

    def describe(self) -> str:
        """One line (plus a traceback for an exception) saying what happened."""
        if self.outcome is Outcome.RAISED:
            return f"rank {self.rank} raised {self.error!r}\n{self.trace}"
        if self.outcome is Outcome.TIMED_OUT:
            return f"rank {self.rank} sent no report before the deadline and was killed"
        how = _exit_words(self.exitcode)
        if self.outcome is Outcome.DIED:
            return f"rank {self.rank} {how} without a report"
        return f"rank {self.rank} returned {self.value!r:.200}, then {how}"


def _exit_words(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"died by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"died by signal {-exitcode}"
    return f"exited with code {exitcode}"


@dataclass(frozen=True)
class _Group:
    """Where ranks meet to join the default group: a TCPStore or a FileStore."""

    port: int | None  # the parent's TCPStore on 127.0.0.1
    path: str | None  # else a FileStore at this path
    timeout: float


@dataclass(frozen=True)
class _Report:
    """What a rank sends home; ``payload`` is pickled separately so that a value or
    exception the parent cannot unpickle still leaves the trace readable."""

    outcome: Outcome
    payload: bytes
    trace: str
    error_repr: str
    elapsed: float


def _join_group(group: _Group, rank: int, world_size: int) -> Any:
    from ..comm import _api
    from ..store import TCPStore
    from ..store._file_store import FileStore

    # The store outlives a collective that times out, so the group can say why.
    store_timeout = group.timeout + 30
    if group.port is not None:
        store: Any = TCPStore("127.0.0.1", group.port, timeout=store_timeout)
    else:
        assert group.path is not None
        store = FileStore(group.path, world_size, timeout=store_timeout)
    try:
        _api.init_process_group(
            "auto", store=store, rank=rank, world_size=world_size, timeout=group.timeout
        )
    except BaseException:
        store.close()
        raise
    return store


def _call(
    fn: Callable[..., Any], rank: int, world_size: int, args: tuple[Any, ...], group: _Group | None
) -> Any:
    if group is None:
        return fn(rank, world_size, *args)
    from ..comm import _api

    store = _join_group(group, rank, world_size)
    try:
        return fn(rank, world_size, *args)
    finally:
        try:
            _api.destroy_process_group()
        finally:
            store.close()


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    group: _Group | None,
    env: Mapping[str, str],
    conn: Connection,
) -> None:
    """The child: run the rank, send one ``_Report`` down ``conn``."""
    # Stacks on SIGUSR1: the parent asks for them before it kills a rank at the deadline.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.environ.update(env)  # again: a forkserver child has the server's environment
    start = time.monotonic()
    try:
        value = _call(fn, rank, world_size, args, group)
        outcome, obj, trace, error_repr = Outcome.RETURNED, value, "", ""
    except BaseException as exc:  # everything is reported; the parent decides
        outcome, obj, trace, error_repr = Outcome.RAISED, exc, traceback.format_exc(), repr(exc)
    try:
        payload = pickle.dumps(obj)
    except Exception as exc:
        what = "its return value" if outcome is Outcome.RETURNED else f"its exception {obj!r}"
        outcome, trace = Outcome.RAISED, trace or traceback.format_exc()
        error_repr = f"rank {rank} could not pickle {what}: {exc!r}"
        payload = pickle.dumps(RuntimeError(error_repr))
    report = _Report(outcome, payload, trace, error_repr, time.monotonic() - start)
    conn.send_bytes(pickle.dumps(report))
    conn.close()


def _result(rank: int, data: bytes) -> RankResult:
    report: _Report = pickle.loads(data)
    try:
        obj = pickle.loads(report.payload)
    except Exception as exc:  # e.g. an exception class whose __init__ needs other args
        obj = RuntimeError(f"{report.error_repr or 'the value'} could not be unpickled: {exc!r}")
        if report.outcome is Outcome.RETURNED:
            return RankResult(rank, None, obj, "", None, report.elapsed, Outcome.RAISED)
    if report.outcome is Outcome.RETURNED:
        return RankResult(rank, obj, None, "", None, report.elapsed, Outcome.RETURNED)
    return RankResult(rank, None, obj, report.trace, None, report.elapsed, Outcome.RAISED)


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` set in this process for the duration (a child started meanwhile inherits it)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _envs(
    env: Mapping[str, str] | Sequence[Mapping[str, str]] | None, world_size: int
) -> list[dict[str, str]]:
    if env is None:
        return [{} for _ in range(world_size)]
    if isinstance(env, Mapping):
        return [dict(env) for _ in range(world_size)]
    if len(env) != world_size:
        raise ValueError(f"env: got {len(env)} mappings for {world_size} ranks")
    return [dict(e) for e in env]


def _collect(procs: list[Any], readers: list[Connection], deadline: float) -> dict[int, RankResult]:
    """Read each rank's report until all have reported or died, or the deadline."""
    results: dict[int, RankResult] = {}
    pending = set(range(len(procs)))
    while pending and time.monotonic() < deadline:
        waitables = [readers[r] for r in pending] + [procs[r].sentinel for r in pending]
        wait(waitables, timeout=min(deadline - time.monotonic(), 1.0))
        for rank in sorted(pending):
            # A report is written before its process exits: one that had exited
            # before the pipe was looked at, with nothing (or half a report) in it,
            # died without reporting.
            alive = procs[rank].is_alive()
            if readers[rank].poll(0):
                try:
                    results[rank] = _result(rank, readers[rank].recv_bytes())
                except (EOFError, OSError):
                    results[rank] = RankResult(rank, outcome=Outcome.DIED)
            elif not alive:
                results[rank] = RankResult(rank, outcome=Outcome.DIED)
            else:
                continue
            pending.discard(rank)
    for rank in pending:
        results[rank] = RankResult(rank, outcome=Outcome.TIMED_OUT)
    return results


def _stop(procs: list[Any], results: dict[int, RankResult], deadline: float) -> None:
    """Let ranks that reported exit by themselves; dump and kill the rest."""
    stuck = [p for r, p in enumerate(procs) if results[r].outcome is Outcome.TIMED_OUT]
    for p in stuck:
        if p.pid is not None and p.is_alive():
            print(f"{p.name} (pid {p.pid}) has not reported: its stacks", file=sys.stderr)
            os.kill(p.pid, signal.SIGUSR1)
    if stuck:
        time.sleep(_DUMP_GRACE_S)
    for p in stuck:
        p.kill()
    grace = max(deadline, time.monotonic() + _EXIT_GRACE_S)
    for p in procs:
        p.join(max(0.0, grace - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def run_local_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    group_timeout: float = 30.0,
    env: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
    start_method: StartMethod = "spawn",
    init_group: bool = True,
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes; one result each.

    Args:
        fn: run on every rank; under ``"spawn"`` and ``"forkserver"`` it and ``args``
            are pickled, so ``fn`` must be importable (a module-level function).
            Its return value is pickled back. A rank may start processes of its
            own; it gets ``SIGUSR1`` (stacks to stderr) if it is still running at
            the deadline.
        timeout: seconds for the whole run. A rank without a report by then prints
            its stacks (``faulthandler``) and is killed: ``Outcome.TIMED_OUT``.
        group_timeout: the process group's collective timeout (``init_group`` only).
        env: environment variables of the ranks, from their start: one mapping
            for all ranks, or one per rank. Per-rank ``DISTRIB_NODE_ID`` values,
            for example, place ranks on simulated hosts (ranks share memory only
            within one), so one machine tests the hierarchical engine.
        start_method: how processes start. ``"fork"`` is fastest and lets ``fn``
            be a closure; under it the ranks meet through a ``FileStore`` in a
            temporary directory, so the parent runs no store thread a fork
            could copy mid-operation. Otherwise the parent hosts a ``TCPStore``.
        init_group: ``True``: each rank joins the default process group
            (backend ``"auto"``) before ``fn`` and leaves it after.
            ``False``: the ranks join nothing and no store is started; for code
            that makes its own rendezvous (its ``init_method``, a torch group, an
            engine on its own store).

    Returns:
        ``RankResult`` of ranks ``0 .. world_size - 1``, in rank order. Every
        process has exited (or been killed) when this returns.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    envs = _envs(env, world_size)
    ctx: Any = mp.get_context(start_method)  # typeshed: BaseContext lacks Process
    tmpdir: str | None = None
    master: Any = None
    group: _Group | None = None
    if init_group and start_method == "fork":
        tmpdir = tempfile.mkdtemp(prefix="distrib-ranks-")
        group = _Group(None, os.path.join(tmpdir, "store"), group_timeout)
    elif init_group:
        from ..store import TCPStore

        master = TCPStore("127.0.0.1", 0, is_master=True, timeout=timeout, wait_for_workers=False)
        group = _Group(master.port, None, group_timeout)
    procs: list[Any] = []
    readers: list[Connection] = []
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, args, group, envs[rank], writer),
                name=f"rank-{rank}",
            )
            procs.append(proc)
            readers.append(reader)
            with _environ(envs[rank]):  # from the interpreter's start (spawn, fork)
                proc.start()
            # Only the child holds the write end now: its exit closes the pipe
            # (and a later fork does not inherit this rank's write end).
            writer.close()
        results = _collect(procs, readers, deadline)
        _stop(procs, results, deadline)
    finally:
        for proc in procs:  # still alive only if this call itself failed
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for reader in readers:
            reader.close()
        if master is not None:
            master.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    for rank, proc in enumerate(procs):
        results[rank].exitcode = proc.exitcode
    return [results[rank] for rank in range(world_size)]
