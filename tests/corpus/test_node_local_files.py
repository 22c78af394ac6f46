"""The corpus cases that keep files in node-local scratch, resumed where that scratch is empty, as on another node.

On a real cluster ``/tmp`` and ``/dev/shm`` are the node's own: a job moved to another node finds none of what it
kept there. The Slurm test's "nodes" share this host's ``/tmp``, so it cannot show this; here the job's scratch
(its ``TMPDIR``, where OpenMPI keeps its session directory and shared-memory segments and Python's
``multiprocessing`` its manager's socket) is emptied between the crash and the resume.

These fail today (hpcckpt neither saves such files in the image nor recreates them), and are marked so: strict,
so that the day they pass the mark must go.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.corpus.cases import BY_NAME, Built, Case
from tests.corpus.conftest import require
from tests.corpus.harness import kill_and_resume

pytestmark = [pytest.mark.criu, pytest.mark.slow]

# What each case finds missing, as the resume says it today.
MISSING = {
    "mpi-singleton": "OpenMPI's session directory in TMPDIR (ompi.HOST.UID/pid.N/hwloc.sm, mapped by the job)",
    "mpirun-c": "OpenMPI's session directory and its ranks' vader_segment.* shared-memory files",
    "mpirun-mpi4py": "OpenMPI's session directory and its ranks' vader_segment.* shared-memory files",
    "mp-manager": "the directory of the Manager's listening unix socket (TMPDIR/pymp-*/listener-*)",
}


@pytest.mark.parametrize("case", [
    pytest.param(BY_NAME[name], id=name, marks=[
        *([pytest.mark.mpi] if BY_NAME[name].mpi else []),
        pytest.mark.xfail(strict=True, reason=f"node-local files are not in the image: {why}"),
    ]) for name, why in MISSING.items()
])
def test_resumed_where_node_local_scratch_is_empty(
    case: Case, built: Built, reference: Callable[[Case], Path], work: Path
) -> None:
    require(case)
    kill_and_resume(case, built, reference(case), work, fresh_scratch=True)
