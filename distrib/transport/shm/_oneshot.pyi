"""Types of the compiled small all-reduce (``_oneshot.c``)."""

from typing import Any

NOT_HANDLED: int
DONE: int
WAIT_FREE: int
WAIT_INPUTS: int
DIFFER: int
ABORTED: int
CLOSED: int

class OneShot:
    def __init__(
        self,
        pipe: Any,
        header_addr: int,
        halves0: tuple[int, ...],
        halves1: tuple[int, ...],
        rank: int,
        max_bytes: int,
        spin: int,
        yields: int,
    ) -> None: ...
    def step(self, stage: int, array: Any, op: int, digest: int, verify: bool) -> int: ...
    def close(self) -> None: ...
    @property
    def blocked(self) -> int: ...
