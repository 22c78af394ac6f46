"""A real job under ``hpcckpt run``: its metrics textfile, ``hpcckpt status`` and ``hpcckpt report`` agree with the
catalog after real commits, real CRIU failures and a real restore."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.context import current_user
from hpcckpt.exitcodes import EXIT_ENGINE, EXIT_REQUEUE
from tests.criu.harness import PROGS, REPO, Cmd, hpcckpt, job_pid, kill_everything, wait_for

pytestmark = [pytest.mark.criu]
parser = pytest.importorskip("prometheus_client.openmetrics.parser")
JOB = "observed"


def cli(args: list[str], work: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HPCCKPT_STORE=str(work / "store"), PYTHONPATH=str(REPO),
               HPCCKPT_STAGING=str(work / "staging"))
    return subprocess.run([sys.executable, "-m", "hpcckpt", *args], env=env, cwd=work, capture_output=True,
                          text=True, timeout=300)


def rows(work: Path) -> list[dict[str, Any]]:
    res = cli(["list", JOB, "--all", "--json"], work)
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in parser.text_string_to_metric_families(text) for s in fam.samples}


def checkpoint(work: Path, ok: bool) -> None:
    res = cli(["checkpoint", JOB], work)
    assert res.returncode == (0 if ok else EXIT_ENGINE), res.stderr


def tcp(work: Path, on: bool) -> None:
    flag = work / "hold-tcp"
    if on:
        flag.touch()
    else:
        flag.unlink()
    want = "on" if on else "off"
    wait_for(lambda: (work / "hold-tcp.state").read_text() == want, 30, f"the job to switch its TCP socket {want}")


@pytest.fixture
def started() -> Iterator[list[Cmd]]:
    """The runners a test starts: whatever happens, each is ended with its job's tree, by pid."""
    cmds: list[Cmd] = []
    yield cmds
    for cmd in cmds:
        if cmd.proc.poll() is None:
            pid = job_pid(JOB, timeout=5)
            kill_everything(cmd, pid)


def test_metrics_status_and_report_of_a_real_job(
        work: Path, started: list[Cmd], outside_server: tuple[str, int, list[socket.socket]]) -> None:
    me = current_user()
    prom = work / "prom"
    prom.mkdir()
    # Small chunks, so that incremental images of this small job take unchanged chunks from their parents.
    # A connection to a peer outside the job makes a checkpoint fail under external_connections: skip.
    (work / "policy.yaml").write_text(f"metrics:\n  textfile: {prom}/{{user}}-{{job}}.prom\n"
                                      "pipeline:\n  chunk_size: 64K\njob:\n  external_connections: skip\n")
    host, port, _ = outside_server
    env = {"HPCCKPT_POLICY": str(work / "policy.yaml")}
    textfile = prom / f"{me.name}-{JOB}.prom"
    # A long interval: every attempt below is asked for, so each is known to be over when its command returns.
    run = hpcckpt(["run", "--job-id", JOB, "--interval", "1000", "--", sys.executable, str(PROGS / "tcp_toggle.py"),
                   str(work / "hold-tcp"), "0.05", host, str(port)], work, "run", work / "store", env)
    started.append(run)
    job_pid(JOB)
    wait_for(textfile.exists, 30, "the runner to write its textfile at start")
    for _ in range(2):
        checkpoint(work, ok=True)
    tcp(work, on=True)
    for _ in range(3):
        checkpoint(work, ok=False)  # a connection leaving the job, and job.external_connections: skip

    status = cli(["status", JOB, "--json"], work)
    assert status.returncode == 0, status.stderr
    (st,) = json.loads(status.stdout)
    assert st["running"] is True and st["consecutive_failures"] == 3
    assert any(w.startswith("failing: its last 3 checkpoints failed") for w in st["warnings"]), st
    assert "failing" in cli(["status"], work).stdout

    tcp(work, on=False)
    for _ in range(3):
        checkpoint(work, ok=True)

    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    got = samples(textfile.read_text())
    lab = frozenset({("job_id", JOB), ("user", me.name)})
    listed = rows(work)
    # Retention may have deleted the oldest images (those no kept image needs as a parent); their rows
    # still say they were committed (only a commit sets duration).
    done = [r for r in listed if r["status"] == "committed" or (r["status"] == "deleted" and r["duration"])]
    failed = [r for r in listed if r["status"] == "failed"]
    assert len(done) == 5 and len(failed) == 3
    assert all("job.external_connections" in r["error"] for r in failed), failed[0]["error"]
    assert got[("hpcckpt_checkpoints_total", lab | {("result", "committed")})] == 5
    assert got[("hpcckpt_checkpoints_total", lab | {("result", "failed")})] == 3
    assert got[("hpcckpt_consecutive_failures", lab)] == 0
    assert got[("hpcckpt_last_success_timestamp_seconds", lab)] == pytest.approx(done[-1]["finished"])
    assert got[("hpcckpt_written_bytes_total", lab)] == sum(r["size_bytes"] for r in done)
    assert got[("hpcckpt_dedup_saved_bytes_total", lab)] == sum(r["meta"]["ref_bytes"] for r in done)
    assert got[("hpcckpt_dedup_saved_bytes_total", lab)] > 0, "incremental checkpoints took pages from parents"
    assert got[("hpcckpt_image_bytes_total", lab)] == sum(r["meta"]["bytes_in"] for r in done)
    assert got[("hpcckpt_checkpoint_freeze_seconds_count", lab)] == 5
    assert got[("hpcckpt_checkpoint_freeze_seconds_sum", lab)] == pytest.approx(
        sum(r["meta"]["frozen_s"] for r in done))
    assert got[("hpcckpt_checkpoint_flush_seconds_sum", lab)] == pytest.approx(sum(r["duration"] for r in done))
    assert got[("hpcckpt_interval_seconds", lab | {("origin", "fixed")})] == 1000
    assert got[("hpcckpt_restores_total", lab)] == 0
    assert ("hpcckpt_flush_queue_depth", lab) in got and ("hpcckpt_staging_bytes", lab) in got

    stop = cli(["checkpoint", JOB, "--and-stop"], work)
    assert stop.returncode == 0, stop.stderr
    assert run.wait(60) == EXIT_REQUEUE
    assert not textfile.exists(), "the job ended here: its series go with it"

    res = hpcckpt(["resume", JOB, "--interval", "1000"], work, "resume", work / "store", env)
    started.append(res)
    wait_for(lambda: len(res.lines()) >= 3, 60, "output after the resume")
    wait_for(textfile.exists, 30, "the resumed runner's textfile")
    checkpoint(work, ok=True)
    got = samples(textfile.read_text())
    assert got[("hpcckpt_restores_total", lab)] == 1
    assert got[("hpcckpt_checkpoints_total", lab | {("result", "committed")})] == 7

    png, page = work / "report.png", work / "report.html"
    for out in (png, page):
        res_r = cli(["report", JOB, "--output", str(out)], work)
        assert res_r.returncode == 0, res_r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1100, 1300)
    assert 30_000 < len(data) < 2_000_000
    doc = page.read_text()
    series = json.loads(doc.split('<script type="application/json" id="series">')[1].split("</script>")[0])
    assert [a["ckptid"] for a in series["attempts"]] == [r["ckptid"] for r in rows(work)]
    assert len(series["restores"]) == 1 and "data:image/png;base64," in doc
    for r in done:
        assert f"<td>{r['ckptid']}</td>" in doc

    res.proc.send_signal(signal.SIGTERM)
    assert res.wait(60) == EXIT_REQUEUE
