"""Optimizers match reference steps computed by hand; bad input is named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distrib.optim import SGD, Adam, RMSprop

pytestmark = pytest.mark.timeout(30)


def _p(*vals: float) -> dict[str, np.ndarray]:
    return {"w": np.array(vals, dtype=np.float64)}


def test_sgd_plain_step():
    params = _p(1.0, 2.0)
    SGD(params, lr=0.1).step({"w": np.array([0.5, -1.0])})
    np.testing.assert_allclose(params["w"], [0.95, 2.1])


def test_sgd_momentum_two_steps_and_weight_decay():
    params = _p(1.0)
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.5)
    opt.step({"w": np.array([1.0])})
    # g' = 1 + 0.5*1 = 1.5; buf = 1.5; p = 1 - 0.15 = 0.85
    np.testing.assert_allclose(params["w"], [0.85])
    opt.step({"w": np.array([1.0])})
    # g' = 1 + 0.425 = 1.425; buf = 0.9*1.5 + 1.425 = 2.775; p = 0.85 - 0.2775
    np.testing.assert_allclose(params["w"], [0.85 - 0.2775])


def test_sgd_nesterov():
    params = _p(0.0)
    opt = SGD(params, lr=1.0, momentum=0.5, nesterov=True)
    opt.step({"w": np.array([2.0])})  # buf = 2, step = 2 + 0.5*2 = 3
    np.testing.assert_allclose(params["w"], [-3.0])
    opt.step({"w": np.array([2.0])})  # buf = 1 + 2 = 3, step = 2 + 1.5 = 3.5
    np.testing.assert_allclose(params["w"], [-6.5])


def test_adam_two_steps_by_hand():
    params = _p(1.0, -1.0)
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = Adam(params, lr=lr, betas=(b1, b2), eps=eps)
    g1, g2 = np.array([0.5, 2.0]), np.array([-1.0, 1.0])
    opt.step({"w": g1})
    # step 1: m_hat = g, v_hat = g^2 -> update lr * g / (|g| + eps)
    expect = np.array([1.0, -1.0]) - lr * g1 / (np.abs(g1) + eps)
    np.testing.assert_allclose(params["w"], expect, rtol=1e-12)
    opt.step({"w": g2})
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
    expect = expect - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(params["w"], expect, rtol=1e-12)
    assert int(opt.state["w"]["step"][0]) == 2


def test_adamw_decoupled_decay():
    params = _p(2.0)
    Adam(params, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True).step({"w": np.array([3.0])})
    # p = 2 * (1 - 0.05) = 1.9, then - 0.1 * sign(g)
    np.testing.assert_allclose(params["w"], [1.8], rtol=1e-7)


def test_rmsprop_steps_by_hand():
    params = _p(1.0)
    opt = RMSprop(params, lr=0.01, alpha=0.9, eps=0.0)
    opt.step({"w": np.array([2.0])})  # sq = 0.1*4 = 0.4; p -= 0.01 * 2/sqrt(0.4)
    p1 = 1.0 - 0.01 * 2.0 / math.sqrt(0.4)
    np.testing.assert_allclose(params["w"], [p1])
    opt.step({"w": np.array([1.0])})  # sq = 0.36 + 0.1 = 0.46
    np.testing.assert_allclose(params["w"], [p1 - 0.01 / math.sqrt(0.46)])


def test_rmsprop_centered_momentum():
    params = _p(0.0)
    opt = RMSprop(params, lr=0.1, alpha=0.5, eps=0.0, momentum=0.5, centered=True)
    opt.step({"w": np.array([2.0])})
    # sq = 2, ga = 1, avg = sqrt(2 - 1) = 1; buf = 2; p = -0.2
    np.testing.assert_allclose(params["w"], [-0.2])
    opt.step({"w": np.array([4.0])})
    # sq = 1 + 8 = 9, ga = 0.5 + 2 = 2.5, avg = sqrt(9 - 6.25) ; buf = 1 + 4/avg
    avg = math.sqrt(9 - 6.25)
    np.testing.assert_allclose(params["w"], [-0.2 - 0.1 * (1 + 4 / avg)])


def test_float32_params_stay_float32_and_in_place():
    w = np.ones((3, 2), dtype=np.float32)
    params = {"w": w}
    for opt in (SGD(params, lr=0.1, momentum=0.9), Adam(params), RMSprop(params)):
        opt.step({"w": np.full((3, 2), 0.5, dtype=np.float32)})
        assert params["w"] is w and w.dtype == np.float32


def test_missing_grad_skips_parameter():
    params = {"a": np.ones(2), "b": np.ones(2)}
    SGD(params, lr=1.0).step({"a": np.ones(2)})
    np.testing.assert_array_equal(params["b"], np.ones(2))
    np.testing.assert_array_equal(params["a"], np.zeros(2))


def test_bad_input_is_named():
    params = _p(1.0, 2.0)
    opt = Adam(params)
    with pytest.raises(KeyError, match="unknown parameter 'v'"):
        opt.step({"v": np.ones(2)})
    with pytest.raises(ValueError, match=r"'w' has shape \(3,\), parameter has shape \(2,\)"):
        opt.step({"w": np.ones(3)})
    with pytest.raises(ValueError, match="lr=-1"):
        SGD(params, lr=-1)
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        Adam(params, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="mapping"):
        SGD([np.ones(2)])
    with pytest.raises(TypeError, match="'i' has dtype int64"):
        SGD({"i": np.ones(2, dtype=np.int64)})
    with pytest.raises(ValueError, match="nesterov"):
        SGD(params, nesterov=True)


def test_state_dict_roundtrip():
    params = _p(1.0, 2.0)
    opt = Adam(params, lr=0.1)
    opt.step({"w": np.array([1.0, 1.0])})
    sd = opt.state_dict()
    other = Adam(_p(1.0, 2.0), lr=0.1)
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other.state["w"]["exp_avg"], opt.state["w"]["exp_avg"])
    assert int(other.state["w"]["step"][0]) == 1
