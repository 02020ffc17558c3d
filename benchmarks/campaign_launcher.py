"""The launcher's fault campaign at 10x the CI counts: escapes and bad flags.

    python benchmarks/campaign_launcher.py [--rounds 10]

Escape campaign: a worker starts a ``setsid`` child and a double-forked daemon,
then distrib-run is stopped by SIGTERM, SIGINT, SIGKILL, a worker failure or a
clean exit; counts the processes that survive (target: 0). Flag campaign: every
numeric flag against NaN, infinities, negatives, zero and absurd values; counts
runs that did not exit 2 naming the flag, and runs that hung (target: 0 each).
Prints one table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _campaign import Row, machine_line, print_table  # noqa: E402
from test_launcher_escape import ENDINGS, ESCAPER  # noqa: E402
from test_launcher_faults import BAD_NUMBERS, FLAGS, INT_FLAGS  # noqa: E402

WAYS = ("SIGTERM", "SIGINT", "SIGKILL", "worker_failure", "success")


def _env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIB_")}
    env["LAUNCHER_TEST_MARK"] = marker
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _marked(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if (
                p.status() != psutil.STATUS_ZOMBIE
                and p.environ().get("LAUNCHER_TEST_MARK") == marker
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


def escape_round(how: str) -> tuple[int, bool]:
    """(escaped processes, hung) for one stop of the launcher."""
    marker = uuid.uuid4().hex
    ending = {"worker_failure": "fail", "success": "success"}.get(how, "wait")
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "escape.py"
        script.write_text(textwrap.dedent(ESCAPER.replace("ENDS", ENDINGS[ending])))
        cmd = [sys.executable, "-m", "launcher", "--nproc", "2", "--grace-period", "2", str(script)]
        p = subprocess.Popen(cmd, cwd=d, env=_env(marker), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        end = time.monotonic() + 60
        while not all((Path(d) / f"pids.{r}").exists() for r in (0, 1)):
            if time.monotonic() > end or p.poll() is not None:
                break
            time.sleep(0.02)
        if how.startswith("SIG"):
            p.send_signal(getattr(signal, how))
        hung = False
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            hung = True
            p.kill()
            p.wait()
        end = time.monotonic() + 15
        left = _marked(marker)
        while left and time.monotonic() < end:
            time.sleep(0.1)
            left = _marked(marker)
        for proc in left:
            proc.kill()
        return len(left), hung


def flag_round(flag: str, value: str) -> tuple[bool, bool]:
    """(refused with exit 2 naming the flag, hung)."""
    cmd = [sys.executable, "-m", "launcher", f"{flag}={value}", "x.py"]
    try:
        r = subprocess.run(cmd, env=_env("flags"), capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, True
    return r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, False


def campaign(rounds: int) -> list[Row]:
    """Every CI case ``rounds`` times: one row per way of stopping, one for the flags."""
    rows = []
    for how in WAYS:
        escaped = hung = 0
        for _ in range(rounds):
            e, h = escape_round(how)
            escaped += e
            hung += h
        rows.append(
            Row(f"setsid child + daemon, launcher stopped by {how}", rounds, rounds, hung,
                escaped=escaped)
        )  # fmt: skip
    flag_cases = [(f, v) for f, a in FLAGS.items() for v in [*BAD_NUMBERS.values(), a, "0"]]
    flag_cases += [(f, v) for f, a in INT_FLAGS.items() for v in ("-1", a, "nan")]
    bad = hung = 0
    for _ in range(rounds):
        for flag, value in flag_cases:
            ok, h = flag_round(flag, value)
            bad += not ok
            hung += h
    n = rounds * len(flag_cases)
    rows.append(Row("non-finite / negative / absurd numeric flags", n, n, hung, wrong=bad))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="repeats of each CI case (10x CI)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    rows = campaign(args.rounds)
    print(machine_line())
    print(f"command: python benchmarks/campaign_launcher.py --rounds {args.rounds}\n")
    print_table(rows)


if __name__ == "__main__":
    main()
