"""Fixtures for tests/slurm: the per-test view of the shared cluster."""

from __future__ import annotations

from tests.slurm.fixtures import cluster, slurm_cluster  # noqa: F401
