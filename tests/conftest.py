"""Suite-wide hygiene (tests/_hygiene.py): after each test no child process is left,
after the whole run nothing is left of the shared memory and processes the suite made,
and nothing it did not make is judged or deleted.

Each test also gets a faulthandler dump on a hang (pytest-timeout), and every Ray
instance a test starts stays on loopback (below).
"""

from __future__ import annotations

import os

# Every Ray instance the tests start stays on loopback: without this Ray resolves
# 127.0.0.1 to the machine's own address. Ray reads it when first imported, so it
# is set here, before any test module (or a helper it imports) can import Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _hygiene import (  # noqa: F401 - pytest finds hooks and fixtures by name here
    _no_stray_children,
    long_lived_pids,
    pytest_configure,
    pytest_sessionfinish,
)
