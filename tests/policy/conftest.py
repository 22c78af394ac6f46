"""Fixtures for policy tests: policy files in a temporary directory, and no
site or user policy leaking in from the environment of the machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_ambient_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCCKPT_SITE_POLICY", raising=False)
    monkeypatch.delenv("HPCCKPT_POLICY", raising=False)


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write(name, text) -> path of a new policy file."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write
