"""Incremental chains across a restart, through the real CLI: resume, chain on, retention, restore again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt.core.pipeline.predump import FEATURE, PreDumpPlan, plan_predump
from hpcckpt.criu.engine import Criu
from tests.criu.harness import PROGS, REPO, hpcckpt, job_pid, kill_everything, wait_for

pytestmark = [pytest.mark.criu]
COUNTER = str(PROGS / "counter.py")


def test_chain_goes_on_across_a_restart_and_restores(work: Path) -> None:
    store = work / "store"
    pol = work / "policy.yaml"
    # keep_last 1: retention must still keep every image the latest one is built on, and (policy
    # retention.fallback_full, the default) the full image outside that chain
    pol.write_text("retention:\n  keep_last: 1\npipeline:\n  full_every: 50\n  max_chain_ratio: 100\n"
                   "storage:\n  compression:\n    codec: zstd\n")
    run = hpcckpt(["run", "--job-id", "chain", "--interval", "1", "--policy", str(pol), "--",
                   sys.executable, COUNTER, "100000", "0.05"], work, "run", store)
    pid = job_pid("chain")
    wait_for(lambda: len(run.events("checkpoint.committed")) >= 3, 60, "three checkpoints")
    kill_everything(run, pid)
    first = run.events("checkpoint.committed")
    # The first two are full (the 1st is the fallback of the chain the 2nd starts), the 3rd chains on.
    assert first[0]["parent"] is None and first[1]["parent"] is None
    assert first[2]["parent"] == first[1]["ckptid"], "the 3rd checkpoint is not incremental on the 2nd"

    res = hpcckpt(["resume", "chain", "--interval", "1", "--policy", str(pol)], work, "resume", store)
    wait_for(lambda: res.events("checkpoint.committed"), 60, "a checkpoint after the resume")
    res.proc.send_signal(signal.SIGTERM)
    assert res.wait(60) == 85
    restored_from = res.events("resume.restored")[0]["ckptid"]
    after = res.events("checkpoint.committed")
    assert after[0]["parent"] == restored_from, "the first checkpoint after the resume did not chain on"
    assert after[-1]["final"] is True
    last_printed = int(res.lines()[-1])

    env = dict(os.environ, HPCCKPT_STORE=str(store), PYTHONPATH=str(REPO), HPCCKPT_LOG_FORMAT="json")
    latest = str(after[-1]["ckptid"])
    ver = subprocess.run([sys.executable, "-m", "hpcckpt", "verify", "--json", latest], env=env,
                         capture_output=True, text=True, timeout=120)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    info = subprocess.run([sys.executable, "-m", "hpcckpt", "info", "--json", latest], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert after[-1]["parent"] is not None, "the final image is not incremental"
    assert doc["meta"]["parent_ckptid"] == after[-1]["parent"] and doc["parents_verified"] is True

    again = hpcckpt(["resume", "chain", "--interval", "1000", "--policy", str(pol)], work, "again", store)
    wait_for(lambda: len(again.lines()) >= 3, 60, "output after the second resume")
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait(60) == 85
    assert again.events("resume.restored")[0]["ckptid"] == after[-1]["ckptid"]
    # restored byte for byte: the count goes on exactly after the last line the final image saw
    assert int(again.lines()[0]) == last_printed + 1


class Probe:
    def __init__(self, answer: bool, path: str) -> None:
        self.answer, self.path = answer, path
        self.asked: list[str] = []

    def has_feature(self, name: str) -> bool:
        self.asked.append(name)
        return self.answer


def test_predump_detection_is_probed_once_and_real_criu_answers(criu_ok: None) -> None:
    yes = Probe(True, "/fake/criu-with-track-mem")
    assert plan_predump(yes).enabled and plan_predump(yes).enabled and yes.asked == [FEATURE]
    assert not plan_predump(Probe(False, "/fake/criu-without")).enabled
    assert plan_predump(yes, wanted=False) == PreDumpPlan(False, "pre-dump not requested")
    real = plan_predump(Criu.locate())
    # The answer is this kernel's; NOTES.md: soft-dirty tracking is unavailable on the project VMs.
    assert real.enabled == Criu.locate().has_feature(FEATURE)
    assert FEATURE in real.reason
