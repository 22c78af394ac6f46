"""The package, the CLI surface, errors and logging."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hpcckpt
from hpcckpt import errors, exitcodes
from hpcckpt.cli.main import SUBCOMMANDS, build_parser, main
from hpcckpt.image import errors as image_errors

REPO = Path(__file__).resolve().parent.parent


def hpcckpt_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hpcckpt", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_version() -> None:
    proc = hpcckpt_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"hpcckpt {hpcckpt.__version__}"


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command the parser knows, e.g. ('policy', 'show')."""
    paths: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    paths.append((*prefix, name))
                    walk(child, (*prefix, name))

    walk(build_parser(), ())
    return paths


def test_all_top_level_commands_are_registered() -> None:
    tops = {p[0] for p in _command_paths()}
    assert tops == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", _command_paths(), ids=" ".join)
def test_every_command_has_help_with_examples(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out.lower(), f"'hpcckpt {' '.join(command)} --help' shows no example"


def test_error_classes_have_documented_exit_codes() -> None:
    doc = exitcodes.__doc__ or ""
    classes = [
        obj
        for module in (errors, image_errors)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, errors.HpcckptError)
    ]
    assert len(classes) > 10
    for cls in classes:
        code = cls.exit_code
        assert re.search(rf"^\s*{code}\s", doc, re.M), f"{cls.__name__}'s exit code {code} is not documented"


def test_doctor_without_criu_names_criu_and_how_to_get_it(tmp_path: Path) -> None:
    proc = hpcckpt_cli("doctor", "--store", str(tmp_path), env={"HPCCKPT_CRIU": "/nonexistent"})
    assert proc.returncode == exitcodes.EXIT_ENGINE
    out = proc.stdout + proc.stderr
    assert "/nonexistent" in out
    assert "criu" in out.lower()
    assert "setup.sh" in out


def test_doctor_json_without_criu(tmp_path: Path) -> None:
    proc = hpcckpt_cli("doctor", "--json", "--store", str(tmp_path), env={"HPCCKPT_CRIU": "/nonexistent"})
    assert proc.returncode == exitcodes.EXIT_ENGINE
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    criu = next(c for c in doc["checks"] if c["name"] == "criu")
    assert criu["ok"] is False and criu["fix"]
    store = next(c for c in doc["checks"] if c["name"] == "store")
    assert store["ok"] is True


@pytest.mark.criu
def test_doctor_passes_on_this_node(tmp_path: Path) -> None:
    proc = hpcckpt_cli("doctor", "--json", "--store", str(tmp_path))
    doc = json.loads(proc.stdout)
    failed = [c for c in doc["checks"] if c["required"] and not c["ok"]]
    assert proc.returncode == 0, failed
    assert doc["ok"] is True


def test_doctor_reports_unwritable_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = hpcckpt_cli("doctor", "--json", "--store", str(blocker / "store"))
    doc = json.loads(proc.stdout)
    store = next(c for c in doc["checks"] if c["name"] == "store")
    assert store["ok"] is False
    assert str(blocker) in store["detail"]
    assert proc.returncode != 0


def test_logs_are_json_lines_off_a_terminal() -> None:
    code = (
        "from hpcckpt import log; lg = log.setup(); "
        "log.event(log.get('t'), 'ckpt.done', 'checkpoint committed', ckptid=7)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line = json.loads(proc.stderr.strip().splitlines()[-1])
    assert line["event"] == "ckpt.done"
    assert line["ckptid"] == 7
    assert line["level"] == "info"


def test_usage_error_exit_code() -> None:
    proc = hpcckpt_cli("no-such-command")
    assert proc.returncode == exitcodes.EXIT_USAGE


def test_cli_reference_is_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_cli_docs.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
