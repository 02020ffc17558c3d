"""Stack dumps: every thread's Python stack and the flight records, for hang reports.

``distrib-run`` hands each worker the read end of a pipe (``DISTRIB_DUMP_FD``);
a daemon thread started by the worker bootstrap blocks on it, and each byte the
launcher writes makes it write ``dump_path(DISTRIB_ERROR_FILE)``: a small local
JSON document (never sent over a network by the worker) with the stacks of all
threads (``sys._current_frames``) and, when ``distrib.comm`` is in use, its
flight records. The thread runs while the main thread sleeps, waits in a lock
or spins in a collective; only C code that holds the GIL forever silences it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any

__all__ = ["collect", "dump_path", "start_dump_listener", "write_dump"]


def dump_path(error_file: str) -> str:
    """Where the worker with error file ``error_file`` writes its stack dump."""
    base = error_file[:-5] if error_file.endswith(".json") else error_file
    return base + ".stacks.json"


def collect(reason: str) -> dict[str, Any]:
    """This process's threads' stacks and flight records, as a JSON-ready dict."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    threads = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue  # the dump thread itself, or the bootstrap reporting an error
        threads.append(
            {
                "name": names.get(ident, f"thread {ident}"),
                "stack": "".join(traceback.format_stack(frame)),
            }
        )
    threads.sort(key=lambda t: (t["name"] != "MainThread", t["name"]))
    flight = sys.modules.get("distrib.comm._flight")
    groups = flight.snapshot_all() if flight is not None else []
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "reason": reason,
        "threads": threads,
        "groups": groups,
    }


def write_dump(path: str, reason: str) -> None:
    """Write ``collect(reason)`` to ``path`` atomically (errors are only printed)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # the dump and error paths race
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(collect(reason), f)
        os.replace(tmp, path)
    except (OSError, ValueError, TypeError) as err:
        print(f"distrib: could not write stack dump {path}: {err}", file=sys.stderr)


def start_dump_listener(fd: int, path: str) -> None:
    """Dump to ``path`` each time a byte arrives on ``fd``; stop at end of file."""
    os.set_inheritable(fd, False)  # programs the worker execs do not get it

    def listen() -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            write_dump(path, "request")

    threading.Thread(target=listen, name="distrib-stack-dump", daemon=True).start()
