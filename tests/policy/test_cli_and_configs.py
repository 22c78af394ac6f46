"""`hpcckpt policy show/check` through the real CLI, and the shipped configs/."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from hpcckpt.cli.main import main
from hpcckpt.exitcodes import EXIT_OK, EXIT_POLICY
from hpcckpt.policy import Policy, build_policy
from hpcckpt.policy.model import SECTION_CLASSES
from hpcckpt.policy.schema import FIELDS, SECTIONS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
Write = Callable[[str, str], Path]


def test_check_reports_every_error_and_exits_3(write: Write, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write("bad.yaml", "intreval: 1h\nretention:\n  keep_last: three\n")
    good = write("good.yaml", "interval: 10m\n")
    assert main(["policy", "check", str(good), str(bad)]) == EXIT_POLICY
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{good}: ok",
        f"{bad}:1:1: unknown key 'intreval' (did you mean 'interval'?)",
        f"{bad}:3:14: retention.keep_last: expected a positive integer, got 'three'",
    ]
    assert main(["policy", "check", str(good)]) == EXIT_OK


def test_check_json(write: Write, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write("bad.yaml", "storage: [\n")
    assert main(["policy", "check", "--json", str(bad)]) == EXIT_POLICY
    doc = json.loads(capsys.readouterr().out)
    (errors,) = [v["errors"] for v in doc["files"].values()]
    assert doc["files"][str(bad)]["valid"] is False
    assert re.fullmatch(rf"{re.escape(str(bad))}:2:1: invalid YAML: .*", errors[0])


def test_check_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(tmp_path / "none.yaml")]) == EXIT_POLICY
    assert "none.yaml: cannot read user policy" in capsys.readouterr().out


def test_show_effective_names_origins(write: Write, capsys: pytest.CaptureFixture[str]) -> None:
    site = write("site.yaml", "storage:\n  root: /scratch/x\nlocks: [storage.root]\n")
    user = write("user.yaml", "retention:\n  keep_last: 5\n")
    rc = main(["policy", "show", "--effective", "--site-policy", str(site), "--policy", str(user),
               "--set", "interval=10m"])
    assert rc == EXIT_OK
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert table["interval"] == ["10m", "cli:--set", "interval"]
    assert table["storage.root"] == ["/scratch/x", f"site:{site}:2", "(locked)"]
    assert table["retention.keep_last"] == ["5", f"user:{user}:2"]
    assert table["engine"] == ["criu", "default"]


def test_show_json_and_yaml_agree(write: Write, capsys: pytest.CaptureFixture[str]) -> None:
    user = write("user.yaml", "interval: 90m\nstorage: {root: '/scratch/a: b #c'}\n")
    assert main(["policy", "show", "--json", "--policy", str(user)]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["policy"]["interval"] == 5400 and doc["origins"]["interval"] == f"user:{user}:1"
    assert doc["digest"] == build_policy(user, None, {}).digest()
    # The plain `show` output is itself a valid policy with the same values.
    assert main(["policy", "show", "--policy", str(user)]) == EXIT_OK
    shown = write("shown.yaml", capsys.readouterr().out.replace("site:", "_site:"))
    text = shown.read_text().split("_site:")[0]
    assert build_policy(write("again.yaml", text), None, {}).digest() == doc["digest"]


def test_show_refuses_a_locked_flag(write: Write, capsys: pytest.CaptureFixture[str]) -> None:
    site = write("site.yaml", "locks: [interval]\n")
    assert main(["policy", "show", "--site-policy", str(site), "--set", "interval=5m"]) == EXIT_POLICY
    assert f"--set interval: interval is locked by the site policy ({site}:1:9)" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("show", "check"):
        with pytest.raises(SystemExit):
            main(["policy", sub, "--help"])
        assert "examples:" in capsys.readouterr().out


# --- configs/ -----------------------------------------------------------------


def test_default_yaml_is_the_builtin_defaults() -> None:
    assert build_policy(None, CONFIGS / "default.yaml", {}) == build_policy(None, None, {})


def test_default_yaml_documents_every_key() -> None:
    doc = yaml.safe_load((CONFIGS / "default.yaml").read_text())

    def paths(d: dict[str, object], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            p = f"{prefix}{k}"
            out |= paths(v, p + ".") if isinstance(v, dict) else {p}
        return out

    assert paths(doc) == set(FIELDS)
    lines = (CONFIGS / "default.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        # A key with a value (not a section header) must have a comment within the two lines above it
        # (two keys may share one, as interval_min and interval_max do).
        if re.match(r"\s*\w+: \S", line):
            above = lines[max(0, i - 2):i]
            assert any(a.strip().startswith("#") for a in above), f"default.yaml:{i + 1}: key without comment"


@pytest.mark.parametrize("name", ["preemptible.yaml", "long-running.yaml", "mpi.yaml"])
def test_examples_are_valid_under_the_example_site(name: str) -> None:
    pol = build_policy(CONFIGS / name, CONFIGS / "site.yaml", {})
    assert pol.storage.root == "/scratch/hpcckpt"
    assert pol.origin("storage.root").startswith("site:")


def test_example_site_policy() -> None:
    pol = build_policy(None, CONFIGS / "site.yaml", {})
    assert pol.site.mtbf == 86400
    assert "storage.root" in pol.locks and pol.is_locked("slurm.requeue")
    assert pol.retention.max_bytes == 500 << 30


def test_schema_matches_dataclasses() -> None:
    def leaves(cls: type, prefix: str) -> set[str]:
        out: set[str] = set()
        for f in dataclasses.fields(cls):
            if f.name in ("origins", "locks", "bounds", "sources"):
                continue
            path = f"{prefix}{f.name}"
            out |= leaves(SECTION_CLASSES[path], path + ".") if path in SECTION_CLASSES else {path}
        return out

    assert leaves(Policy, "") == set(FIELDS)
    assert set(SECTION_CLASSES) == set(SECTIONS)
