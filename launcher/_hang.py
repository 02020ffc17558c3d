"""Why a job hangs: compare the ranks' flight records, name the ranks that never arrived.

Each rank's dump (``distrib._stacks``) lists, per process group, the sequence
number of the last collective it *entered*. In a hang, the ranks with the
lowest number never reached the collective the others wait in: they are the
cause (torch's Flight Recorder analysis does the same). A rank with a dump but
no record of a group it belongs to has entered none of its collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._worker import WorkerExit

__all__ = ["Hang", "find_hang", "hang_lines", "stack_lines"]


@dataclass
class Hang:
    """The collective some ranks never entered, and who they left waiting."""

    group: list[int]  # global ranks of the group
    seq: int  # the collective's sequence number in that group
    call: str  # what it was, as a rank that entered it describes it
    laggards: list[int]  # never entered it: the cause
    waiting: list[int]  # entered it and waited: the victims
    no_dump: list[int] = field(default_factory=list)  # members that gave no dump
    states: dict[int, str] = field(default_factory=dict)  # rank -> one line on its records

    def headline(self) -> str:
        who = _ranks(self.laggards)
        return (
            f"{who} never entered collective #{self.seq} {self.call} of group "
            f"{self.group}; {_ranks(self.waiting)} waited in it"
        )


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _groups(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for g in dump.get("groups") or []:
        if isinstance(g, dict) and isinstance(g.get("key"), str):
            out[g["key"]] = g
    return out


def find_hang(exits: Sequence[WorkerExit]) -> Hang | None:
    """The first group (in creation order) whose members' last entered collectives differ."""
    dumps = {e.rank: e.dump for e in exits if isinstance(e.dump, dict)}
    if not dumps:
        return None
    by_rank = {r: _groups(d) for r, d in dumps.items()}
    known: dict[str, dict[str, Any]] = {}
    for groups in by_rank.values():
        for key, g in groups.items():
            known.setdefault(key, g)
    for key in sorted(known, key=lambda k: (int(k.rsplit("#", 1)[-1]), -len(known[k]["ranks"]))):
        members = [int(r) for r in known[key]["ranks"]]
        last: dict[int, int] = {}
        records: dict[int, dict[str, Any]] = {}
        for r in members:
            if r in by_rank:
                mine = by_rank[r].get(key)
                last[r] = int(mine["last_entered"]) if mine else -1
                if mine:
                    records[r] = mine
        if len(last) < 2 or max(last.values()) == min(last.values()):
            continue
        low = min(last.values())
        seq = low + 1
        call = "?"
        for g in records.values():
            for entry in g.get("entries", []):
                if entry.get("seq") == seq:
                    call = str(entry.get("call", entry.get("op", "?")))
        states = {}
        for r in members:
            if r not in last:
                states[r] = "no dump"
                continue
            rec = records.get(r)
            if rec is None:
                states[r] = "never entered a collective of this group"
                continue
            entry = next((x for x in rec["entries"] if x["seq"] == rec["last_entered"]), None)
            states[r] = (
                f"last entered #{rec['last_entered']}"
                + (f" {entry['call']} ({entry['state']}, {entry['age_s']} s ago)" if entry else "")
                + f", last completed #{rec['last_completed']}"
            )
        return Hang(
            group=members,
            seq=seq,
            call=call,
            laggards=sorted(r for r, v in last.items() if v == low),
            waiting=sorted(r for r, v in last.items() if v > low),
            no_dump=sorted(r for r in members if r not in last),
            states=states,
        )
    return None


def stack_lines(e: WorkerExit, indent: str = "  ") -> list[str]:
    """Every thread's stack from the rank's dump (nothing without one)."""
    if not isinstance(e.dump, dict):
        return []
    when = "at its error" if e.dump.get("reason") == "exception" else "when the launcher asked"
    lines = [f"{indent}stacks of rank {e.rank} (pid {e.pid}, {when}):"]
    for t in e.dump.get("threads") or []:
        lines.append(f"{indent}  thread {t.get('name')}:")
        lines += [f"{indent}    {ln}" for ln in str(t.get("stack", "")).rstrip().splitlines()]
    return lines


def hang_lines(hang: Hang, exits: Sequence[WorkerExit]) -> list[str]:
    """The report's hang analysis: each member's records, then non-culprits' stacks."""
    lines = [f"HANG ANALYSIS: collective #{hang.seq} {hang.call} of group {hang.group}"]
    for r in hang.group:
        role = "NEVER ENTERED" if r in hang.laggards else "waiting" if r in hang.waiting else ""
        lines.append(f"  rank {r}: {hang.states.get(r, '')}" + (f"  <- {role}" if role else ""))
    for e in sorted(exits, key=lambda x: x.rank):
        if e.rank not in hang.laggards:
            lines += stack_lines(e)
    return lines
