"""Error files: how a worker's traceback reaches ``distrib-run``'s failure report.

``distrib-run`` gives each worker a path in ``DISTRIB_ERROR_FILE``. The worker
bootstrap (``launcher._bootstrap``) writes any uncaught exception there; the
``record`` decorator does the same for entry points that catch their own
exceptions. The file is a small local JSON document (never sent over a network):
``{"message", "exc_type", "traceback", "timestamp", "pid", "host", "phase"}``.
The first writer wins, so the innermost record of a failure is kept.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from ._config import config

__all__ = ["read_error_file", "record", "write_error_file"]

F = TypeVar("F", bound=Callable[..., Any])

# phase of a failure: "startup" (the script could not even start: missing file,
# syntax error; distrib-run does not retry those) or "run" (the script raised).
PHASE_STARTUP = "startup"
PHASE_RUN = "run"


def write_error_file(
    exc: BaseException, *, path: str | None = None, phase: str = PHASE_RUN
) -> str | None:
    """Write ``exc`` and its traceback to the error file unless one is already there.

    Returns the path written, or ``None`` when no error file is configured or a
    record of this failure already exists (the first writer is closest to the cause).
    """
    if path is None:
        path = config().error_file
    if not path or os.path.exists(path):
        return None
    doc = {
        "message": f"{type(exc).__name__}: {exc}",
        "exc_type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "timestamp": time.time(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "phase": phase,
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, path)  # atomic: the launcher never reads half a file
    except OSError as err:
        print(f"distrib: could not write error file {path}: {err}", file=sys.stderr)
        return None
    return path


def read_error_file(path: str) -> dict[str, Any] | None:
    """Read an error file written by ``write_error_file`` (or torch's ``record``).

    Returns a dict with at least ``message`` and ``traceback``, or ``None`` when
    the file is missing or unreadable.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    inner = doc.get("message")
    if isinstance(inner, dict):  # torch.distributed.elastic's format
        extra = inner.get("extraInfo", {}) or {}
        return {
            "message": str(inner.get("message", "")),
            "traceback": str(extra.get("py_callstack", "")),
            "timestamp": float(extra.get("timestamp", 0) or 0),
            "phase": PHASE_RUN,
        }
    doc.setdefault("traceback", "")
    doc.setdefault("message", "")
    doc.setdefault("phase", PHASE_RUN)
    return doc


def record(fn: F) -> F:
    """Decorate an entry point so an exception it raises reaches distrib-run's report.

    Needed only when the entry point catches its own exceptions before the worker
    bootstrap could see them; otherwise uncaught exceptions are recorded already.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as exc:
            write_error_file(exc)
            raise

    return wrapper  # type: ignore[return-value]
