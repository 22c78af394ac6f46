"""Issue 17, with real CRIU: a failed resume loses nothing, images are bound to their rows, chains have fallbacks.

- A finished job (its output grew past its checkpoints) resumed by mistake,
  where CRIU fails after the output was cut back: the port the job listened
  on is taken. Every file is byte-identical afterwards (times included).
- The same with a failing engine injected through the engine interface,
  streamed and unpacked, so the put-back is tested apart from CRIU's reasons.
- A library the job had mapped is gone: refused before any file is touched.
- ``cp ckpt-A.hck ckpt-B.hck``: the image is intact but not checkpoint B; the
  resume says so, falls back, marks B corrupt, and ``verify B`` exits 4.
- One flipped byte in any single image of a job with several chains still
  leaves an image that resume restores (the counter goes on).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from hpcckpt.catalog import Status, open_catalog
from hpcckpt.context import current_user
from hpcckpt.core.resume import Resumer
from hpcckpt.criu.engine import Criu
from hpcckpt.criu.interface import DumpOptions, RestoreResult
from hpcckpt.criu.streamer import Source
from hpcckpt.errors import EngineError, IncompatibleError
from hpcckpt.policy.schema import FIELDS
from tests.criu.harness import PROGS, Cmd, hpcckpt, job_pid, kill_everything, wait_for

pytestmark = [pytest.mark.criu]
APPENDER = str(PROGS / "appender.py")
COUNTER = str(PROGS / "counter.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def snapshot(*paths: Path) -> dict[str, tuple[str, int, int]]:
    """Content digest, size and mtime of each file: what 'byte-identical to before' compares."""
    out = {}
    for p in paths:
        st = p.stat()
        out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def host_network(work: Path) -> list[str]:
    """``--policy`` for the node's own network where the policy offers the choice: in a network namespace of
    its own (policy job.network: private) the job's port could never clash with the test's."""
    if "job.network" not in FIELDS:
        return []
    path = work / "host-network.yaml"
    path.write_text("job:\n  network: host\n")
    return ["--policy", str(path)]


def finished_job(work: Path, job: str, *extra: str, lines: int = 60, policy: Sequence[str] = ()
                 ) -> tuple[Path, list[int]]:
    """A job that appended to out.txt, was checkpointed twice, ran on and ended with status 0."""
    out = work / "out.txt"
    run = hpcckpt(["run", "--job-id", job, "--interval", "1", *policy, "--", sys.executable, APPENDER, str(out),
                   str(lines), "0.05", *extra], work, "run", work / "store")
    assert run.wait(120) == 0, run.err.read_text()[-2000:]
    ids = [int(str(e["ckptid"])) for e in run.events("checkpoint.committed")]
    assert len(ids) >= 2, "the job ended before two checkpoints"
    assert len(out.read_text().splitlines()) == lines
    return out, ids


def tails_left(work: Path) -> list[Path]:
    return sorted((work / "staging").rglob("tails-*"))


def test_resume_failing_after_cutback_leaves_output_identical(work: Path) -> None:
    """CRIU fails after out.txt was cut back (the job's port is taken): out.txt is as it was."""
    port = free_port()
    policy = host_network(work)
    out, ids = finished_job(work, "fin", str(port), policy=policy)
    before = snapshot(out)
    # What a resume killed between its cut-back and CRIU's end would have left: warned about, untouched.
    stale = work / "staging" / current_user().name / "fin" / "tails-1-1"
    stale.mkdir(parents=True)
    (stale / "tails.json").write_text("[]")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        res = hpcckpt(["resume", "fin", "--force", "--interval", "1000", *policy], work, "resume", work / "store")
        assert res.wait(120) == EngineError.exit_code, res.err.read_text()[-2000:]
    err = res.err.read_text()
    assert "Address already in use" in err
    # It did cut out.txt back (for each image it tried), and put it back each time before the next try.
    cut = res.events("resume.truncated")
    assert [e["path"] for e in cut] == [str(out)] * len(ids)
    assert len(res.events("resume.untruncated")) == len(ids)
    assert snapshot(out) == before
    assert tails_left(work) == [stale]
    assert [e["path"] for e in res.events("resume.tails_left")][:1] == [str(stale)]


class FailingEngine:
    """The real engine, except that its restore lets the last checks run (the cut-back) and then fails."""

    name = "criu"

    def __init__(self, real: Criu) -> None:
        self.real = real
        self.restores = 0

    def version(self) -> str:
        return self.real.version()

    def dump(self, *a: object, **k: object) -> object:
        raise AssertionError("not used")

    def restore(self, images_dir: Path, *, options: DumpOptions, inherit_fds: Mapping[int, str] | None = None,
                timeout: float | None = None, source: Source | None = None,
                gate: Callable[[], None] | None = None, lazy_pages: bool = False) -> RestoreResult:
        self.restores += 1
        if gate is not None:
            gate()
        raise EngineError("injected: criu restore failed after the files were cut back")

    def cpuinfo_dump(self, images_dir: Path) -> None:
        self.real.cpuinfo_dump(images_dir)

    def cpuinfo_check(self, images_dir: Path) -> tuple[bool, str]:
        return self.real.cpuinfo_check(images_dir)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "unpacked"])
def test_injected_engine_failure_puts_every_tail_back(work: Path, stream: bool) -> None:
    out, ids = finished_job(work, "inj")
    before = snapshot(out)
    me = current_user()
    cat = open_catalog(None, work / "store", me)
    engine = FailingEngine(Criu.locate())
    resumer = Resumer(engine=engine, catalog=cat, user=me, disk_staging=work / "staging",  # type: ignore[arg-type]
                      options=DumpOptions(), stream=stream)
    with pytest.raises(EngineError, match="injected"):
        resumer.resume("inj")
    assert engine.restores == len(ids)  # every image tried, newest first, each after the last one's put-back
    assert snapshot(out) == before
    assert tails_left(work) == []
    # An engine failure is not the image's fault: nothing is marked corrupt.
    assert {r.status for r in cat.list("inj")} == {Status.COMMITTED}
    cat.close()


def test_removed_library_is_refused_before_any_file_is_touched(work: Path) -> None:
    lib = work / "libcopy.so"
    import ctypes.util

    name = ctypes.util.find_library("z")
    assert name, "no libz to copy"
    found = next(p for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")
                 if (p := Path(d) / name).exists())
    shutil.copy(found, lib)
    out, _ = finished_job(work, "lib", "0", str(lib))
    before = snapshot(out)
    lib.unlink()
    res = hpcckpt(["resume", "lib", "--force", "--interval", "1000"], work, "resume", work / "store")
    assert res.wait(120) == IncompatibleError.exit_code
    err = res.err.read_text()
    assert f"{lib}: no longer exists" in err and "no file was changed" in err
    assert res.events("resume.truncated") == [] and res.events("resume.fallback") == []
    assert snapshot(out) == before


def start_counter(work: Path, job: str, policy: Path | None = None) -> Cmd:
    args = ["run", "--job-id", job, "--interval", "1"]
    if policy is not None:
        args += ["--policy", str(policy)]
    return hpcckpt([*args, "--", sys.executable, COUNTER, "100000", "0.05"], work, "run", work / "store")


def committed(cmd: Cmd) -> list[int]:
    return [int(str(e["ckptid"])) for e in cmd.events("checkpoint.committed")]


def resume_and_stop(work: Path, job: str, tag: str) -> Cmd:
    res = hpcckpt(["resume", job, "--interval", "1000"], work, tag, work / "store")
    wait_for(lambda: len(res.lines()) >= 3 or res.proc.poll() is not None, 60, "output after the resume")
    if res.proc.poll() is None:
        res.proc.send_signal(signal.SIGTERM)
    res.wait(60)
    return res


def list_json(work: Path, job: str) -> list[dict[str, object]]:
    cmd = hpcckpt(["list", "--json", job], work, "list", work / "store")
    assert cmd.wait(60) == 0
    return list(json.loads(cmd.out.read_text()))


def test_copied_image_is_not_the_checkpoint_its_row_names(work: Path) -> None:
    """cp ckpt-A.hck ckpt-B.hck: resume falls back to a correct image and says why; verify B exits 4."""
    run = start_counter(work, "cp")
    pid = job_pid("cp")
    wait_for(lambda: len(committed(run)) >= 3, 60, "three checkpoints")
    kill_everything(run, pid)
    printed = [int(x) for x in run.lines()]
    ids = committed(run)
    rows = {int(str(r["ckptid"])): r for r in list_json(work, "cp")}
    live = sorted(c for c, r in rows.items() if r["status"] == "committed")
    newest, older = live[-1], live[0]
    shutil.copyfile(str(rows[older]["path"]), str(rows[newest]["path"]))

    res = resume_and_stop(work, "cp", "resume")
    err = res.err.read_text()
    assert res.proc.returncode == 85, err[-2000:]
    assert f"checkpoint {newest} of job cp cannot be restored" in err
    assert f"is not checkpoint {newest}: the header says checkpoint {older}" in err
    resumed = int(err.split("resumed from checkpoint ")[1].split()[0])
    assert resumed != newest and resumed in ids
    after = [int(x) for x in res.lines()]
    assert after[0] > 0 and after[0] - 1 in printed  # a real checkpointed state, not the copy

    status = {int(str(r["ckptid"])): r["status"] for r in list_json(work, "cp")}
    assert status[newest] == "corrupt"
    ver = hpcckpt(["verify", str(newest)], work, "verify", work / "store")
    assert ver.wait(60) == 4
    assert f"is not checkpoint {newest}: the header says checkpoint {older}" in ver.out.read_text()


def test_verify_marks_the_copy_corrupt_and_resume_skips_it(work: Path) -> None:
    """The reproduction in the other order: verify first (exit 4, marked), then resume skips it and says so."""
    run = start_counter(work, "cq")
    pid = job_pid("cq")
    wait_for(lambda: len(committed(run)) >= 3, 60, "three checkpoints")
    kill_everything(run, pid)
    rows = {int(str(r["ckptid"])): r for r in list_json(work, "cq") if r["status"] == "committed"}
    newest, older = max(rows), min(rows)
    shutil.copyfile(str(rows[older]["path"]), str(rows[newest]["path"]))
    ver = hpcckpt(["verify", str(newest)], work, "verify", work / "store")
    assert ver.wait(60) == 4
    text = ver.out.read_text()
    assert f"is not checkpoint {newest}: the header says checkpoint {older}" in text
    assert "marked corrupt in the catalog" in text
    listed = hpcckpt(["list", "cq"], work, "list-table", work / "store")
    assert listed.wait(60) == 0
    assert any(line.split()[:1] == [str(newest)] and "corrupt" in line.split()
               for line in listed.out.read_text().splitlines())
    res = resume_and_stop(work, "cq", "resume")
    err = res.err.read_text()
    assert res.proc.returncode == 85, err[-2000:]
    assert f"checkpoint {newest} of job cq is marked corrupt" in err
    resumed = int(err.split("resumed from checkpoint ")[1].split()[0])
    assert resumed < newest


def consecutive(vals: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(vals))


def test_one_flipped_byte_in_any_image_leaves_one_to_resume(work: Path) -> None:
    """Two chains whose incremental images refer to their base's chunks; each retained image in turn gets one
    flipped byte (in its chunk data, and in its header): a resume still restores the job, from an image that
    does not depend on the damaged one."""
    policy = work / "chain.yaml"
    policy.write_text("retention:\n  keep_last: 4\npipeline:\n  full_every: 8\n  max_chain_ratio: 100\n"
                      "  chunk_size: 256K\nstorage:\n  compression:\n    codec: none\n")
    run = hpcckpt(["run", "--job-id", "flip", "--interval", "1", "--policy", str(policy), "--", sys.executable,
                   str(PROGS / "ballast_counter.py"), "8", "0.05"], work, "run", work / "store")
    pid = job_pid("flip")
    wait_for(lambda: len(committed(run)) >= 6, 120, "six checkpoints")
    kill_everything(run, pid)
    printed = [int(x) for x in run.lines()]
    rows = [r for r in list_json(work, "flip") if r["status"] == "committed"]
    parents = {int(str(r["ckptid"])): r["parent"] for r in rows}

    def chain(c: int) -> set[int]:
        out = {c}
        while (p := parents.get(c)) is not None:
            c = int(str(p))
            out.add(c)
        return out

    newest = max(parents)
    # The retained images do not all hang on one base: a full image is kept outside the newest chain, and
    # the newest chain really is a chain (its images refer to their base's chunks).
    assert any(parents[c] is None and c not in chain(newest) for c in parents), parents
    assert len(chain(newest)) >= 3, parents
    pristine = work / "pristine"
    shutil.copytree(work / "store", pristine, symlinks=True)
    fell_back_past_the_chain = False
    for row, where in itertools.product(rows, ("data", "header")):
        victim_id = int(str(row["ckptid"]))
        victim = Path(str(row["path"]))
        shutil.rmtree(work / "store")
        shutil.copytree(pristine, work / "store", symlinks=True)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2 if where == "data" else 64] ^= 0x01
        victim.write_bytes(bytes(data))
        res = resume_and_stop(work, "flip", f"resume-{victim_id}-{where}")
        err = res.err.read_text()
        assert res.proc.returncode == 85, f"flipped a byte ({where}) of checkpoint {victim_id}:\n{err[-3000:]}"
        after = [int(x) for x in res.lines()]
        assert after and after[0] > 0 and after[0] - 1 in printed and consecutive(after), (victim_id, after[:5])
        resumed = int(err.split("resumed from checkpoint ")[1].split()[0])
        # What the restored image took data from: itself and the parents it refers to (not every image
        # up its parent links: an image refers only to the ones holding chunks it did not store again).
        used = {resumed, *res.events("resume.restored")[0]["parents"]}
        if where == "header":  # a damaged header is found by whoever opens the image, a child included
            assert victim_id not in used, (victim_id, where, resumed, used, parents)
        fell_back_past_the_chain |= resumed not in chain(newest)
    assert fell_back_past_the_chain, "no damaged image made the resume leave the newest chain"
