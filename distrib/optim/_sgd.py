"""Stochastic gradient descent with momentum, torch's update rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._base import Optimizer, check_hyper

__all__ = ["SGD"]


class SGD(Optimizer):
    """``p -= lr * g`` with optional momentum, dampening, Nesterov and weight decay.

    Same semantics as ``torch.optim.SGD``: the first step initialises the
    momentum buffer to the gradient (no dampening on that step).
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        check_hyper("SGD", "lr", lr)
        check_hyper("SGD", "momentum", momentum)
        check_hyper("SGD", "weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov=True needs momentum > 0 and dampening == 0")
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
            ),
        )

    def _init_state(self) -> None:
        if self.defaults["momentum"] != 0:
            for name, p in self.params.items():
                self.state[name]["momentum_buffer"] = np.zeros_like(p)
                # 0 until the first step: then the buffer starts as the gradient.
                self.state[name]["step"] = np.zeros(1, dtype=np.int64)

    def _update(self, name: str, param: Any, grad: Any, state: dict[str, Any]) -> None:
        d = self.defaults
        if d["weight_decay"] != 0:
            grad = grad + d["weight_decay"] * param
        if d["momentum"] != 0:
            buf = state["momentum_buffer"]
            if state["step"][0] == 0:
                buf[...] = grad
            else:
                buf *= d["momentum"]
                buf += (1.0 - d["dampening"]) * grad
            state["step"][0] += 1
            grad = grad + d["momentum"] * buf if d["nesterov"] else buf
        param -= d["lr"] * grad
