"""Checkpoint and restart as an ordinary user: criu --unprivileged with file capabilities, no root anywhere.

The job runs in a user + mount + PID namespace of its own (uid 0 inside is
the caller outside, see hpcckpt.core.launch.spawn); criu dumps it from inside
that user namespace and restores it as root of a fresh one. These tests run
the real launcher and the real CRIU adapter as alice (a real account, via
setpriv, with no capabilities inherited), SIGKILL the job, restore it, and
check that it goes on from the checkpointed state, as alice, as our child,
as pid 1 of a new PID namespace. Bob restoring a copy of alice's images gets
a process with bob's credentials only: the kernel cannot map any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.security.conftest import CRIU
from tests.security.users import REPO, UnixUser, hpcckpt_as, run_as, venv_bin

pytestmark = [pytest.mark.criu, pytest.mark.multiuser, pytest.mark.timeout(180)]

# A job whose state lives only in its memory: after a restore it must go on from the checkpointed
# value, not start again at 0. It opens the file anew on each step, so no file of it is held open.
COUNTER = """\
import sys, time
i = 0
while True:
    with open(sys.argv[1], "a") as f:
        f.write(f"{i}\\n")
    i += 1
    time.sleep(0.2)
"""

# Run as the test user: start, checkpoint twice, SIGKILL, restore, report (JSON on stdout).
DRIVER = """\
import json, os, signal, sys, time
from pathlib import Path
from hpcckpt.criu.interface import DumpOptions
from hpcckpt.criu.engine import Criu
from hpcckpt.errors import HpcckptError
from hpcckpt.core.launch.spawn import StdioPipes, spawn_in_pid_namespace

work, counter, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
criu = Criu(sys.argv[4])
report = {}

def lines():
    return [int(x) for x in out.read_text().split()] if out.exists() else []

def wait_lines(n, timeout=20.0):
    end = time.monotonic() + timeout
    while len(lines()) < n and time.monotonic() < end:
        time.sleep(0.05)

def nspid(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return []

def host_uid(pid):
    return os.stat(f"/proc/{pid}").st_uid

try:
    pipes = StdioPipes.create()
    pid = spawn_in_pid_namespace([sys.executable, counter, str(out)], env={"PATH": "/usr/bin:/bin"},
                                 cwd=str(work), pipes=pipes)
    pipes.close_write_ends()
    report["nspid"] = nspid(pid)
    report["uid_map"] = Path(f"/proc/{pid}/uid_map").read_text().split()
    report["host_uid"] = host_uid(pid)
    wait_lines(3)
    images = []
    for n in (1, 2):
        d = work / f"img{n}"
        d.mkdir(mode=0o700)
        criu.dump(pid, d, options=DumpOptions(), after="stopped")
        report[f"count_at_dump{n}"] = lines()[-1]
        os.kill(pid, signal.SIGCONT)  # pid 1 of the namespace; the counter is the whole tree
        images.append(d)
        wait_lines(len(lines()) + 3)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    report["count_at_kill"] = lines()[-1]
    before = len(lines())
    fresh = StdioPipes.create()
    res = criu.restore(images[-1], options=DumpOptions(),
                       inherit_fds={fresh.out_w: pipes.resources["1"], fresh.err_w: pipes.resources["2"]})
    fresh.close_write_ends()
    report["restored_nspid"] = nspid(res.pid)
    report["restored_host_uid"] = host_uid(res.pid)
    report["restored_is_child"] = os.waitpid(res.pid, os.WNOHANG) == (0, 0)
    wait_lines(before + 3)
    report["after_restore"] = lines()[before:]
    again = work / "img3"
    again.mkdir(mode=0o700)
    criu.dump(res.pid, again, options=DumpOptions(), after="kill")
    report["second_generation_dump"] = True
    os.waitpid(res.pid, 0)
except HpcckptError as err:
    report["error"] = err.render() + "\\n" + getattr(err, "log_excerpt", "")
print(json.dumps(report))
"""

# Run as bob: restore a directory of CRIU images with the adapter, report the restored task's owner.
BOB_RESTORE = """\
import json, os, signal, sys
from pathlib import Path
from hpcckpt.criu.interface import DumpOptions
from hpcckpt.criu.engine import Criu
from hpcckpt.errors import HpcckptError
report = {}
try:
    res = Criu(sys.argv[2]).restore(Path(sys.argv[1]), options=DumpOptions())
    report["host_uid"] = os.stat(f"/proc/{res.pid}").st_uid
    os.kill(res.pid, signal.SIGKILL)
    os.waitpid(res.pid, 0)
except HpcckptError as err:
    report["error"] = type(err).__name__ + ": " + err.render()
print(json.dumps(report))
"""


def _need_caps() -> None:
    if not CRIU.is_file():
        pytest.skip(f"criu not found at {CRIU}")
    caps = subprocess.run(["getcap", str(CRIU)], capture_output=True, text=True, check=False).stdout
    if "cap_checkpoint_restore" not in caps or "cap_sys_ptrace" not in caps:
        pytest.fail(f"{CRIU} lacks its file capabilities ({caps.strip()!r}); run scripts/setup.sh")


def _user_dir(parent: Path, name: str, user: UnixUser) -> Path:
    d = parent / name
    d.mkdir(mode=0o700)
    os.chown(d, user.uid, user.gid)
    return d


def _drive(user: UnixUser, work: Path) -> dict[str, object]:
    (work / "counter.py").write_text(COUNTER)
    (work / "driver.py").write_text(DRIVER)
    for p in (work / "counter.py", work / "driver.py"):
        os.chown(p, user.uid, user.gid)
    res = run_as(user, [str(venv_bin() / "python"), str(work / "driver.py"), str(work), str(work / "counter.py"),
                        str(work / "count.txt"), str(CRIU)],
                 env={"PYTHONPATH": str(REPO)}, cwd=work, timeout=120)
    assert res.returncode == 0, f"driver failed: {res.stderr}"
    report: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    assert "error" not in report, report["error"]
    return report


@pytest.fixture
def alice_cycle(alice: UnixUser, shared_tmp: Path) -> tuple[dict[str, object], Path]:
    _need_caps()
    work = _user_dir(shared_tmp, "alice", alice)
    return _drive(alice, work), work


def test_alice_job_runs_as_pid1_of_its_own_namespaces(alice: UnixUser,
                                                      alice_cycle: tuple[dict[str, object], Path]) -> None:
    report, _ = alice_cycle
    nspid = report["nspid"]
    assert isinstance(nspid, list) and len(nspid) == 2 and nspid[1] == 1, nspid
    # Root inside is alice outside, and nothing else is mapped.
    assert report["uid_map"] == ["0", str(alice.uid), "1"]
    assert report["host_uid"] == alice.uid


def test_alice_restores_her_job_after_sigkill_and_it_goes_on(alice: UnixUser,
                                                               alice_cycle: tuple[dict[str, object], Path]) -> None:
    report, _ = alice_cycle
    at_dump = report["count_at_dump2"]
    at_kill = report["count_at_kill"]
    after = report["after_restore"]
    assert isinstance(at_dump, int) and isinstance(at_kill, int) and isinstance(after, list)
    assert at_kill > at_dump, "the job did not run on between the checkpoint and the kill"
    # The restored counter's first step is the one after the checkpoint: its memory came back.
    assert after[:3] == [at_dump + 1, at_dump + 2, at_dump + 3], (at_dump, at_kill, after)
    restored = report["restored_nspid"]
    assert isinstance(restored, list) and restored[-1] == 1, restored
    assert report["restored_host_uid"] == alice.uid
    assert report["restored_is_child"] is True
    assert report["second_generation_dump"] is True


def test_bob_restoring_a_copy_of_alices_images_gets_only_bobs_credentials(
    alice: UnixUser, bob: UnixUser, alice_cycle: tuple[dict[str, object], Path], shared_tmp: Path
) -> None:
    _, work = alice_cycle
    # Bob cannot read alice's images where they are.
    bob_dir = _user_dir(shared_tmp, "bob", bob)
    (bob_dir / "restore.py").write_text(BOB_RESTORE)
    os.chown(bob_dir / "restore.py", bob.uid, bob.gid)
    argv = [str(venv_bin() / "python"), str(bob_dir / "restore.py")]
    denied = run_as(bob, [*argv, str(work / "img2"), str(CRIU)], env={"PYTHONPATH": str(REPO)}, cwd=bob_dir)
    assert denied.stdout.strip(), denied.stderr
    report = json.loads(denied.stdout.strip().splitlines()[-1])
    assert "error" in report and "Permission denied" in report["error"], report
    # Given a copy (as if leaked), bob restores a process that is bob's, never alice's.
    copy = bob_dir / "img2"
    shutil.copytree(work / "img2", copy)
    for p in [copy, *copy.iterdir()]:
        os.chown(p, bob.uid, bob.gid)
    stolen = run_as(bob, [*argv, str(copy), str(CRIU)], env={"PYTHONPATH": str(REPO)}, cwd=bob_dir)
    report = json.loads(stolen.stdout.strip().splitlines()[-1])
    # In bob's user namespace uid 0 is bob and no other id exists: the job comes back as bob's, or
    # (here, as its working directory is alice's 0700 one) criu fails cleanly.
    if "error" in report:
        assert report["error"].startswith("EngineError: criu restore"), report
    else:
        assert report["host_uid"] == bob.uid, report
    # No process of alice's runs from bob's restore.
    alices = subprocess.run(["pgrep", "-u", str(alice.uid), "-f", "counter.py"], capture_output=True, text=True,
                            check=False)
    assert alices.stdout.strip() == "", f"alice-owned counter still running: {alices.stdout}"


@pytest.mark.slow
def test_cli_run_checkpoint_kill_resume_as_alice(alice: UnixUser, bob: UnixUser, shared_tmp: Path) -> None:
    _need_caps()
    work = _user_dir(shared_tmp, "cli", alice)
    (work / "counter.py").write_text(COUNTER)
    os.chown(work / "counter.py", alice.uid, alice.gid)
    out = work / "count.txt"
    # As an admin sets it up: a root-owned 0755 root, in which each user gets a 0700 directory.
    (shared_tmp / "store").mkdir(mode=0o755)
    for user in (alice, bob):
        _user_dir(shared_tmp / "store", user.name, user)
        # The per-user tmpfs staging the Slurm prolog makes, when this node has its trusted base.
        shm = Path("/dev/shm/hpcckpt-staging")
        if shm.is_dir() and not (shm / user.name).exists():
            _user_dir(shm, user.name, user)
    store = {"HPCCKPT_STORE": str(shared_tmp / "store")}
    log = (work / "runner.log").open("w")
    argv = [str(venv_bin() / "python"), "-m", "hpcckpt", "run", "--interval", "2", "--job-id", "x", "--",
            "/usr/bin/python3", str(work / "counter.py"), str(out)]
    from tests.security.users import as_user_argv

    env = alice.env({"PYTHONPATH": str(REPO), **store})
    runner = subprocess.Popen(as_user_argv(alice, argv), env=env, cwd=str(work), stdout=subprocess.DEVNULL,
                              stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        committed: list[dict[str, object]] = []
        while time.monotonic() < deadline and len(committed) < 2:
            time.sleep(0.5)
            listed = hpcckpt_as(alice, ["list", "x", "--json"], env=store, cwd=work)
            if listed.returncode == 0:
                doc = json.loads(listed.stdout)
                rows = doc if isinstance(doc, list) else doc.get("checkpoints", [])
                committed = [r for r in rows if r.get("status") == "committed"]
        assert len(committed) >= 2, f"fewer than 2 checkpoints: {committed}"
        # kill -9 of the runner alone: the job, in alice's own namespaces, dies with it (PR_SET_PDEATHSIG).
        runner.kill()
        runner.wait(timeout=10)
        end = time.monotonic() + 30
        while time.monotonic() < end and _counters(alice):
            time.sleep(0.2)
        assert not _counters(alice), "alice's job runs on after its runner was killed"
    finally:
        # A node failure: the runner and the job die at once, no final checkpoint.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
        for line in subprocess.run(["pgrep", "-u", str(alice.uid), "-f", "counter.py"], capture_output=True,
                                   text=True, check=False).stdout.split():
            os.kill(int(line), signal.SIGKILL)
        runner.wait(timeout=10)
    before = [int(x) for x in out.read_text().split()]
    # Bob cannot resume alice's job.
    bobs = hpcckpt_as(bob, ["resume", "x"], env=store, cwd=bob.home, timeout=30)
    assert bobs.returncode == 11, bobs.stderr  # not found: bob sees only his own jobs
    # Asked for a lazy restore: where the kernel refuses an unprivileged userfaultfd (the sysctl at 0, Debian's
    # default) it restores streamed and says why (hpcckpt.core.lazyrestore).
    lazy_pol = work / "lazy.yaml"
    lazy_pol.write_text("restore:\n  lazy: \"on\"\n")
    os.chown(lazy_pol, alice.uid, alice.gid)
    uffd_off = Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "0"
    resumed = subprocess.Popen(as_user_argv(alice, [str(venv_bin() / "python"), "-m", "hpcckpt", "resume", "x",
                                                    "--policy", str(lazy_pol)]),
                               env=env, cwd=str(work), stdout=subprocess.DEVNULL, stderr=log,
                               start_new_session=True)
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end and len(out.read_text().split()) < len(before) + 3:
            time.sleep(0.2)
        after = [int(x) for x in out.read_text().split()][len(before):]
    finally:
        os.killpg(resumed.pid, signal.SIGTERM)
        resumed.wait(timeout=60)
        log.close()
    assert len(after) >= 3, (work / "runner.log").read_text()
    if uffd_off:
        assert "restoring streamed, not lazily" in (work / "runner.log").read_text()
    # It went on from a checkpoint: not from 0, and never past what it had reached when killed.
    assert 0 < after[0] <= before[-1] + 1 and after[1] == after[0] + 1
    assert resumed.returncode == 85, "SIGTERM gives a final checkpoint and 'requeue me'"

    # An admin resumes alice's job on her behalf: root becomes alice first, so the job comes back
    # as alice's (her user namespace maps its uid 0 to her alone) and goes on from the final image.
    count = len(out.read_text().split())
    admin_log = (work / "admin.log").open("w")
    admin = subprocess.Popen([str(venv_bin() / "python"), "-m", "hpcckpt", "resume", "x", "--as-owner", "alice"],
                             env={**os.environ, "PYTHONPATH": str(REPO), **store}, cwd=str(work),
                             stdout=subprocess.DEVNULL, stderr=admin_log, start_new_session=True)
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end and len(out.read_text().split()) < count + 3:
            time.sleep(0.2)
        again = [int(x) for x in out.read_text().split()][count:]
        owners = {os.stat(f"/proc/{p}").st_uid for p in _pids_of(admin.pid)}
    finally:
        os.killpg(admin.pid, signal.SIGTERM)
        admin.wait(timeout=60)
        admin_log.close()
    assert len(again) >= 3, (work / "admin.log").read_text()
    total = [int(x) for x in out.read_text().split()][:count]
    assert again[0] == total[-1] + 1, "root's resume went on from alice's final checkpoint"
    assert owners == {alice.uid}, f"the admin's resume runs as alice only, found uids {owners}"


def _counters(user: UnixUser) -> list[str]:
    """Live (not zombie) counter.py processes of ``user``."""
    found = subprocess.run(["pgrep", "-u", str(user.uid), "-f", "counter.py"], capture_output=True, text=True,
                           check=False).stdout.split()
    alive = []
    for pid in found:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def _pids_of(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    import psutil

    try:
        proc = psutil.Process(root)
        return [proc.pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []
