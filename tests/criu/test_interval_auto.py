"""``interval: auto`` in a real run: Daly's choice from measured checkpoint costs, shown by ``hpcckpt info``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt.exitcodes import EXIT_REQUEUE
from hpcckpt.policy.daly import daly_interval
from tests.criu.harness import PROGS, REPO, hpcckpt, wait_for

pytestmark = [pytest.mark.criu]


def test_auto_interval_is_dalys_and_info_shows_it(work: Path) -> None:
    site = work / "site.yaml"
    # A very short MTBF makes Daly's interval a few seconds for a freeze of a few tens of ms.
    site.write_text("site:\n  mtbf: 200s\n  interval_min: 1s\n  interval_max: 1h\n")
    run = hpcckpt(["run", "--job-id", "auto1", "--interval", "auto", "--", sys.executable,
                   str(PROGS / "counter.py"), "100000", "0.05"],
                  work, "run", work / "store", extra_env={"HPCCKPT_SITE_POLICY": str(site)})
    wait_for(lambda: len(run.events("checkpoint.committed")) >= 3, 120, "three checkpoints")
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait(60) == EXIT_REQUEUE

    chosen = [e for e in run.events("runner.interval") if e.get("mode") == "auto"]
    assert chosen, "the auto interval was never logged"
    measured = [e for e in chosen if e.get("samples", 0) > 0]
    assert measured, "no interval was chosen from a measured checkpoint cost"
    last = measured[-1]
    # What was chosen is Daly's interval for the logged cost and MTBF, clamped to the site bounds.
    expect = min(max(daly_interval(float(last["delta"]), 200.0), 1.0), 3600.0)
    assert abs(last["interval"] - expect) <= 1.0, last

    ckptid = run.events("checkpoint.committed")[-1]["ckptid"]
    env = dict(os.environ, HPCCKPT_STORE=str(work / "store"), PYTHONPATH=str(REPO))
    info = subprocess.run([sys.executable, "-m", "hpcckpt", "info", str(ckptid), "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    iv = json.loads(info.stdout)["meta"]["extra"]["interval"]
    assert iv["mode"] == "auto" and iv["mtbf"] == 200 and iv["seconds"] >= 1
    text = subprocess.run([sys.executable, "-m", "hpcckpt", "info", str(ckptid)], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "interval" in text and "mtbf 200" in text
