"""Every fault campaign at 10x the CI counts, in one table.

    python benchmarks/fault_campaign.py             # 10x the CI counts
    python benchmarks/fault_campaign.py --scale 1   # the CI counts
    python benchmarks/fault_campaign.py --only collectives

Runs the campaign scripts that exist in this folder: ``campaign_launcher.py``
(processes escaping the launcher; non-finite, negative and absurd flags),
``campaign_collectives.py`` (every mismatch kind on both transports at world 2
and 3; a rank SIGKILLed at a random moment at world 2-4) and
``campaign_store.py`` (malformed, unauthenticated and replayed requests to the
store) when present. A campaign module offers ``campaign(scale) -> list[Row]``
(``benchmarks/_campaign.py``); one without it is run as a script (with
``--scale N`` unless N is 10, its default) and its output is printed after the
table.

Floors: 0 hangs, 0 wrong-data completions (or bad input accepted), 0 innocent
ranks blamed, 0 escaped processes, 0 store deaths, every survivor's error within
2 s of a peer's death. The exit status is 1 when a target is broken.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _campaign import Row, machine_line, print_table  # noqa: E402

CAMPAIGNS = ("launcher", "collectives", "store")
DEAD_PEER_S = 2.0


def _run(name: str, scale: int) -> tuple[list[Row], str]:
    """(rows, extra text) of ``benchmarks/campaign_<name>.py``; nothing if it is absent."""
    path = os.path.join(HERE, f"campaign_{name}.py")
    if not os.path.exists(path):
        return [], f"campaign_{name}.py: not present, skipped"
    module = importlib.import_module(f"campaign_{name}")
    if hasattr(module, "campaign"):
        return list(module.campaign(scale)), ""
    # Its default is taken to be 10x the CI counts (what every campaign script defaults to).
    extra = [] if scale == 10 else ["--scale", str(scale)]
    done = subprocess.run(
        [sys.executable, path, *extra],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    text = f"campaign_{name}.py {' '.join(extra)} (exit {done.returncode}):\n{done.stdout}"
    if done.returncode != 0:
        text += done.stderr[-2000:]
    return [], text


def missed_targets(rows: list[Row]) -> list[str]:
    """The targets ``rows`` break (empty when every one holds)."""
    broken = []
    for r in rows:
        for what, count in (
            ("hangs", r.hangs),
            ("wrong results", r.wrong),
            ("innocent ranks blamed / other errors", r.innocent),
            ("escaped processes", r.escaped),
            ("store deaths", r.store_deaths),
        ):
            if count:
                broken.append(f"{r.what}: {count} {what}")
        if r.what.startswith("kill") and r.slowest_s is not None and r.slowest_s > DEAD_PEER_S:
            broken.append(f"{r.what}: slowest survivor error {r.slowest_s:.2f} s > 2 s")
    return broken


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=10, help="multiple of the CI counts")
    ap.add_argument("--only", choices=CAMPAIGNS, action="append", help="run only these")
    args = ap.parse_args()
    if args.scale < 1:
        ap.error("--scale must be at least 1")
    start = time.monotonic()
    rows: list[Row] = []
    notes = []
    for name in args.only or CAMPAIGNS:
        got, text = _run(name, args.scale)
        rows += got
        if text:
            notes.append(text)
    print(f"{machine_line()}; {time.monotonic() - start:.0f} s")
    only = "".join(f" --only {n}" for n in args.only or ())
    print(f"command: python benchmarks/fault_campaign.py --scale {args.scale}{only}\n")
    print_table(rows)
    for text in notes:
        print("\n" + text)
    broken = missed_targets(rows)
    if broken:
        print("\nFLOORS BROKEN:\n  " + "\n  ".join(broken))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
