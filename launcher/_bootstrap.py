"""Worker bootstrap: what ``distrib-run`` actually executes in each worker process.

``python -c BOOTSTRAP_CODE {script|module|exec} TARGET [ARGS...]`` (see
``_bootstrap_code``: the working directory is kept off ``sys.path`` while this
module and distrib load, so a user's ``launcher/`` or ``distrib/`` folder there
cannot shadow them; the target then gets the ``sys.path[0]`` Python would give it).

1. Ask the kernel to send SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``),
   then check the launcher is still our parent (it may have died before the call).
2. Load the target. A target that cannot start (missing file, syntax error,
   unknown module, missing executable) is recorded as a *startup* failure, which
   the launcher does not retry.
3. Run it as ``__main__``, exactly as ``python script.py`` / ``python -m mod``
   would (same ``sys.argv``, ``sys.path[0]``, ``__file__``). An uncaught
   exception is written to ``DISTRIB_ERROR_FILE`` and printed as Python would.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import runpy
import signal
import sys
import traceback
import types
from typing import NoReturn

from distrib._config import config
from distrib._record import PHASE_STARTUP, write_error_file
from distrib._stacks import dump_path, start_dump_listener, write_dump

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _startup_failure(exc: BaseException, code: int, text: str) -> NoReturn:
    # No traceback: it would only show the bootstrap's own frames.
    write_error_file(exc.with_traceback(None), phase=PHASE_STARTUP)
    sys.stderr.write(text)
    sys.stderr.flush()
    sys.exit(code)


def _trim_bootstrap_frames(exc: BaseException) -> BaseException:
    """Drop this module's frames from the traceback so users see only their code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__):
        tb = tb.tb_next
    return exc.with_traceback(tb)


def _run_script(path: str, args: list[str]) -> None:
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        msg = f"{sys.executable}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}\n"
        _startup_failure(exc, 2, msg)
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        _startup_failure(exc, 1, "".join(traceback.format_exception_only(type(exc), exc)))
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # as `python path` does
    # A fresh __main__, as the interpreter makes for `python path`; multiprocessing's
    # spawn start method finds the script again through __main__.__file__.
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    main.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def _run_module(name: str, args: list[str]) -> None:
    sys.path.insert(0, os.getcwd())  # as `python -m name` does
    try:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if spec.submodule_search_locations is not None:  # a package: run its __main__
            spec = importlib.util.find_spec(name + ".__main__")
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name + '.__main__'!r}", name=name)
        if spec.loader is not None and hasattr(spec.loader, "get_code"):
            spec.loader.get_code(spec.name)  # surfaces a SyntaxError as a startup failure
    except (ImportError, SyntaxError, ValueError) as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc))
        _startup_failure(exc, 1, f"{sys.executable}: error while finding module: {text}")
    sys.argv = [spec.origin or name, *args]
    runpy.run_module(name, run_name="__main__", alter_sys=True)


def _exec(program: str, args: list[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(program, [program, *args])  # the parent-death signal survives exec
    except OSError as exc:
        _startup_failure(exc, 127, f"distrib-run: cannot execute {program!r}: {exc.strerror}\n")


def main(argv: list[str]) -> None:
    """Run one worker: ``argv`` is ``[mode, target, *args]``."""
    set_parent_death_signal(signal.SIGTERM)
    launcher_pid = config().launcher_pid
    if launcher_pid is not None and os.getppid() != launcher_pid:
        os._exit(1)  # the launcher died before we could ask to follow it
    if len(argv) < 2 or argv[0] not in ("script", "module", "exec"):
        sys.exit("usage: python -m launcher._bootstrap {script|module|exec} TARGET [ARGS...]")
    mode, target, args = argv[0], argv[1], argv[2:]
    cfg = config()
    dump = dump_path(cfg.error_file) if cfg.error_file else None
    if cfg.dump_fd is not None:
        if mode == "exec" or dump is None:
            os.close(cfg.dump_fd)  # nobody to answer: the launcher sees no dump
        else:
            start_dump_listener(cfg.dump_fd, dump)
    if mode == "exec":
        _exec(target, args)
    try:
        if mode == "script":
            _run_script(target, args)
        else:
            _run_module(target, args)
    except SystemExit:
        raise
    except BaseException as exc:
        exc = _trim_bootstrap_frames(exc)
        write_error_file(exc)
        if dump is not None and "distrib.comm._flight" in sys.modules:
            write_dump(dump, "exception")  # the flight records as they were at the error
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(130 if isinstance(exc, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
