"""One row type and one table for the fault campaigns (benchmarks/campaign_*.py).

A count that does not apply to a campaign is ``None`` (printed as ``-``).
Floors: 0 hangs, 0 wrong results, 0 innocent ranks blamed, 0 escaped processes,
0 store deaths, every survivor's error within 2 s of a peer's death.
"""

from __future__ import annotations

import os
import platform
from typing import NamedTuple

__all__ = ["Row", "machine_line", "print_table"]


class Row(NamedTuple):
    """The counts of one line of a campaign."""

    what: str  # what was tried
    runs: int  # jobs or cases run
    checked: int  # ranks, runs or requests judged
    hangs: int = 0
    wrong: int | None = None  # wrong-data completions, or bad input accepted / not named
    innocent: int | None = None  # innocent ranks blamed, or another error than promised
    escaped: int | None = None  # processes that outlived the launcher
    store_deaths: int | None = None  # store servers that died or stopped answering
    slowest_s: float | None = None  # slowest error (a survivor's, after a peer's death)


_HEAD = (
    "| what was tried | runs | checked | hangs | wrong data / wrong answers | innocent ranks "
    "blamed / other errors | escaped processes | store deaths | slowest error (s) |"
)


def _cell(v: int | float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def machine_line() -> str:
    return (
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )


def print_table(rows: list[Row]) -> None:
    """Print ``rows`` as one markdown table, then the totals against the targets."""
    print(_HEAD)
    print("|" + "---|" * 9)
    for r in rows:
        cells = [r.what, str(r.runs), str(r.checked), str(r.hangs)]
        cells += [_cell(v) for v in (r.wrong, r.innocent, r.escaped, r.store_deaths, r.slowest_s)]
        print("| " + " | ".join(cells) + " |")
    total = {
        "hangs": sum(r.hangs for r in rows),
        "wrong": sum(r.wrong or 0 for r in rows),
        "innocent/other": sum(r.innocent or 0 for r in rows),
        "escaped": sum(r.escaped or 0 for r in rows),
        "store deaths": sum(r.store_deaths or 0 for r in rows),
    }
    slowest = max((r.slowest_s for r in rows if r.slowest_s is not None), default=None)
    print(
        "\ntotals: " + ", ".join(f"{k} {v}" for k, v in total.items())
        + f", slowest error {_cell(slowest)} s"
    )  # fmt: skip
