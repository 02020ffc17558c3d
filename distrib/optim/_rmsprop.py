"""RMSprop, torch's update rule; shared statistics give the A3C paper's shared RMSProp."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._base import Optimizer, check_hyper

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    """``p -= lr * g / (sqrt(E[g^2]) + eps)``, optionally centered and with momentum.

    Same semantics as ``torch.optim.RMSprop``. Shared with ``share_memory()``,
    the running average of squared gradients is one statistic for every worker,
    the variant the A3C paper found most robust.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
    ) -> None:
        check_hyper("RMSprop", "lr", lr)
        check_hyper("RMSprop", "alpha", alpha)
        check_hyper("RMSprop", "eps", eps)
        check_hyper("RMSprop", "weight_decay", weight_decay)
        check_hyper("RMSprop", "momentum", momentum)
        super().__init__(
            params,
            dict(
                lr=lr,
                alpha=alpha,
                eps=eps,
                weight_decay=weight_decay,
                momentum=momentum,
                centered=centered,
            ),
        )

    def _init_state(self) -> None:
        d = self.defaults
        for name, p in self.params.items():
            st = self.state[name]
            st["step"] = np.zeros(1, dtype=np.int64)
            st["square_avg"] = np.zeros_like(p)
            if d["momentum"] > 0:
                st["momentum_buffer"] = np.zeros_like(p)
            if d["centered"]:
                st["grad_avg"] = np.zeros_like(p)

    def _update(self, name: str, param: Any, grad: Any, state: dict[str, Any]) -> None:
        d = self.defaults
        alpha = d["alpha"]
        if d["weight_decay"] != 0:
            grad = grad + d["weight_decay"] * param
        state["step"][0] += 1
        sq = state["square_avg"]
        sq *= alpha
        sq += (1.0 - alpha) * (grad * grad)
        if d["centered"]:
            ga = state["grad_avg"]
            ga *= alpha
            ga += (1.0 - alpha) * grad
            avg = np.sqrt(np.maximum(sq - ga * ga, 0.0))
        else:
            avg = np.sqrt(sq)
        avg += d["eps"]
        if d["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf *= d["momentum"]
            buf += grad / avg
            param -= d["lr"] * buf
        else:
            param -= d["lr"] * (grad / avg)
