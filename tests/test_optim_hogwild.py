"""Hogwild: optimizer state in shared memory, updated by several processes without locks."""

from __future__ import annotations

import numpy as np
import pytest

import distrib.multiprocessing as mp
from distrib import shm
from distrib.optim import SGD, Adam, RMSprop

pytestmark = pytest.mark.timeout(60)

STEPS = 50


def _step_one_param(opt, name: str, grad_value: float, steps: int) -> None:
    g = {name: np.full(opt.params[name].shape, grad_value)}
    for _ in range(steps):
        opt.step(g)


def _join_all(procs) -> None:
    for p in procs:
        p.join(timeout=30)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shared_adam_state_is_one_state_for_all_workers(method):
    params = {"a": shm.share(np.ones(3)), "b": shm.share(np.ones(3))}
    opt = Adam(params, lr=0.01).share_memory()
    assert opt.is_shared()
    ctx = mp.get_context(method)
    # Worker 0 trains "a", worker 1 trains "b": disjoint, so the result is exact.
    procs = [
        ctx.Process(target=_step_one_param, args=(opt, name, gv, STEPS))
        for name, gv in (("a", 0.5), ("b", -2.0))
    ]
    for p in procs:
        p.start()
    _join_all(procs)
    ref = {"a": np.ones(3), "b": np.ones(3)}
    ref_opt = Adam(ref, lr=0.01)
    _step_one_param(ref_opt, "a", 0.5, STEPS)
    _step_one_param(ref_opt, "b", -2.0, STEPS)
    for name in ("a", "b"):
        np.testing.assert_allclose(params[name], ref[name], rtol=1e-12)  # parent sees updates
        assert int(opt.state[name]["step"][0]) == STEPS
        np.testing.assert_allclose(
            opt.state[name]["exp_avg_sq"], ref_opt.state[name]["exp_avg_sq"], rtol=1e-12
        )


def test_contended_updates_land_in_shared_parameters():
    params = {"w": shm.share(np.zeros(1000))}
    opt = SGD(params, lr=1.0).share_memory()  # no state; params are the shared part
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_step_one_param, args=(opt, "w", 1.0, STEPS)) for _ in range(2)]
    for p in procs:
        p.start()
    _join_all(procs)
    # Lock-free: a racing read-modify-write may lose an update, never invent one.
    assert np.all(params["w"] >= -2 * STEPS) and np.all(params["w"] < 0)
    assert float(params["w"].mean()) < -STEPS  # both workers' updates arrived


def test_shared_rmsprop_statistics_accumulate_across_processes():
    params = {"w": shm.share(np.ones(4))}
    opt = RMSprop(params, lr=0.01, alpha=0.9).share_memory()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_step_one_param, args=(opt, "w", 3.0, 10))
    p.start()
    _join_all([p])
    # square_avg after 10 steps of g=3: 9 * (1 - 0.9**10), written by the child
    np.testing.assert_allclose(opt.state["w"]["square_avg"], 9 * (1 - 0.9**10), rtol=1e-12)
    assert int(opt.state["w"]["step"][0]) == 10


def test_private_state_is_not_shared():
    opt = Adam({"w": np.ones(2)})
    assert not opt.is_shared()
    assert opt.share_memory() is opt and opt.is_shared()
    assert shm.is_shared(opt.state["w"]["exp_avg"])
