"""One validator for every numeric setting: flags, ``DISTRIB_*`` variables, ``timeout=``.

A NaN, an infinity, a negative or an absurd value (a timeout above a year, a
restart count above ten thousand) is refused with a message that names the
setting, its value and the accepted range. The launcher and the library share
this module (it imports nothing but the standard library), so a bound is
defined once. ``Bound`` records each setting's range; ``check_number`` applies it.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COUNT",
    "GRACE",
    "INTERVAL",
    "NODES",
    "ONE_YEAR_S",
    "PROCS",
    "TIMEOUT",
    "WAIT",
    "Bound",
    "check_number",
    "check_timeout",
]

ONE_YEAR_S = 365 * 24 * 3600.0  # the longest timeout we believe anyone means


@dataclass(frozen=True)
class Bound:
    """The accepted range of one kind of setting, and the unit its message uses."""

    low: float
    high: float
    low_inclusive: bool = False  # False: the value must be strictly above ``low``
    integer: bool = False
    unit: str = " s"
    why: str = ""  # why the upper bound, for the message
    low_text: str = ""  # how the message states the lower bound, when not plainly

    def describe(self) -> str:
        low = f">= {_fmt(self.low)}" if self.low_inclusive else f"> {_fmt(self.low)}"
        low = self.low_text or low
        high = f"<= {_fmt(self.high)}{self.unit}"
        return f"{low} and {high}" + (f" ({self.why})" if self.why else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# Timeouts (--timeout, --node-timeout, --join-timeout, DISTRIB_TIMEOUT, timeout=): more
# than a year is a typo or an attempt to mean "forever", which would hide a hang.
TIMEOUT = Bound(0.0, ONE_YEAR_S, why="a year; a longer one would hide a hang")
# A wait on something already started (Work.wait): 0 polls, as threading's waits do.
WAIT = Bound(0.0, ONE_YEAR_S, low_inclusive=True, why="a year; a longer one would hide a hang")
# SIGTERM -> SIGKILL delay: a worker that needs more than an hour to stop is hung.
GRACE = Bound(0.0, 3600.0, why="an hour")
# How often the launcher looks around: below 1 ms it spins, above a minute it misses
# other nodes' heartbeats (--node-timeout defaults to 30 s).
INTERVAL = Bound(0.001, 60.0, low_inclusive=True, why="a minute", low_text="> 0 (at least 0.001)")
# Counts such as --max-restarts.
COUNT = Bound(0.0, 10_000.0, low_inclusive=True, integer=True, unit="", why="ten thousand")
# Workers on one node: more than 4096 processes is a fork bomb, not a job.
PROCS = Bound(1.0, 4096.0, low_inclusive=True, integer=True, unit="", why="4096 per node")
# Nodes (launchers) in one job.
NODES = Bound(1.0, 65536.0, low_inclusive=True, integer=True, unit="", why="65536 nodes")


def check_number(value: Any, name: str, bound: Bound, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` (an int for integer bounds, else a float) if ``bound`` admits it.

    Raises ``error`` (``ValueError`` by default) naming ``name`` for NaN, +-inf,
    out-of-range values and non-numbers; ``TypeError`` stays ``TypeError``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value) if not bound.integer else int(value)
        except (TypeError, ValueError):
            kind = "an integer" if bound.integer else "a number of seconds"
            raise error(f"{name} must be {kind}, got {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{name} must be a finite number {bound.describe()}, got {value!r}")
    if bound.integer and not float(value).is_integer():
        raise error(f"{name} must be an integer, got {value!r}")
    too_low = value < bound.low if bound.low_inclusive else value <= bound.low
    if too_low or value > bound.high:
        raise error(f"{name} must be {bound.describe()}, got {_fmt(float(value))}")
    return int(value) if bound.integer else float(value)


def check_timeout(
    timeout: Any, name: str = "timeout", error: type[Exception] = ValueError, bound: Bound = TIMEOUT
) -> float:
    """Seconds from a ``datetime.timedelta`` or a number, checked against ``bound``.

    ``TypeError`` for anything else (a string, ``None``); ``error`` for NaN,
    infinities, zero, negatives and more than a year.
    """
    if isinstance(timeout, datetime.timedelta):
        seconds: Any = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = timeout
    else:
        raise TypeError(f"{name} must be a datetime.timedelta or seconds, got {timeout!r}")
    return float(check_number(seconds, name, bound, error))
