"""distrib against torch.distributed 2.13's own API: every public collective and group name
is in distrib with torch's parameters, or on the documented list of omissions (with why).

The two lists live in docs/collectives.md ("names not in distrib, on purpose" and
"Parameters that differ from torch's"); this test reads them from there, so the docs
and the check cannot drift apart. A torch name that is neither implemented nor listed
fails the test.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings

import pytest

torch = pytest.importorskip("torch")  # CI installs torch 2.13.0 CPU: this runs there
import torch.distributed as tdist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402

import distrib  # noqa: E402

DOC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "collectives.md"
)


def _section(title: str) -> list[list[str]]:
    """The rows of the markdown table under the heading ``title`` (cells as text)."""
    with open(DOC) as f:
        text = f.read()
    start = text.index(title)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]  # without the header


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


OMITTED = {
    _ticked(row[0])[0]: row[1]
    for row in _section("#### torch.distributed names not in distrib, on purpose")
}
PARAM_ROWS = [
    (_ticked(row[0]), _ticked(row[1]), row[2])
    for row in _section("#### Parameters that differ from torch's")
]
PARAM_DIFFS = {(fn, p): why for fns, params, why in PARAM_ROWS for fn in fns for p in params}
TORCH_NAMES = sorted(set(c10d.__all__) | {"is_available"})


def _torch_obj(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduce_op warns on access
        return getattr(tdist, name)


def test_the_lists_are_documented_and_current():
    assert len(OMITTED) > 10 and len(PARAM_DIFFS) > 10
    for name, why in OMITTED.items():
        assert name in TORCH_NAMES, f"{name} is listed as omitted but torch has no such name"
        assert why and why != "-", f"{name}: no reason given"
        assert not hasattr(distrib, name), f"{name} is implemented: take it off the list"
    for fns, params, why in PARAM_ROWS:
        assert why, (fns, params)
        for fn in fns:
            theirs = inspect.signature(_torch_obj(fn)).parameters
            assert any(p in theirs for p in params), f"torch's {fn} has none of {params}"
        for p in params:
            assert any(p in inspect.signature(_torch_obj(fn)).parameters for fn in fns), p


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_torch_name(name):
    if name in OMITTED:
        return  # checked above: documented, with a reason, and really absent
    assert name in distrib.__all__, f"torch.distributed.{name} is neither in distrib nor listed"
    theirs, ours = _torch_obj(name), getattr(distrib, name)
    if inspect.isclass(theirs):
        assert inspect.isclass(ours), f"{name}: torch's is a class, ours is {type(ours)}"
        if name == "P2POp":
            theirs, ours = theirs.__init__, ours.__init__
        else:
            return
    elif not callable(theirs):
        return  # a constant (default_pg_timeout): present is what counts
    t_params = inspect.signature(theirs).parameters
    o_params = inspect.signature(ours).parameters
    checked = [p for p in t_params if (name, p) not in PARAM_DIFFS]
    missing = [p for p in checked if p not in o_params]
    assert not missing, f"{name}: torch's parameters {missing} are missing here"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    t_order = [p for p in checked if t_params[p].kind in positional]
    o_order = [p for p in o_params if p in t_order]
    assert o_order == t_order, f"{name}: parameter order {o_order}, torch's is {t_order}"
    for p in checked:
        if t_params[p].default is not inspect.Parameter.empty:
            assert o_params[p].default is not inspect.Parameter.empty, (
                f"{name}: {p} has a default in torch ({t_params[p].default!r}) but not here"
            )
    extra_required = [
        p
        for p, param in o_params.items()
        if p not in t_params
        and param.default is inspect.Parameter.empty
        and param.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    assert not extra_required, f"{name}: requires {extra_required}, which torch does not have"
