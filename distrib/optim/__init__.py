"""Optimizers over mappings of arrays whose state can live in shared memory (Hogwild).

``opt = Adam(params).share_memory()``: pass ``params`` (shared arrays) and
``opt`` to worker processes; every worker's ``opt.step(grads)`` updates the one
set of parameters and statistics, without locks.
"""

from __future__ import annotations

from ._adam import Adam
from ._base import Optimizer
from ._rmsprop import RMSprop
from ._sgd import SGD

__all__ = ["SGD", "Adam", "Optimizer", "RMSprop"]
