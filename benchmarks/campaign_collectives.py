"""Fault campaign for the collectives: the CI fault tables of
tests/test_collective_trust.py at 10x their counts, with one summary table.

    python benchmarks/campaign_collectives.py            # 10x the CI counts
    python benchmarks/campaign_collectives.py --scale 1  # the CI counts

Mismatch campaign: every mismatch kind (collective kind, size, dtype, reduce op,
root of broadcast/scatter/reduce/gather, broadcast vs reduce, gather vs scatter,
point-to-point dtype and shape) on both transports at world 2 and 3. Kill
campaign: a random rank SIGKILLed at a random moment of a run of all-reduces
(16 KiB - 4 MiB) on both transports at world 2-4, one seed per run.
Floors: 0 hangs, 0 wrong-data completions, 0 innocent ranks blamed, every
survivor's error within 2 s of the kill.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from _campaign import Row, machine_line, print_table  # noqa: E402
from _trust_cases import MISMATCH_CASES, run_kill, run_mismatches  # noqa: E402

from distrib.testing._ranks import run_local_ranks  # noqa: E402

NAMES = [c[0] for c in MISMATCH_CASES]
INVOLVED = {c[0]: c[2] for c in MISMATCH_CASES}


def mismatch_campaign(repeats: int) -> list[Row]:
    rows = []
    for transport in ("shm", "zmq"):
        for world in (2, 3):
            tried = raised = hangs = wrong = other = 0
            worst = 0.0
            for _ in range(repeats):
                results = run_local_ranks(
                    run_mismatches, world, NAMES, timeout=120, group_timeout=15,
                    env={"DISTRIB_TRANSPORT": transport},
                )  # fmt: skip
                for res in results:
                    if not res.ok:
                        hangs += len(NAMES)
                        continue
                    for name in NAMES:
                        cls, _, elapsed, untouched = res.value[name]
                        expect = INVOLVED[name] == "all" or res.rank in (0, 1)
                        tried += expect
                        wrong += not untouched or (expect and cls == "no error")
                        raised += expect and cls == "DistMismatchError"
                        other += expect and cls not in ("DistMismatchError", "no error")
                        hangs += elapsed > 15
                        worst = max(worst, elapsed)
            rows.append(
                Row(f"every mismatch kind, {transport}, world {world}", repeats, tried, hangs,
                    wrong=wrong, innocent=other, slowest_s=worst)
            )  # fmt: skip
    return rows


def kill_campaign(repeats: int) -> list[Row]:
    rows = []
    for transport in ("shm", "zmq"):
        for world in (2, 3, 4):
            survivors = reported = hangs = innocent = 0
            worst = 0.0
            for i in range(repeats):
                seed = 1000 * world + i
                results = run_local_ranks(
                    run_kill, world, seed, timeout=60, group_timeout=30,
                    env={"DISTRIB_TRANSPORT": transport},
                )  # fmt: skip
                victims = {r.value[5] for r in results if r.ok and r.value}
                victim = victims.pop() if len(victims) == 1 else None
                for res in results:
                    if res.rank == victim:
                        continue
                    survivors += 1
                    if not res.ok or res.value[0] == "no error":
                        hangs += 1
                        continue
                    _, message, peer, _, latency, _ = res.value
                    reported += 1
                    innocent += peer != victim or f"rank {victim}" not in message
                    worst = max(worst, latency)
            rows.append(
                Row(f"kill -9 of a rank, {transport}, world {world}", repeats, survivors, hangs,
                    wrong=0, innocent=innocent, slowest_s=worst)
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=10, help="multiple of the CI counts")
    args = parser.parse_args()
    if args.scale < 1:
        parser.error("--scale must be at least 1")
    start = time.monotonic()
    rows = campaign(args.scale)
    print(f"{machine_line()}; {time.monotonic() - start:.0f} s")
    print(f"command: python benchmarks/campaign_collectives.py --scale {args.scale}\n")
    print_table(rows)


def campaign(scale: int) -> list[Row]:
    """Both tables at ``scale`` times the CI counts. Mismatch rows: "checked" = ranks
    expected to raise DistMismatchError, "other errors" = ranks that raised another
    error. Kill rows: "checked" = survivors, "innocent" = survivors blaming another rank."""
    return mismatch_campaign(scale) + kill_campaign(scale)


if __name__ == "__main__":
    main()
