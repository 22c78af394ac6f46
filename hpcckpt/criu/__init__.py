"""Checkpoint engines: the adapters that actually freeze and restore a process tree.

Only :mod:`hpcckpt.criu.engine` runs the ``criu`` binary; everything else goes
through the :class:`~hpcckpt.criu.interface.CheckpointEngine` protocol so that the
pipeline logic can be unit-tested against a fake.
"""

from __future__ import annotations

from hpcckpt.criu.interface import CheckpointEngine, DumpOptions, DumpResult, RestoreResult

__all__ = ["CheckpointEngine", "DumpOptions", "DumpResult", "RestoreResult"]
