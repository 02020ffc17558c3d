"""The optimizer base: parameters and state as mappings of arrays, state shareable.

An optimizer updates a mapping ``name -> array`` in place from a mapping of
gradients. Its state (moments, step counters) is also a mapping of arrays, so
``share_memory()`` can move it into shared memory: pickled into worker
processes (``distrib.multiprocessing``), every worker then updates the same
parameters and the same statistics without locks (Hogwild).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Optimizer"]


class Optimizer:
    """Base class: checks names and shapes, holds per-parameter state arrays."""

    def __init__(self, params: Mapping[str, Any], defaults: dict[str, Any]) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(
                f"{type(self).__name__}: params must be a mapping of name -> array, "
                f"got {type(params).__name__}"
            )
        if not params:
            raise ValueError(f"{type(self).__name__}: params is empty")
        for name, p in params.items():
            if not hasattr(p, "shape") or not hasattr(p, "dtype"):
                raise TypeError(
                    f"{type(self).__name__}: parameter {name!r} is a {type(p).__name__}, "
                    "expected an array"
                )
            if not np.issubdtype(np.dtype(p.dtype), np.floating):
                raise TypeError(
                    f"{type(self).__name__}: parameter {name!r} has dtype {p.dtype}, "
                    "expected a floating dtype"
                )
        self.params: dict[str, Any] = dict(params)
        self.defaults = dict(defaults)
        # name -> {state key -> array}; created lazily by subclasses via _state().
        self.state: dict[str, dict[str, Any]] = {name: {} for name in self.params}
        self._init_state()

    # -- subclass hooks ---------------------------------------------------
    def _init_state(self) -> None:
        """Create every state array up front, so ``share_memory()`` can move them."""

    def _update(self, name: str, param: Any, grad: Any, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- public API -------------------------------------------------------
    def step(self, grads: Mapping[str, Any]) -> None:
        """Apply one update to every parameter that has a gradient in ``grads``.

        Raises:
            KeyError: a gradient names no parameter of this optimizer.
            ValueError: a gradient's shape differs from its parameter's.
        """
        for name, grad in grads.items():
            if grad is None:
                continue
            param = self.params.get(name)
            if param is None:
                raise KeyError(
                    f"{type(self).__name__}.step: gradient for unknown parameter {name!r}; "
                    f"parameters are {sorted(self.params)}"
                )
            if grad.shape != param.shape:
                raise ValueError(
                    f"{type(self).__name__}.step: gradient for {name!r} has shape "
                    f"{tuple(grad.shape)}, parameter has shape {tuple(param.shape)}"
                )
            self._update(name, param, grad, self.state[name])

    def share_memory(self) -> Optimizer:
        """Move the optimizer state into shared memory (parameters are the caller's).

        Returns ``self``, so ``opt = Adam(params).share_memory()`` reads naturally.
        """
        from distrib import shm

        for state in self.state.values():
            for key, arr in state.items():
                state[key] = shm.share(arr)
        return self

    def is_shared(self) -> bool:
        """Whether every state array lives in shared memory."""
        from distrib import shm

        return all(shm.is_shared(a) for st in self.state.values() for a in st.values())

    def state_dict(self) -> dict[str, Any]:
        """A copy of the state and hyper-parameters (``load_state_dict`` restores it)."""
        return {
            "defaults": dict(self.defaults),
            "state": {
                n: {k: np.array(a, copy=True) for k, a in st.items()}
                for n, st in self.state.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Copy a ``state_dict()`` into this optimizer's (possibly shared) state in place."""
        for name, st in state_dict["state"].items():
            if name not in self.state:
                raise KeyError(f"load_state_dict: unknown parameter {name!r}")
            for key, arr in st.items():
                self.state[name][key][...] = arr
        self.defaults.update(state_dict.get("defaults", {}))

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({len(self.params)} params, {hp})"


def check_hyper(
    owner: str,
    name: str,
    value: float,
    *,
    low: float = 0.0,
    high: float | None = None,
    inclusive_low: bool = True,
) -> float:
    """Validate one hyper-parameter against its range, naming it in the error."""
    v = float(value)
    ok_low = v >= low if inclusive_low else v > low
    ok_high = high is None or v < high
    if not (ok_low and ok_high) or v != v:
        rng = f"{'[' if inclusive_low else '('}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected {rng}")
    return v
