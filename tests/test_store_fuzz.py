"""Store fault table: >= 10,000 hostile or malformed messages, the server alive throughout.

Each row of ``tests/_store_faults.FAULTS``/``SPECIAL`` (random bytes, truncated
frames, huge lengths, wrong types, non-finite timeouts, unauthenticated and
replayed requests, a pickle payload, limit abuse) runs against an authenticated
store; after every batch of 250 the serving thread must be alive and a real
client must still set and get. Every bad message gets an error reply or a
closed connection, never an OK and never silence.
"""

from __future__ import annotations

import os

import pytest
from _store_faults import MARKER, ROW_IDS, run_row, total_messages

from distrib.comm import TCPStore
from distrib.store._server import StoreServer

SECRET = b"fuzz-secret"


@pytest.fixture(scope="module")
def master():
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=5, auth_token=SECRET)
    store.set("keep", "safe")
    yield store
    store.close()


@pytest.fixture(scope="module")
def insecure():
    """A store without a secret (``distrib-run --insecure-store``): bad input is still refused."""
    server = StoreServer("127.0.0.1", 0, None)
    server.start()
    client = TCPStore("127.0.0.1", server.port, timeout=5)
    client.set("keep", "safe")
    client.close()
    yield server
    server.close()


def test_table_has_at_least_10000_messages():
    assert total_messages() >= 10_000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("row", ROW_IDS)
def test_fault_row(master, row):
    client = TCPStore("127.0.0.1", master.port, timeout=5, auth_token=SECRET)
    counter = iter(range(10**9))

    def check() -> bool:
        key = f"check/{row}/{next(counter)}"
        client.set(key, b"ok")
        return client.get(key) == b"ok" and client.get("keep") == b"safe"

    tally = run_row(row, master.port, SECRET, check, master.server.alive)
    print(row, tally)
    client.close()
    assert tally.store_deaths == 0 and tally.bad_checks == 0, tally
    assert tally.ok_to_bad == 0, tally.notes[:5]
    assert tally.silent == 0, tally
    answered = tally.error_replies + tally.closed + tally.ok_replies
    assert tally.sent > 0 and answered == tally.sent, tally
    assert not os.path.exists(MARKER), "a pickle payload was unpickled"
    assert not master.check(["failed"]), "an unauthenticated request was served"
    assert master.server.stats["errors"] == 0, master.server.stats


@pytest.mark.timeout(120)
@pytest.mark.parametrize("row", [r for r in ROW_IDS if r not in ("unauthenticated", "replayed")])
def test_fault_row_without_authentication(insecure, row):
    client = TCPStore("127.0.0.1", insecure.port, timeout=5)
    counter = iter(range(10**9))

    def check() -> bool:
        key = f"check/{row}/{next(counter)}"
        client.set(key, b"ok")
        return client.get(key) == b"ok" and client.get("keep") == b"safe"

    tally = run_row(row, insecure.port, b"", check, insecure.alive)
    client.close()
    assert tally.store_deaths == 0 and tally.bad_checks == 0, tally
    assert tally.ok_to_bad == 0 and tally.silent == 0, (tally, tally.notes[:5])
    assert tally.error_replies + tally.closed + tally.ok_replies == tally.sent, tally
    assert insecure.stats["errors"] == 0, insecure.stats
