"""Every corpus case under the real CLI: checkpointed, killed with its whole tree, resumed at once on this node.

``hpcckpt run --interval 1`` with no per-job policy; after at least 2 committed checkpoints (as
``hpcckpt list --json`` shows them) the job's processes are stopped, then the runner and all of them get SIGKILL
(a crash), and ``hpcckpt resume`` must take the job to its end with output identical to an uninterrupted run,
going on from its checkpoint (its first step after the resume is past 0 and no later than the step after the
last one the killed run printed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.corpus.cases import CASES, Built, Case
from tests.corpus.conftest import require
from tests.corpus.harness import kill_and_resume

pytestmark = [pytest.mark.criu, pytest.mark.slow]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.mpi] if c.mpi else [])
                                  for c in CASES])
def test_killed_then_resumed_on_same_node_matches_uninterrupted(
    case: Case, built: Built, reference: Callable[[Case], Path], work: Path
) -> None:
    require(case)
    kill_and_resume(case, built, reference(case), work)
