"""The corpus cases that keep files in node-local scratch, resumed where that scratch is empty, as on another node.

On a real cluster ``/tmp`` and ``/dev/shm`` are the node's own: a job moved to another node finds none of what it
kept there. The Slurm test's "nodes" share this host's ``/tmp``, so it cannot show this; here the job's scratch
(its ``TMPDIR``, where OpenMPI keeps its session directory and shared-memory segments and Python's
``multiprocessing`` its manager's socket) is emptied between the crash and the resume.

hpcckpt copies the job's own temporary directories into each checkpoint (policy job.scratch_max) and a resume
puts back what the node lacks; without that each of these fails with what ``NEEDS`` names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.corpus.cases import BY_NAME, Built, Case
from tests.corpus.conftest import require
from tests.corpus.harness import kill_and_resume

pytestmark = [pytest.mark.criu, pytest.mark.slow]

# What each case would find missing on another node, were its scratch not carried in the image.
NEEDS = {
    "mpi-singleton": "OpenMPI's session directory in TMPDIR (ompi.HOST.UID/pid.N/hwloc.sm, mapped by the job)",
    "mpirun-c": "OpenMPI's session directory and its ranks' vader_segment.* shared-memory files",
    "mpirun-mpi4py": "OpenMPI's session directory and its ranks' vader_segment.* shared-memory files",
    "mp-manager": "the directory of the Manager's listening unix socket (TMPDIR/pymp-*/listener-*)",
}


@pytest.mark.parametrize("case", [
    pytest.param(BY_NAME[name], id=name, marks=[
        *([pytest.mark.mpi] if BY_NAME[name].mpi else []),
    ]) for name in NEEDS
])
def test_resumed_where_node_local_scratch_is_empty(
    case: Case, built: Built, reference: Callable[[Case], Path], work: Path
) -> None:
    require(case)
    kill_and_resume(case, built, reference(case), work, fresh_scratch=True)
