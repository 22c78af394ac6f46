"""Session fixtures of the corpus: the programs built once, and each case's uninterrupted output computed once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.corpus.cases import Built, Case, build, missing_tools, run_uninterrupted
from tests.criu.conftest import criu_ok, work  # noqa: F401
from tests.slurm.fixtures import cluster  # noqa: F401


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("corpus-bin"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Callable[[Case], Path]:
    """``reference(case)``: the directory holding the uninterrupted run's outputs, run on first use."""
    done: dict[str, Path] = {}

    def get(case: Case) -> Path:
        if case.name not in done:
            out = tmp_path_factory.mktemp(f"ref-{case.name}")
            run_uninterrupted(case, built, out)
            done[case.name] = out
        return done[case.name]

    return get


def require(case: Case) -> None:
    why = missing_tools(case)
    if why:
        pytest.skip(why)
