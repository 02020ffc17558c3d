"""A rank running a function for ``distrib.ray.run``: the child process of its actor.

``python -m distrib.ray._child PAYLOAD RESULT``: ``PAYLOAD`` holds the actor's
``sys.path`` and the cloudpickled ``(fn, args, kwargs)``; the return value is
pickled to ``RESULT``. Both files are local to the node and private to the
actor. An exception goes to ``DISTRIB_ERROR_FILE`` (the traceback in the
driver's report) and to stderr, as an uncaught exception would.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback

from distrib._config import config
from distrib._record import PHASE_STARTUP, write_error_file
from launcher._bootstrap import set_parent_death_signal


def _fail(exc: BaseException, phase: str, frames: bool = True) -> None:
    if not frames:
        exc = exc.with_traceback(None)
    write_error_file(exc, phase=phase)
    sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    sys.stderr.flush()
    sys.exit(130 if isinstance(exc, KeyboardInterrupt) else 1)


def main(argv: list[str]) -> None:
    set_parent_death_signal(signal.SIGKILL)  # the actor is gone: so is its rank
    parent = config().launcher_pid
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the actor died before we could ask to follow it
    payload, result = argv
    try:
        with open(payload, "rb") as f:
            sys.path[:] = pickle.load(f)
            fn, args, kwargs = pickle.load(f)  # local file written by our actor
    except Exception as exc:  # e.g. the function's module is not importable on this node
        _fail(exc, PHASE_STARTUP, frames=False)
    try:
        value = fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        if tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            exc = exc.with_traceback(tb.tb_next)  # users see their frames only
        _fail(exc, "run")
    tmp = f"{result}.tmp"
    try:
        import cloudpickle

        with open(tmp, "wb") as f:
            cloudpickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        _fail(TypeError(f"the function's return value cannot be pickled: {exc!r}"), "run", False)
    os.replace(tmp, result)
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
