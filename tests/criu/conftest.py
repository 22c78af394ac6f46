"""Real CRIU tests need root (or a criu with capabilities) and a working 'criu check'."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcckpt.errors import HpcckptError


@pytest.fixture(scope="session")
def criu_ok() -> None:
    from hpcckpt.engine.criu import Criu

    if os.geteuid() != 0:
        pytest.skip("the CRIU job tests need root (PID namespaces)")
    try:
        criu = Criu.locate()
    except HpcckptError as err:
        pytest.skip(f"no criu: {err}")
    ok, out = criu.check()
    if not ok:
        pytest.skip(f"criu check fails here: {out[-300:]}")


@pytest.fixture
def work(tmp_path: Path, criu_ok: None) -> Path:
    (tmp_path / "store").mkdir()
    return tmp_path
