"""distrib._machine: cache sizes (sysfs, lscpu, sysconf, defaults), memory, cores; the
shared-memory engine's choices that follow them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from distrib import _machine
from distrib._machine import CacheSource

MiB, GiB = 1 << 20, 1 << 30


def _fake_cache(root: Path, entries: list[tuple[int, str, str]]) -> Path:
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_reads_l2_and_last_level_from_sysfs(tmp_path: Path) -> None:
    root = _fake_cache(
        tmp_path,
        [
            (1, "Data", "48K"),
            (1, "Instruction", "32K"),
            (2, "Unified", "2048K"),
            (3, "Unified", "480M"),
        ],
    )
    caches = _machine.read_caches(root)
    assert (caches.l2, caches.llc, caches.llc_level) == (2 * MiB, 480 * MiB, 3)
    assert caches.source is CacheSource.SYSFS


def test_no_l3_means_l2_is_last(tmp_path: Path) -> None:
    caches = _machine.read_caches(
        _fake_cache(tmp_path, [(1, "Data", "32K"), (2, "Unified", "4096K")])
    )
    assert (caches.l2, caches.llc, caches.llc_level) == (4 * MiB, 4 * MiB, 2)


@pytest.mark.parametrize("content", [None, "garbage"])
def test_unreadable_caches_fall_back_to_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None
) -> None:
    if content is not None:
        _fake_cache(tmp_path, [(2, "Unified", content)])
    monkeypatch.setattr(_machine, "_from_lscpu", dict)
    monkeypatch.setattr(_machine, "_from_sysconf", dict)
    caches = _machine.read_caches(tmp_path)
    assert (caches.l2, caches.llc, caches.source) == (
        _machine.DEFAULT_L2,
        _machine.DEFAULT_LLC,
        CacheSource.DEFAULT,
    )


def test_lscpu_is_the_next_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_machine, "_from_lscpu", lambda: {2: 2 * MiB, 3: 64 * MiB})
    caches = _machine.read_caches(tmp_path)  # an empty directory
    assert (caches.l2, caches.llc, caches.source) == (2 * MiB, 64 * MiB, CacheSource.LSCPU)


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="no lscpu")
def test_lscpu_agrees_with_sysfs_when_both_read() -> None:
    sysfs = _machine._from_sysfs(_machine.SYSFS_CACHE)
    lscpu = _machine._from_lscpu()
    if not sysfs or not lscpu:
        pytest.skip("this machine reports its caches through only one of the two")
    assert lscpu == sysfs


def test_parse_bytes() -> None:
    assert _machine._parse_bytes("32768K") == 32 * MiB
    assert _machine._parse_bytes("2M") == 2 * MiB
    assert _machine._parse_bytes("1G") == GiB
    assert _machine._parse_bytes("4096") == 4096
    with pytest.raises(ValueError):
        _machine._parse_bytes("lots")


def test_this_machine() -> None:
    m = _machine.machine()
    assert m.usable_cores == len(os.sched_getaffinity(0))
    assert m.llc_bytes >= m.l2_bytes > 0
    assert m.memory_bytes > 0
    assert m.cpu_model
    assert m.ranks_per_core(2 * m.usable_cores) == 2.0
    assert m.cpu_model in m.describe()


@pytest.mark.parametrize(
    ("l2", "ranks", "part"),
    [
        (1 * MiB, 2, 1 * MiB),
        (1 * MiB, 16, 256 << 10),
        (2 * MiB, 2, 2 * MiB),
        (2 * MiB, 16, 512 << 10),
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
