"""Store fault campaign: the CI fault table (tests/_store_faults.py) at 10x its counts.

Every row sends its hostile or malformed messages to a live, authenticated
store (and the rows that do not depend on authentication also to an
unauthenticated one); after every batch of 250 the serving thread must be alive
and a real client must set and get. Prints one table row per fault with its
counts; the target is 0 store deaths, 0 OK replies to bad requests, 0 silent
drops and 0 failed checks. Exit status 1 if any target is missed.

    python benchmarks/campaign_store.py [--scale 10] [--seed 0] [--rows ID,ID]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from _store_faults import MARKER, ROW_IDS, Tally, run_row, total_messages  # noqa: E402

from distrib.comm import TCPStore  # noqa: E402
from distrib.store._server import StoreServer  # noqa: E402

SECRET = b"campaign-secret"
_AUTH_ONLY = ("unauthenticated", "replayed")


def campaign(
    scale: int = 10, seed: int = 0, rows: list[str] | None = None
) -> list[tuple[str, str, Tally]]:
    """Run the table ``scale`` times over; return (store kind, row id, tally) per row."""
    results = []
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=10, auth_token=SECRET)
    insecure = StoreServer("127.0.0.1", 0, None)
    insecure.start()
    try:
        for kind, port, secret, alive in (
            ("authenticated", master.port, SECRET, master.server.alive),  # type: ignore[union-attr]
            ("unauthenticated", insecure.port, b"", insecure.alive),
        ):
            client = TCPStore("127.0.0.1", port, timeout=10, auth_token=secret if secret else None)
            client.set("keep", b"safe")
            counter = iter(range(10**12))

            def check(client: TCPStore = client, counter: Any = counter) -> bool:
                key = f"check/{next(counter)}"
                try:
                    client.set(key, b"ok")
                    return client.get(key) == b"ok" and client.get("keep") == b"safe"
                except Exception:
                    return False

            for row in rows or ROW_IDS:
                if kind == "unauthenticated" and row in _AUTH_ONLY:
                    continue
                tally = run_row(row, port, secret, check, alive, scale=scale, seed=seed)
                results.append((kind, row, tally))
                print(
                    f"  {kind:15s} {row:32s} {tally.sent:7d} in {tally.seconds:6.1f} s", flush=True
                )
            client.close()
    finally:
        for stats in (master.server.stats, insecure.stats):  # type: ignore[union-attr]
            if stats["errors"]:
                print(f"internal errors caught by the serving loop: {stats}")
        master.close()
        insecure.close()
    return results


def parked_flood(n: int = 65536) -> dict[str, float]:
    """Park ``n`` gets (the default ``max_parked``) from raw connections, then time a client."""
    import resource
    import statistics

    from _store_faults import RawClient

    from distrib.store import _wire as wire

    def latency(store: TCPStore) -> float:
        times = []
        for i in range(300):
            t = time.perf_counter()
            store.set(f"lat{i % 8}", b"x" * 100)
            store.get(f"lat{i % 8}")
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=30, auth_token=SECRET)
    client = TCPStore("127.0.0.1", master.port, timeout=30, auth_token=SECRET)
    before = latency(client)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per = master.server.limits.max_parked_per_connection  # type: ignore[union-attr]
    raws = []
    for start in range(0, n, per):
        c = RawClient(master.port)
        c.handshake(SECRET)
        count = min(per, n - start)
        c.send_raw(
            b"".join(c.request_frame("get", [f"never/{start + i}", 600.0]) for i in range(count))
        )
        raws.append(c)
    extra = RawClient(master.port)
    extra.handshake(SECRET)
    deadline = time.monotonic() + 60
    while master.server._map.parked < n and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.05)
    extra.send_raw(extra.request_frame("get", ["one-too-many", 600.0]))
    refused = extra.read()
    during = latency(client)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parked = master.server._map.parked  # type: ignore[union-attr]
    for c in [*raws, extra]:
        c.close()
    client.close()
    master.close()
    return {
        "parked": parked,
        "refused_with_limit": float(refused[1] == wire.Status.LIMIT and "max_parked" in refused[2]),
        "latency_before_us": before,
        "latency_during_us": during,
        "rss_growth_mb": (rss1 - rss0) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the campaign and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=10, help="multiple of the CI counts (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    args = p.parse_args(argv)
    if args.scale < 1:
        p.error("--scale must be >= 1")
    rows = args.rows.split(",") if args.rows else None
    for r in rows or ():
        if r not in ROW_IDS:
            p.error(f"unknown row {r!r}; rows are {', '.join(ROW_IDS)}")
    print(f"store fault campaign: {args.scale}x the CI table ({total_messages(args.scale)} "
          "messages per store kind, before skips)")  # fmt: skip
    t0 = time.monotonic()
    results = campaign(args.scale, args.seed, rows)
    wall = time.monotonic() - t0
    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, "
          f"Python {platform.python_version()}; {wall:.0f} s")  # fmt: skip
    print("| store | fault | sent | error replies | closed | OK (valid) | OK to bad | silent "
          "| store deaths | failed checks |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = Tally()
    for kind, row, t in results:
        print(f"| {kind} | {row} | {t.sent} | {t.error_replies} | {t.closed} | {t.ok_replies} "
              f"| {t.ok_to_bad} | {t.silent} | {t.store_deaths} | {t.bad_checks} |")  # fmt: skip
        for name in ("sent", "error_replies", "closed", "ok_replies", "ok_to_bad", "silent",
                     "store_deaths", "bad_checks"):  # fmt: skip
            setattr(total, name, getattr(total, name) + getattr(t, name))
    t = total
    print(f"| **all** | | **{t.sent}** | {t.error_replies} | {t.closed} | {t.ok_replies} "
          f"| **{t.ok_to_bad}** | **{t.silent}** | **{t.store_deaths}** | **{t.bad_checks}** |")  # fmt: skip
    flood = parked_flood()
    print()
    print("| parked gets | next one | set+get median before | during | memory growth |")
    print("|---:|---|---:|---:|---:|")
    print(f"| {int(flood['parked'])} | "
          f"{'refused (max_parked)' if flood['refused_with_limit'] else 'NOT refused'} | "
          f"{flood['latency_before_us']:.0f} us | {flood['latency_during_us']:.0f} us | "
          f"{flood['rss_growth_mb']:.0f} MB |")  # fmt: skip
    unpickled = os.path.exists(MARKER)
    print(f"pickle payloads unpickled: {int(unpickled)}")
    targets = t.ok_to_bad == t.silent == t.store_deaths == t.bad_checks == 0 and not unpickled
    targets = targets and bool(flood["refused_with_limit"])
    print("targets (0 store deaths, 0 OK to bad, 0 silent, 0 failed checks):",
          "met" if targets else "MISSED")  # fmt: skip
    return 0 if targets else 1


if __name__ == "__main__":
    sys.exit(main())
