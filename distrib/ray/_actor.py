"""The Ray actor behind one rank: it runs the rank as its child process and watches it.

The rank is a child process, as under ``distrib-run`` (``launcher._worker.Worker``:
its own process group, stdout/stderr pipes, an error file for the traceback), so
the driver learns the exact exit code or signal, every output line, and can stop
the rank and everything it started. The actor itself only relays: ``poll``
returns new output and, at the end, the exit record and the return value.
Calls run on a few threads (``max_concurrency``), so ``stop`` and ``shutdown``
act at once while a ``poll`` is waiting for news.

This class becomes a Ray actor in ``_job`` (``ray.remote(RankHost)``); it is
imported by Ray workers, so it imports Ray only inside methods.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from launcher._procs import group_has_live_member, reap_group, set_child_subreaper
from launcher._worker import Worker

__all__ = ["RankHost"]

_EOF_WAIT_S = 1.0  # after the rank exits, how long its pipes may stay open (grandchildren)
_READ = 65536


class RankHost:
    """Start one rank (a script or a pickled function) and relay its output and exit."""

    def __init__(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="distrib-ray-")
        self._cond = threading.Condition()
        self._chunks: list[tuple[int, bytes]] = []  # (1 stdout | 2 stderr, bytes)
        self._worker: Worker | None = None
        self._readers: list[threading.Thread] = []
        self._exit: dict[str, Any] | None = None
        self._grace = 5.0
        set_child_subreaper()  # orphans of the rank come back to us, to be reaped

    # -- placement -----------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Where this actor runs: Ray node id and address, hostname, pid."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
        }

    def free_port(self, host: str) -> int:
        """A port that is free on this node now (rank 0's store will listen there)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    # -- the rank ------------------------------------------------------------

    def start(self, spec: dict[str, Any]) -> int:
        """Start the rank; ``spec``: rank, local_rank, group_rank, env, grace, and either
        ``payload`` (pickled function call) or ``command`` (bootstrap mode, target, args)."""
        err_file = os.path.join(self._tmp, "error.json")
        env = dict(os.environ)
        env.update(spec["env"])
        env["DISTRIB_ERROR_FILE"] = err_file
        env["DISTRIB_LAUNCHER_PID"] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        try:  # the rank is not a Ray worker; ray.init() in it joins this cluster
            import ray

            env.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        except Exception:
            pass
        self._grace = float(spec["grace"])
        if spec.get("payload") is not None:
            payload = os.path.join(self._tmp, "payload.pkl")
            with open(payload, "wb") as f:
                pickle.dump(list(sys.path), f)  # where the function's modules are found
                f.write(spec["payload"])
            result = os.path.join(self._tmp, "result.pkl")
            argv = [sys.executable, "-m", "distrib.ray._child", payload, result]
        else:
            argv = [sys.executable, "-m", "launcher._bootstrap", *spec["command"]]
        cwd = spec.get("cwd")
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # this process exists only for this rank
        w = Worker(
            spec["rank"],
            spec["local_rank"],
            spec["group_rank"],
            socket.gethostname(),
            argv,
            env,
            err_file,
        )
        w.start()
        self._worker = w
        assert w.proc is not None and w.proc.stdout is not None and w.proc.stderr is not None
        for stream, pipe in ((1, w.proc.stdout), (2, w.proc.stderr)):
            t = threading.Thread(target=self._read, args=(stream, pipe.fileno()), daemon=True)
            t.start()
            self._readers.append(t)
        threading.Thread(target=self._watch, daemon=True).start()
        return w.pid

    def _read(self, stream: int, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, _READ)
            except OSError:
                data = b""
            with self._cond:
                if data:
                    self._chunks.append((stream, data))
                self._cond.notify_all()
            if not data:
                return

    def _watch(self) -> None:
        """Wait for the rank to end, stop what it left behind, then publish its exit."""
        w = self._worker
        assert w is not None and w.proc is not None
        w.proc.wait()
        ended = time.time()
        end = time.monotonic() + _EOF_WAIT_S
        for t in self._readers:
            t.join(max(end - time.monotonic(), 0.0))
        # Processes the rank started and left running are stopped, as distrib-run does.
        pgid = w.proc.pid
        reap_group(pgid)
        if group_has_live_member(pgid):
            w.signal_group(signal.SIGTERM)
            stop_by = time.monotonic() + self._grace
            while group_has_live_member(pgid) and time.monotonic() < stop_by:
                time.sleep(0.05)
                reap_group(pgid)
            w.signal_group(signal.SIGKILL)
            reap_group(pgid)
        ex = w.poll()
        assert ex is not None
        ex.time = min(ex.time, ended)
        doc: dict[str, Any] = {"exit": ex.to_wire(), "has_result": False, "result": None}
        result = os.path.join(self._tmp, "result.pkl")
        if ex.exitcode == 0 and os.path.exists(result):
            try:
                with open(result, "rb") as f:
                    # written by our own child on this machine: a local channel
                    doc["result"] = pickle.load(f)
                doc["has_result"] = True
            except Exception as exc:  # the value cannot be rebuilt here: say so
                doc["exit"]["exitcode"] = 1
                doc["exit"]["message"] = f"its return value could not be unpickled: {exc!r}"
        with self._cond:
            self._exit = doc
            self._cond.notify_all()

    def poll(self, wait_s: float) -> dict[str, Any]:
        """New output since the last call and, once the rank has ended, how it ended.

        Blocks up to ``wait_s`` seconds for something new.
        """
        with self._cond:
            if not self._chunks and self._exit is None:
                self._cond.wait(wait_s)
            chunks, self._chunks = self._chunks, []
            done = self._exit
        out: dict[str, Any] = {"chunks": chunks, "exit": None}
        if done is not None and not chunks:
            out.update(done)
        return out

    def stop(self, sig: int) -> None:
        """Send ``sig`` to the rank's process group (the driver escalates to SIGKILL)."""
        w = self._worker
        if w is None or self._exit is not None:
            return
        w.stop_requested = True
        w.signal_group(sig)

    def shutdown(self) -> None:
        """Kill what is left of the rank and remove this actor's files; then exit."""
        w = self._worker
        if w is not None and w.proc is not None and self._exit is None:
            w.stop_requested = True
            w.signal_group(signal.SIGKILL)
            try:
                w.proc.wait(timeout=5.0)
            except Exception:
                pass
            reap_group(w.proc.pid)
        shutil.rmtree(self._tmp, ignore_errors=True)
