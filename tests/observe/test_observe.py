"""Metrics, status and report computed from a real SQLite catalog (the runner's rows, written by hand here)."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.catalog import Catalog, open_catalog
from hpcckpt.cli.main import main
from hpcckpt.context import User, current_user
from hpcckpt.core.status import Liveness, job_statuses
from hpcckpt.observe.jobstats import load_jobs
from hpcckpt.observe.metrics import JobMetrics, StagingUse, render, staging_use

parser = pytest.importorskip("prometheus_client.openmetrics.parser")

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def catalog(root: Path, user: User, clock: Clock) -> Catalog:
    cat = open_catalog(None, root, user)
    cat._clock = clock  # the rows' times, so that the figures below are exact
    return cat


def commit(cat: Catalog, clock: Clock, me: User, job: str, *, frozen: float, flush: float, size: int,
           bytes_in: int, ref: int, interval: dict[str, Any]) -> int:
    frozen_at = clock.now
    ck = cat.begin(job_id=job, uid=me.uid, user=me.name, node="n1", engine="criu",
                   meta={"frozen_s": frozen, "frozen_at": frozen_at, "interval": interval, "stage": "s"})
    clock.now += frozen + flush
    cat.commit(ck, path=f"/x/{ck}", size_bytes=size, duration=flush,
               meta={"bytes_in": bytes_in, "bytes_out": size, "ref_bytes": ref})
    clock.now += 10
    return ck


def fail(cat: Catalog, clock: Clock, me: User, job: str, error: str = "criu dump failed: Connected TCP socket"
         ) -> int:
    ck = cat.begin(job_id=job, uid=me.uid, user=me.name, node="n1", engine="criu", meta={"interval": FIXED})
    cat.fail(ck, error)
    clock.now += 10
    return ck


FIXED = {"mode": "fixed", "interval": 60, "seconds": 60}
AUTO = {"mode": "auto", "interval": 120, "seconds": 120, "delta": 0.5, "mtbf": 86400}


@pytest.fixture
def me() -> User:
    return current_user()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    return tmp_path / "store"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_commit_merges_meta_in_the_same_row(store: Path, me: User) -> None:
    clock = Clock()
    cat = catalog(store, me, clock)
    ck = commit(cat, clock, me, "j", frozen=0.2, flush=1.0, size=100, bytes_in=400, ref=250, interval=FIXED)
    rec = cat.get(ck)
    assert rec is not None and rec.meta["stage"] == "s" and rec.meta["ref_bytes"] == 250
    assert rec.meta["frozen_s"] == 0.2 and rec.size_bytes == 100


def test_metrics_parse_and_match_the_catalog(store: Path, me: User, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    cat = catalog(store, me, clock)
    ids = [commit(cat, clock, me, "job1", frozen=0.1 * (i + 1), flush=2.0, size=1000 + i, bytes_in=5000,
                  ref=4000 if i else 0, interval=FIXED if i < 2 else AUTO) for i in range(4)]
    fail(cat, clock, me, "job1")
    ids.append(commit(cat, clock, me, "job1", frozen=0.7, flush=3.0, size=2000, bytes_in=5000, ref=3000,
                      interval=AUTO))
    cat.mark_deleted(ids[0])  # retention: still counted as committed once
    cat.record_job_event("job1", uid=me.uid, event="restore", detail=str(ids[2]), node="n2")
    cat.record_job_event("job1", uid=me.uid, event="fallback", detail=f"{ids[3]}: bad image", node="n2")
    fail(cat, clock, me, "other")
    cat.close()

    # Ages relative to the rows' fake clock: a window of 10 years keeps them all.
    assert main(["metrics", "--store", str(store), "--since", "3650d"]) == 0
    text = capsys.readouterr().out
    got = samples(text)
    lab = frozenset({("job_id", "job1"), ("user", me.name)})

    def v(name: str, **extra: str) -> float:
        return got[(name, lab | frozenset(extra.items()))]

    assert v("hpcckpt_checkpoints_total", result="committed") == 5
    assert v("hpcckpt_checkpoints_total", result="failed") == 1
    assert v("hpcckpt_written_bytes_total") == 1000 + 1001 + 1002 + 1003 + 2000
    assert v("hpcckpt_dedup_saved_bytes_total") == 4000 * 3 + 3000
    assert v("hpcckpt_image_bytes_total") == 5 * 5000
    assert v("hpcckpt_restores_total") == 1 and v("hpcckpt_fallbacks_total") == 1
    assert v("hpcckpt_interval_seconds", origin="daly") == 120
    assert v("hpcckpt_checkpoint_cost_seconds") == 0.5
    assert v("hpcckpt_consecutive_failures") == 0
    assert v("hpcckpt_checkpoint_freeze_seconds_count") == 5
    assert v("hpcckpt_checkpoint_freeze_seconds_sum") == pytest.approx(0.1 + 0.2 + 0.3 + 0.4 + 0.7)
    assert v("hpcckpt_checkpoint_freeze_seconds_bucket", le="0.25") == 2
    assert v("hpcckpt_checkpoint_flush_seconds_sum") == pytest.approx(4 * 2.0 + 3.0)
    assert v("hpcckpt_checkpoint_total_seconds_sum") == pytest.approx(4 * 2.0 + 3.0 + 0.1 + 0.2 + 0.3 + 0.4 + 0.7)
    rows = json.loads(_cli(["list", "--store", str(store), "--json", "--all", "job1"], capsys))
    last = max((r for r in rows if r["status"] == "committed"), key=lambda r: r["ckptid"])
    assert v("hpcckpt_last_success_timestamp_seconds") == pytest.approx(last["finished"])
    other = frozenset({("job_id", "other"), ("user", me.name)})
    assert got[("hpcckpt_checkpoints_total", other | {("result", "failed")})] == 1
    assert got[("hpcckpt_consecutive_failures", other)] == 1
    assert ("hpcckpt_last_success_timestamp_seconds", other) not in got


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 0
    return capsys.readouterr().out


def test_label_values_are_escaped_and_still_parse() -> None:
    from hpcckpt.observe.jobstats import JobStats

    text = render([JobStats('a"b\\c\nd', "u", 0, [])], {("u", "x"): StagingUse(10, 2)})
    got = samples(text)
    assert got[("hpcckpt_checkpoints_total", frozenset({("job_id", 'a"b\\c\nd'), ("user", "u"),
                                                        ("result", "committed")}))] == 0
    assert got[("hpcckpt_flush_queue_depth", frozenset({("job_id", "x"), ("user", "u")}))] == 2
    assert text.endswith("# EOF\n")


def test_runner_textfile_is_atomic_readable_and_removed(tmp_path: Path, store: Path, me: User) -> None:
    clock = Clock()
    cat = catalog(store, me, clock)
    commit(cat, clock, me, "j7", frozen=0.3, flush=1.0, size=10, bytes_in=20, ref=5, interval=FIXED)
    staging = tmp_path / "staging"
    stage = staging / me.name / "j7" / "stage-1"
    stage.mkdir(parents=True)
    (stage / ".done").write_text("")
    (stage / "pages.img").write_bytes(b"x" * 8192)
    hook = JobMetrics(tmp_path / "prom" / "j7.prom", "j7", me, staging)
    (tmp_path / "prom").mkdir()
    hook(cat)
    st = os.stat(hook.path)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert [p.name for p in (tmp_path / "prom").iterdir()] == ["j7.prom"], "no temp file is left behind"
    got = samples(hook.path.read_text())
    lab = frozenset({("job_id", "j7"), ("user", me.name)})
    assert got[("hpcckpt_flush_queue_depth", lab)] == 1
    assert got[("hpcckpt_staging_bytes", lab)] >= 8192
    assert got[("hpcckpt_checkpoints_total", lab | {("result", "committed")})] == 1
    assert staging_use([staging / me.name / "j7"]).queued == 1
    hook.remove()
    assert not hook.path.exists()
    cat.close()


def test_status_flags_failing_and_stale_jobs(store: Path, me: User) -> None:
    clock = Clock()
    cat = catalog(store, me, clock)
    commit(cat, clock, me, "bad", frozen=0.1, flush=1, size=1, bytes_in=1, ref=0, interval=FIXED)
    for _ in range(3):
        fail(cat, clock, me, "bad")
    commit(cat, clock, me, "good", frozen=0.1, flush=1, size=1, bytes_in=1, ref=0, interval=FIXED)
    commit(cat, clock, me, "quiet", frozen=0.1, flush=1, size=1, bytes_in=1, ref=0, interval=FIXED)
    jobs = load_jobs(cat, uid=me.uid)
    cat.close()
    now = clock.now + 5

    def live(job_id: str, uid: int) -> Liveness:
        return Liveness(True, "n1", 1, "test") if job_id == "quiet" else Liveness(None, "", None, "test")

    by_job = {s.job_id: s for s in job_statuses(jobs, now=now, live=live)}
    assert [w.split(":")[0] for w in by_job["bad"].warnings] == ["failing"]
    assert "Connected TCP socket" in by_job["bad"].warnings[0]
    assert by_job["good"].warnings == [] and by_job["quiet"].warnings == []
    later = {s.job_id: s for s in job_statuses(jobs, now=now + 500, live=live)}
    assert [w.split(":")[0] for w in later["quiet"].warnings] == ["stale"], "running, nothing in 2 intervals"
    assert later["good"].warnings == [], "not running here and long quiet: ended, not stale"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def test_report_png_html_and_text(tmp_path: Path, store: Path, me: User, capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    pytest.importorskip("matplotlib")
    clock = Clock()
    cat = catalog(store, me, clock)
    for i in range(4):
        commit(cat, clock, me, "r1", frozen=0.2 + i / 10, flush=1.5, size=1 << 20, bytes_in=4 << 20,
               ref=(3 << 20) if i else 0, interval=AUTO)
    fail(cat, clock, me, "r1")
    cat.record_job_event("r1", uid=me.uid, event="restore", detail="2", node="n2")
    cat.close()
    png, page = tmp_path / "r.png", tmp_path / "r.html"
    assert main(["report", "r1", "--store", str(store), "--output", str(png)]) == 0
    assert main(["report", "r1", "--store", str(store), "--output", str(page)]) == 0
    w, h = _png_size(png.read_bytes())
    assert (w, h) == (1100, 1300) and 30_000 < png.stat().st_size < 2_000_000
    doc = page.read_text()
    assert "data:image/png;base64," in doc
    series = json.loads(doc.split('<script type="application/json" id="series">')[1].split("</script>")[0])
    assert [a["frozen_s"] for a in series["attempts"]][:4] == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert series["restores"][0]["ckptid"] == "2"
    assert "<td>failed</td>" in doc
    assert main(["report", "r1", "--store", str(store)]) == 0
    text = capsys.readouterr().out
    assert "4 checkpoints committed, 1 failed" in text and "restores: 1" in text
