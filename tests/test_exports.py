"""Every public name is exported once and imports cleanly."""

from __future__ import annotations

import importlib

import pytest

import distrib
from distrib import _config
from distrib._errors import DistError, DistTimeoutError

PUBLIC_MODULES = [
    "distrib",
    "distrib.shm",
    "distrib.multiprocessing",
    "distrib.comm",
    "distrib.parallel",
    "distrib.optim",
    "distrib.data",
    "distrib.torch",  # needs torch, which CI installs
    "distrib.checkpoint",
    "launcher",
]


@pytest.mark.parametrize("modname", PUBLIC_MODULES)
def test_all_is_unique_and_resolves(modname):
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            pytest.fail(f"{modname} is missing")
        raise
    names = list(getattr(mod, "__all__", []))
    assert names, f"{modname} declares no __all__"
    assert len(names) == len(set(names)), f"duplicate names in {modname}.__all__"
    for name in names:
        assert getattr(mod, name) is not None, f"{modname}.{name}"


def test_errors_pickle_with_context():
    import pickle

    err = DistTimeoutError("all_reduce timed out", rank=2, op="all_reduce", peer=3)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DistTimeoutError
    assert (back.rank, back.op, back.peer, str(back)) == (
        2,
        "all_reduce",
        3,
        "all_reduce timed out",
    )
    assert isinstance(back, TimeoutError) and isinstance(back, DistError)


def test_config_rejects_unknown_and_bad_values():
    assert _config.config({"DISTRIB_TIMEOUT": "5"}).timeout == 5.0
    with pytest.raises(distrib.DistUsageError, match="DISTRIB_TIMOUT"):
        _config.config({"DISTRIB_TIMOUT": "5"})
    with pytest.raises(distrib.DistUsageError, match="DISTRIB_TRANSPORT"):
        _config.config({"DISTRIB_TRANSPORT": "carrier-pigeon"})
