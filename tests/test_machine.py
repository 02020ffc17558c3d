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


@pytest.mark.parametrize(
    ("l2", "ranks", "part"),
    [
        (1 << 20, 2, 1 << 20),
        (1 << 20, 16, 256 << 10),
        (2 << 20, 2, 2 << 20),
        (2 << 20, 16, 512 << 10),
    ],
)
def test_pipeline_parts_follow_the_l2(
    monkeypatch: pytest.MonkeyPatch, l2: int, ranks: int, part: int
) -> None:
    from distrib.transport.shm import _rendezvous

    fake = _machine.machine()._replace(l2_bytes=l2)
    monkeypatch.setattr(_rendezvous, "machine", lambda: fake)
    assert _rendezvous.part_bytes_for(ranks) == part


def test_pipeline_parts_are_whole_pages_on_any_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    from distrib.transport.shm import _rendezvous

    fake = _machine.machine()._replace(l2_bytes=1280 << 10)  # 1.25 MiB, as on some Xeons
    monkeypatch.setattr(_rendezvous, "machine", lambda: fake)
    for ranks in range(1, 65):
        part = _rendezvous.part_bytes_for(ranks)
        assert part % 4096 == 0 and (160 << 10) - 4096 < part <= 1280 << 10
