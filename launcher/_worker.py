"""One worker process: how it is started, signalled, and described when it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from distrib._record import read_error_file
from distrib._stacks import dump_path
from distrib.gpu._driver_files import remove_cuda_ipc_files

from ._procs import group_has_live_member, reap_group

__all__ = ["Worker", "WorkerExit", "signal_name"]


def signal_name(signum: int) -> str:
    """``9`` -> ``"SIGKILL"`` (or ``"signal 77"`` for numbers without a name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class WorkerExit:
    """How one worker ended; the unit of the failure report (crosses nodes as msgpack)."""

    rank: int
    local_rank: int
    node_rank: int
    host: str
    pid: int
    exitcode: int  # as Popen reports it: negative = killed by that signal
    time: float  # when the launcher saw the exit (epoch seconds)
    message: str = ""
    traceback: str = ""
    phase: str = "run"  # "startup": could not even start (not retried)
    stopped_by_launcher: bool = False
    last_output: str = ""
    dump: dict[str, Any] | None = None  # its stacks and flight records (distrib._stacks)
    lost: str = ""  # the process could not be watched to its end (its Ray actor or node died)

    @property
    def failed(self) -> bool:
        return (self.exitcode != 0 or bool(self.lost)) and not self.stopped_by_launcher

    def reason(self) -> str:
        """``exit code 3``, ``killed by SIGKILL``, or why the worker was lost."""
        if self.lost:
            return self.lost
        if self.exitcode < 0:
            return f"killed by {signal_name(-self.exitcode)}"
        return f"exit code {self.exitcode}"

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> WorkerExit:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in doc.items() if k in names})


class Worker:
    """A worker process in its own process group (so its children can be stopped with it)."""

    def __init__(
        self,
        rank: int,
        local_rank: int,
        node_rank: int,
        host: str,
        argv: list[str],
        env: dict[str, str],
        error_file: str,
    ) -> None:
        self.rank = rank
        self.local_rank = local_rank
        self.node_rank = node_rank
        self.host = host
        self.argv = argv
        self.env = env
        self.error_file = error_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit: WorkerExit | None = None
        self.stop_requested = False
        self.group_reaped = False
        self.pumps: list[Any] = []  # its StreamPumps (stdout, stderr), for the last output line
        self.dump_file = dump_path(error_file)
        self._dump_w: int | None = None  # a byte written here asks the worker for a dump
        self._asked_at = 0.0

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches the launcher only (it forwards),
        # and killpg(pid) reaches every process the worker started.
        dump_r, self._dump_w = os.pipe()
        os.set_blocking(self._dump_w, False)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env={**self.env, "DISTRIB_DUMP_FD": str(dump_r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(dump_r,),
            )
        finally:
            os.close(dump_r)

    def request_dump(self) -> bool:
        """Ask a running worker for its stacks (``distrib._stacks``); ``False`` if it ended."""
        if self._dump_w is None or self.poll() is not None:
            return False
        self._asked_at = time.time()
        try:
            os.write(self._dump_w, b"d")
        except OSError:
            return False
        return True

    def dump_answered(self) -> bool:
        """Whether the worker wrote a dump since ``request_dump`` (or has ended)."""
        if self.poll() is not None:
            return True
        try:
            return os.stat(self.dump_file).st_mtime >= self._asked_at - 0.01
        except OSError:
            return False

    def read_dump(self) -> dict[str, Any] | None:
        """The worker's last stack dump, or ``None``."""
        try:
            with open(self.dump_file, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def close_dump_pipe(self) -> None:
        if self._dump_w is not None:
            os.close(self._dump_w)
            self._dump_w = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> WorkerExit | None:
        """Return the exit record once the worker process has ended (``None`` while running)."""
        if self.exit is not None or self.proc is None:
            return self.exit
        code = self.proc.poll()
        if code is None:
            return None
        # A worker killed (or leaving through os._exit) after using CUDA IPC leaves
        # the driver's /dev/shm file behind; its exit handler never ran.
        remove_cuda_ipc_files(self.proc.pid)
        self.exit = WorkerExit(
            rank=self.rank,
            local_rank=self.local_rank,
            node_rank=self.node_rank,
            host=self.host,
            pid=self.proc.pid,
            exitcode=code,
            time=time.time(),
        )
        doc = read_error_file(self.error_file) if code != 0 else None
        # Stopped by us: it ended after our signal without raising an exception of its
        # own (a KeyboardInterrupt from a forwarded SIGINT counts as stopped).
        self.exit.stopped_by_launcher = (
            self.stop_requested
            and code != 0
            and (code < 0 or doc is None or doc.get("exc_type") == "KeyboardInterrupt")
        )
        if doc is not None:
            self.exit.message = str(doc.get("message", ""))
            self.exit.traceback = str(doc.get("traceback", ""))
            self.exit.phase = str(doc.get("phase", "run"))
            if doc.get("timestamp"):
                self.exit.time = min(self.exit.time, float(doc["timestamp"]))
        return self.exit

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the worker and every process in its group (ignore if gone)."""
        if self.proc is None or self.group_reaped:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        """Whether any process of the worker's group is still running (zombies reaped)."""
        if self.proc is None or self.group_reaped:
            return False
        if self.proc.poll() is None:
            return True
        reap_group(self.proc.pid)  # orphans re-parented to us (we are a subreaper)
        if group_has_live_member(self.proc.pid):
            return True
        self.group_reaped = True
        return False
