"""The package's layering contract (.importlinter) is live: it passes on the tree, and fails on a copy with a
wrong-way import or an import cycle added, naming the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy, ahead of the editable install
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "hpcckpt", tmp_path / "hpcckpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def _add_import(module: Path, line: str) -> None:
    text = module.read_text()
    at = text.index("from __future__ import annotations\n") + len("from __future__ import annotations\n")
    module.write_text(text[:at] + line + "\n" + text[at:])


def test_the_tree_keeps_its_layers_and_has_no_cycles(copy: Path) -> None:
    res = _lint(copy)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


def test_a_wrong_way_import_breaks_the_contract(copy: Path) -> None:
    _add_import(copy / "hpcckpt" / "store" / "retention.py", "from hpcckpt.core import lease  # noqa")
    res = _lint(copy)
    assert res.returncode != 0
    assert "hpcckpt.store is not allowed to import hpcckpt.core" in res.stdout, res.stdout
    assert "hpcckpt.store.retention -> hpcckpt.core.lease" in res.stdout


def test_a_cycle_between_two_modules_of_one_package_breaks_the_contract(copy: Path) -> None:
    # image.records imports image.format; make format import records back.
    _add_import(copy / "hpcckpt" / "image" / "format.py", "from hpcckpt.image import records  # noqa")
    res = _lint(copy)
    assert res.returncode != 0
    assert "No cycles are allowed in hpcckpt.image" in res.stdout, res.stdout
