"""Checkpoints a restarted or resized job resumes from: arrays plus metadata, written atomically.

``save`` writes a dict of numpy arrays and msgpack-able metadata to one file
(temporary file, fsync, rename, fsync of the directory), so a reader sees the
old checkpoint or the new one, never half of one; rank 0 writes, and every
rank can ``load``. The format is a msgpack header plus raw array bytes, each
checked by CRC-32; nothing is pickled. A corrupt or truncated file is a
``CheckpointError`` naming the path.
"""

from __future__ import annotations

from ._checkpoint import Checkpoint, CheckpointError, load, save

__all__ = ["Checkpoint", "CheckpointError", "load", "save"]
