"""Reduction operators and their in-place numpy implementations."""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

from ._errors import DistUsageError

__all__ = ["ReduceOp", "apply_inplace", "check_op_dtype"]


class ReduceOp(Enum):
    """Reduction operators, torch's names (``ReduceOp.SUM`` ...)."""

    SUM = "sum"
    AVG = "avg"
    PRODUCT = "product"
    MIN = "min"
    MAX = "max"
    BAND = "band"
    BOR = "bor"
    BXOR = "bxor"

    def __repr__(self) -> str:
        return f"ReduceOp.{self.name}"


# AVG accumulates as SUM; the caller divides once at the end.
_UFUNC = {
    ReduceOp.SUM: np.add,
    ReduceOp.AVG: np.add,
    ReduceOp.PRODUCT: np.multiply,
    ReduceOp.MIN: np.minimum,
    ReduceOp.MAX: np.maximum,
    ReduceOp.BAND: np.bitwise_and,
    ReduceOp.BOR: np.bitwise_or,
    ReduceOp.BXOR: np.bitwise_xor,
}
_BITWISE = (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)


def ufunc(op: ReduceOp) -> Any:
    """The numpy ufunc that combines two partial results for ``op``."""
    return _UFUNC[op]


def apply_inplace(op: ReduceOp, acc: np.ndarray, other: np.ndarray) -> None:
    """``acc = acc (op) other`` without a temporary."""
    _UFUNC[op](acc, other, out=acc)


def check_op_dtype(op: Any, dtype: np.dtype, *, rank: int | None, opname: str) -> ReduceOp:
    """Validate ``op`` for ``dtype``; return it as a ``ReduceOp``.

    Raises:
        DistUsageError: unknown op, a bitwise op on a non-integer dtype, AVG
            on bool, or MIN/MAX on complex numbers (which have no order).
    """
    if not isinstance(op, ReduceOp):
        try:
            op = ReduceOp[str(op).upper().rsplit(".", 1)[-1]]
        except KeyError:
            raise DistUsageError(
                f"{opname}: unknown reduce op {op!r}; expected one of "
                + ", ".join(f"ReduceOp.{o.name}" for o in ReduceOp),
                rank=rank,
                op=opname,
            ) from None
    if op in _BITWISE and not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise DistUsageError(
            f"{opname}: {op!r} needs an integer or bool array, got dtype {dtype}",
            rank=rank,
            op=opname,
        )
    if op is ReduceOp.AVG and dtype == np.bool_:
        raise DistUsageError(
            f"{opname}: {op!r} is undefined for bool arrays (a mean of booleans is not a "
            "bool); reduce an integer or float copy, or use BOR / BAND",
            rank=rank,
            op=opname,
        )
    if op in (ReduceOp.MIN, ReduceOp.MAX) and np.issubdtype(dtype, np.complexfloating):
        raise DistUsageError(
            f"{opname}: {op!r} is undefined for complex dtype {dtype}", rank=rank, op=opname
        )
    return op
