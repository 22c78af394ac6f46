"""The session-wide ``slurm_cluster`` fixture (imported by tests/conftest.py).

One cluster per test session: starting it takes about a second, but every
test that uses it shares three nodes (jobs take whole nodes), so each test
cancels its jobs and waits for idle nodes before handing the cluster on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if not slurm_installed():
        pytest.skip("slurmctld/slurmd/munged are not installed (apt-get install slurmctld slurmd munge)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd and munged, which needs root")
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.stop()


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The shared cluster, left with idle nodes and no jobs for the next test."""
    slurm_cluster.wait_idle(60)
    yield slurm_cluster
    slurm_cluster.cancel_all()
    for node in ("node1", "node2", "node3"):
        if slurm_cluster.node_states().get(node, "").rstrip("*") not in ("idle", "allocated", "mixed",
                                                                          "completing"):
            slurm_cluster.revive_node(node)
    slurm_cluster.wait_idle(90)
