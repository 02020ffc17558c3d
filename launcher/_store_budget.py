"""How long one rendezvous store request may wait, stretched while a node joins.

Launchers talk to the rendezvous store with a short per-request timeout, so a
launcher watching its workers notices a silent store quickly (a peer is judged
lost only after ``--node-timeout`` of such misses). While a node joins, that is
too short: the node hosting the store may start later than the others (pods and
``srun`` tasks start in any order), and a loaded host may take seconds to
answer. ``stretched`` gives the requests made inside it a longer budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["REQUEST_S", "stretched"]

REQUEST_S = 2.0  # one store request of a launcher; silence is judged over --node-timeout


@contextmanager
def stretched(store: Any, seconds: float) -> Iterator[None]:
    """Let each request on ``store`` wait up to ``seconds`` (never less than its own
    timeout) inside the block; the store's timeout is restored on leaving it."""
    saved = store.timeout
    store.timeout = max(saved, seconds)
    try:
        yield
    finally:
        store.timeout = saved
