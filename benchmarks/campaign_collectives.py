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
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from _trust_cases import MISMATCH_CASES, run_kill, run_mismatches  # noqa: E402

from distrib.comm._local_ranks import run_local_ranks  # noqa: E402

NAMES = [c[0] for c in MISMATCH_CASES]
INVOLVED = {c[0]: c[2] for c in MISMATCH_CASES}


def mismatch_campaign(repeats: int) -> list[list[str]]:
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
                [f"mismatch, {transport}, world {world}", str(repeats), str(tried),
                 str(raised), str(hangs), str(wrong), str(other), "-", f"{worst:.3f}"]
            )  # fmt: skip
    return rows


def kill_campaign(repeats: int) -> list[list[str]]:
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
                [f"kill -9, {transport}, world {world}", str(repeats), str(survivors),
                 str(reported), str(hangs), "0", str(innocent), "-", f"{worst:.3f}"]
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=10, help="multiple of the CI counts")
    args = parser.parse_args()
    if args.scale < 1:
        parser.error("--scale must be at least 1")
    start = time.monotonic()
    rows = mismatch_campaign(args.scale) + kill_campaign(args.scale)
    # Mismatch rows: "raised" = ranks that raised DistMismatchError, "other" = another error.
    # Kill rows: "raised" = survivors that raised, "other" = innocent ranks blamed.
    head = ["campaign", "runs", "ranks", "raised", "hangs", "wrong data", "other/innocent",
            "", "max s"]  # fmt: skip
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or ''} "
          f"python {platform.python_version()}; {time.monotonic() - start:.0f} s")  # fmt: skip
    print("| " + " | ".join(h for h in head if h) + " |")
    print("|" + "---|" * (len(head) - 1))
    for row in rows:
        print("| " + " | ".join(c for i, c in enumerate(row) if head[i]) + " |")


if __name__ == "__main__":
    main()
