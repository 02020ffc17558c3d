"""Turn a worker's stdout/stderr pipe into rank-prefixed console lines and log files.

The launcher reads every pipe from one thread, so a line is always written to the
console by a single ``write`` call: lines of different ranks never interleave
inside a line. Partial lines wait for their newline (or EOF, or a size cap).
"""

from __future__ import annotations

import os
import select
from typing import BinaryIO

__all__ = ["StreamPump", "write_all"]

# A worker printing without newlines must not grow our buffer forever; 64 KiB is far
# longer than any log line and still small.
_MAX_PARTIAL = 64 * 1024


def write_all(stream: BinaryIO, data: bytes) -> None:
    """Write every byte of ``data`` to ``stream``, then flush.

    An unbuffered stream (``PYTHONUNBUFFERED=1`` makes ``sys.stdout.buffer`` a raw
    ``FileIO``) performs one ``write(2)``, which a signal such as SIGCHLD can cut
    short after part of a large block went out; a non-blocking one may take
    nothing. Plain ``stream.write`` would silently drop the rest.
    """
    view = memoryview(data)
    while view:
        try:
            n = stream.write(view)
        except BlockingIOError as exc:
            n = exc.characters_written
        if not n:
            select.select([], [stream], [], 1.0)  # full pipe: wait until writable
            continue
        view = view[n:]
    stream.flush()


class StreamPump:
    """Split one worker stream into lines; prefix and copy them to console and/or file."""

    def __init__(
        self,
        prefix: bytes,
        console: BinaryIO | None,
        log_path: str | None,
    ) -> None:
        self.prefix = prefix
        self.console = console
        self.log_file: BinaryIO | None = None
        if log_path is not None:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._partial = b""
        self.last_line = b""  # for the failure report's "last output" hint

    def feed(self, data: bytes) -> None:
        """Accept bytes read from the pipe; emit every complete line.

        A carriage return also ends a line (progress bars redraw with ``\r``), so
        those updates show live, each with its prefix; a ``\r`` that ends the data
        waits, since a ``\n`` may follow it in the next read.
        """
        data = self._partial + data
        cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
        if cut == 0 and len(data) < _MAX_PARTIAL:
            self._partial = data
            return
        if cut == 0:
            cut = len(data)
            data += b"\n"
            complete = data
            self._partial = b""
        else:
            complete, self._partial = data[:cut], data[cut:]
        self._emit(complete)

    def close(self) -> None:
        """Flush a trailing partial line (EOF) and close the log file."""
        if self._partial:
            self._emit(self._partial + b"\n")
            self._partial = b""
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def _emit(self, block: bytes) -> None:
        lines = block.splitlines(keepends=True)
        shown = [ln for ln in lines if ln.strip(b"\r\n")]
        if shown:
            self.last_line = shown[-1].rstrip(b"\r\n")
        if self.log_file is not None:
            self.log_file.write(block)
            self.log_file.flush()
        if self.console is not None:
            # a bare "\r" (a progress bar starting its redraw) needs no prefix of its own
            text = (
                b"".join(line if line == b"\r" else self.prefix + line for line in lines)
                if self.prefix
                else block
            )
            try:
                write_all(self.console, text)  # one block per read: whole lines only
            except (BrokenPipeError, ValueError):
                self.console = None  # console went away (`| head`): keep the log file
