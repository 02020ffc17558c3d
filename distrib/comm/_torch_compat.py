"""torch 2.13's newer names for collectives distrib already has, and its default timeout.

torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` and
``reduce_scatter_tensor`` to ``reduce_scatter_single`` (the old names warn
there); both spellings work here, without a warning.
"""

from __future__ import annotations

import datetime
from typing import Any

from .._reduce_op import ReduceOp
from ._api import DEFAULT_TIMEOUT_S
from ._collectives import all_gather_into_tensor, reduce_scatter_tensor

__all__ = ["all_gather_single", "default_pg_timeout", "reduce_scatter_single"]

default_pg_timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)


def all_gather_single(
    output_tensor: Any, input_tensor: Any, group: Any = None, async_op: bool = False
) -> Any:
    """Every rank's ``input_tensor``, concatenated in rank order into ``output_tensor``."""
    return all_gather_into_tensor(output_tensor, input_tensor, group, async_op)


def reduce_scatter_single(
    output: Any, input: Any, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> Any:
    """Reduce ``input`` across ranks; rank i gets block i in ``output``."""
    return reduce_scatter_tensor(output, input, op, group, async_op)
