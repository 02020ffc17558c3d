"""Suite-wide hygiene (tests/_hygiene.py): after each test no child process is left,
after the whole run nothing is left of the shared memory and processes the suite made,
and nothing it did not make is judged or deleted.

Each test also gets a faulthandler dump on a hang (pytest-timeout).
"""

from __future__ import annotations

from _hygiene import (  # noqa: F401 - pytest finds hooks and fixtures by name here
    _no_stray_children,
    long_lived_pids,
    pytest_configure,
    pytest_sessionfinish,
)
