"""distrib._machine: cache sizes from sysfs, with defaults when they cannot be read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distrib import _machine


def _fake_cache(root: Path, entries: list[tuple[int, str, str]]) -> None:
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")


def test_reads_l2_and_last_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cache(
        tmp_path,
        [
            (1, "Data", "48K"),
            (1, "Instruction", "32K"),
            (2, "Unified", "2048K"),
            (3, "Unified", "480M"),
        ],
    )
    monkeypatch.setattr(_machine, "_CACHE_DIR", str(tmp_path))
    assert _machine._caches() == (2 << 20, 480 << 20, True)


def test_no_l3_means_l2_is_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cache(tmp_path, [(1, "Data", "32K"), (2, "Unified", "4096K")])
    monkeypatch.setattr(_machine, "_CACHE_DIR", str(tmp_path))
    assert _machine._caches() == (4 << 20, 4 << 20, True)


@pytest.mark.parametrize("content", [None, "garbage"])
def test_unreadable_caches_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None
) -> None:
    if content is not None:
        _fake_cache(tmp_path, [(2, "Unified", content)])
    monkeypatch.setattr(_machine, "_CACHE_DIR", str(tmp_path / ("" if content else "missing")))
    assert _machine._caches() == (_machine._DEFAULT_L2, _machine._DEFAULT_LLC, False)


def test_this_machine() -> None:
    m = _machine.machine()
    assert m.usable_cores == len(os.sched_getaffinity(0))
    assert m.llc_bytes >= m.l2_bytes > 0
    assert m.memory_bytes > 0
    assert m.ranks_per_core(2 * m.usable_cores) == 2.0
