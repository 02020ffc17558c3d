"""Adam (and AdamW's decoupled decay), torch's update rule, Hogwild-shareable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._base import Optimizer, check_hyper

__all__ = ["Adam"]


class Adam(Optimizer):
    """Adam with bias correction; ``decoupled_weight_decay=True`` gives AdamW.

    The step counter is a one-element array per parameter, so once shared it is
    one counter for all workers (as in the SharedAdam of torch A3C code); lockless
    increments may lose a count under contention, which only nudges bias correction.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        check_hyper("Adam", "lr", lr)
        check_hyper("Adam", "betas[0]", betas[0], high=1.0)
        check_hyper("Adam", "betas[1]", betas[1], high=1.0)
        check_hyper("Adam", "eps", eps)
        check_hyper("Adam", "weight_decay", weight_decay)
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay,
            ),
        )

    def _init_state(self) -> None:
        for name, p in self.params.items():
            st = self.state[name]
            st["step"] = np.zeros(1, dtype=np.int64)
            st["exp_avg"] = np.zeros_like(p)
            st["exp_avg_sq"] = np.zeros_like(p)

    def _update(self, name: str, param: Any, grad: Any, state: dict[str, Any]) -> None:
        d = self.defaults
        b1, b2 = d["betas"]
        lr, wd = d["lr"], d["weight_decay"]
        if wd != 0:
            if d["decoupled_weight_decay"]:
                param *= 1.0 - lr * wd
            else:
                grad = grad + wd * param
        state["step"][0] += 1
        t = int(state["step"][0])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * grad
        v *= b2
        v += (1.0 - b2) * (grad * grad)
        bias1 = 1.0 - b1**t
        bias2 = 1.0 - b2**t
        denom = np.sqrt(v) / np.sqrt(bias2)
        denom += d["eps"]
        param -= (lr / bias1) * (m / denom)
