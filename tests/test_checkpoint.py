"""distrib.checkpoint: atomic save/load of arrays + msgpack metadata; corruption is a named error."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import distrib
from distrib.checkpoint import Checkpoint, CheckpointError, load, save


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((5, 3)).astype(np.float32),
        "b": np.arange(3, dtype=np.int64),
        "empty": np.zeros((0, 4)),
        "flag": np.array(True),
        "rec": np.zeros(2, dtype=[("x", "<f8"), ("n", "<i4")]),
        "strided": np.arange(20.0)[::2],
    }


def test_round_trip(tmp_path):
    path = tmp_path / "ckpt.bin"
    meta = {"step": 7, "lr": 0.1, "name": "run", "hist": [1, 2.5], "raw": b"\x00\x01"}
    assert save(path, _arrays(), meta) is True
    ck = load(path)
    assert isinstance(ck, Checkpoint) and ck.metadata == meta
    expected = _arrays()
    assert ck.arrays.keys() == expected.keys()
    for k, v in expected.items():
        assert ck.arrays[k].dtype == v.dtype and ck.arrays[k].shape == v.shape
        np.testing.assert_array_equal(ck.arrays[k], v)
    ck.arrays["w"][0, 0] = 1.0  # loaded arrays are writable copies


def test_reachable_from_the_package():
    assert distrib.checkpoint.save is save


def test_overwrite_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.bin"
    save(path, {"a": np.zeros(3)}, {"step": 1})
    save(path, {"a": np.ones(3)}, {"step": 2})
    assert load(path).metadata == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.bin"
    save(path, {"a": np.zeros(3)}, {"step": 1})

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(CheckpointError, match=r"ckpt\.bin.*No space left"):
        save(path, {"a": np.ones(3)}, {"step": 2})
    monkeypatch.undo()
    assert load(path).metadata == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.bin"]


def test_only_rank_zero_writes(tmp_path):
    path = tmp_path / "ckpt.bin"
    assert save(path, {"a": np.zeros(1)}, rank=1) is False
    assert not path.exists()


@pytest.mark.parametrize("cut", [0, 5, 20, -1, -9])
def test_truncated_file_is_a_named_error(tmp_path, cut):
    path = tmp_path / "ckpt.bin"
    save(path, _arrays(), {"step": 3})
    blob = path.read_bytes()
    path.write_bytes(blob[:cut])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load(path)


def test_flipped_byte_is_a_named_error(tmp_path):
    path = tmp_path / "ckpt.bin"
    save(path, _arrays(), {"step": 3})
    blob = bytearray(path.read_bytes())
    for pos in (30, len(blob) - 3):  # in the header, in the array data
        bad = bytearray(blob)
        bad[pos] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match=r"ckpt\.bin.*corrupt"):
            load(path)


def test_other_file_and_missing_file(tmp_path):
    other = tmp_path / "model.pkl"
    other.write_bytes(b"\x80\x04\x95" + b"x" * 40)  # a pickle is refused, never loaded
    with pytest.raises(CheckpointError, match="not a distrib checkpoint"):
        load(other)
    with pytest.raises(CheckpointError, match=r"missing\.bin.*cannot be read"):
        load(tmp_path / "missing.bin")


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="dtype object"):
        save(tmp_path / "x", {"o": np.array([object()])})
    with pytest.raises(ValueError, match="msgpack"):
        save(tmp_path / "x", {}, {"f": object()})
    with pytest.raises(TypeError, match="names must be strings"):
        save(tmp_path / "x", {1: np.zeros(1)})
    with pytest.raises(TypeError, match="dict of name"):
        save(tmp_path / "x", [np.zeros(1)])
    assert not (tmp_path / "x").exists()
