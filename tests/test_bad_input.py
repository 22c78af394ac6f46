"""Input a user can give gets a clear error with the documented exit code: never a traceback, never a hang.

Each test runs the real CLI as a subprocess, as a user would (as root, or as
the test user alice where the point is what an ordinary user may not do),
and reproduces one report of issue 17.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hpcckpt.exitcodes import (
    EXIT_BROKEN_PIPE,
    EXIT_CATALOG,
    EXIT_ENGINE,
    EXIT_PERMISSION,
    EXIT_STORE,
    EXIT_UNREADABLE,
    EXIT_USAGE,
)
from hpcckpt.inputs import CKPTID_MAX

REPO = Path(__file__).resolve().parents[1]
# Far above what any of these commands takes; only a hang reaches it.
HANG_S = 60
HUGE = "99999999999999999999"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: this tree's code, a fresh store, no ambient policy."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("HPCCKPT_", "SLURM_"))}
    out.update(PYTHONPATH=str(REPO), HPCCKPT_STORE=str(tmp_path / "store"), HPCCKPT_LOG_FORMAT="human")
    return out


def hpcckpt(args: Sequence[str], env: dict[str, str], stdout: int = subprocess.PIPE,
            ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hpcckpt", *args], env=env, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=HANG_S, check=False)
    assert "Traceback" not in (proc.stdout or "") + proc.stderr, proc.stderr
    return proc


# -- a closed output pipe -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["list", "--json"], ["policy", "show", "--json"], ["--help"], ["list", "--help"],
                                  ["verify", "/no/such/image.hck"]])
def test_closed_stdout_ends_quietly(args: list[str], env: dict[str, str]) -> None:
    """`hpcckpt list --json | head -c 10`: the reader is gone before we write; no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # as head does once it has its 10 bytes
    try:
        proc = hpcckpt(args, env, stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr
    assert proc.stderr == ""


# -- checkpoint ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["verify", HUGE], ["info", HUGE], ["verify", "0"], ["info", "1" + "0" * 400],
                                  ["info", str(CKPTID_MAX + 1)], ["resume", "job", "--ckpt", HUGE],
                                  ["resume", "job", "--ckpt", "0"], ["resume", "job", "--ckpt", "-3"]])
def test_ckptid_out_of_range_is_a_usage_error(args: list[str], env: dict[str, str]) -> None:
    proc = hpcckpt(args, env)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert str(CKPTID_MAX) in proc.stdout + proc.stderr  # the message says the valid range
    assert "OverflowError" not in proc.stderr


def test_largest_ckptid_is_looked_up(env: dict[str, str]) -> None:
    proc = hpcckpt(["info", str(CKPTID_MAX)], env)
    assert proc.returncode == 11 and "not in the catalog" in proc.stderr  # NotFoundError, from the real catalog


@pytest.mark.parametrize("arg", ["²", "٣", "1\u200b", " 7"])
def test_non_ascii_digits_are_not_ids(arg: str, env: dict[str, str]) -> None:
    """'²'.isdigit() is True, and int('²') raised ValueError."""
    proc = hpcckpt(["info", arg], env)
    assert proc.returncode == EXIT_UNREADABLE and "no such image file" in proc.stderr


def test_empty_argument(env: dict[str, str]) -> None:
    assert hpcckpt(["info", ""], env).returncode == EXIT_USAGE
    assert hpcckpt(["verify", ""], env).returncode == EXIT_USAGE


# -- files that are not regular ------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["verify", "info"])
def test_fifo_directory_and_device_are_refused_without_blocking(cmd: str, env: dict[str, str],
                                                                tmp_path: Path) -> None:
    fifo = tmp_path / "ckpt-1.hck"
    os.mkfifo(fifo)  # nobody ever writes it: reading it would block forever
    for path, kind in ((fifo, "FIFO"), (tmp_path, "directory"), (Path("/dev/null"), "character device")):
        proc = hpcckpt([cmd, str(path)], env)
        assert proc.returncode == EXIT_UNREADABLE, proc.stderr
        assert f"is a {kind}" in proc.stdout + proc.stderr


def test_symlink_to_fifo_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.hck").symlink_to(tmp_path / "fifo")
    proc = hpcckpt(["info", str(tmp_path / "link.hck")], env)
    assert proc.returncode == EXIT_UNREADABLE and "FIFO" in proc.stderr


# -- as an ordinary user --------------------------------------------------------------------------------


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A 0755 directory the test user can traverse (tmp_path lives under root's 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="hpcckpt-badinput-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_alice(args: Sequence[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("acting as the test user alice needs root")
    from tests.security.users import ensure_user, hpcckpt_as, unreachable_path_component

    alice = ensure_user("alice")
    blocked = unreachable_path_component(REPO, alice)
    if blocked is not None:
        pytest.fail(f"{blocked} is not searchable by the test users; chmod o+rx it")
    proc = hpcckpt_as(alice, args, env={"PYTHONPATH": str(REPO), **(extra_env or {})}, timeout=HANG_S)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.mark.multiuser
@pytest.mark.parametrize("cmd", ["info", "verify"])
def test_unreadable_image_is_a_permission_error(cmd: str, shared_tmp: Path) -> None:
    hidden = shared_tmp / "private"
    hidden.mkdir(mode=0o700)  # root's: alice cannot even look inside
    (hidden / "ckpt-3.hck").write_bytes(b"\x89HCKPT\r\n" + bytes(100))
    locked = shared_tmp / "ckpt-4.hck"
    locked.write_bytes(b"\x89HCKPT\r\n" + bytes(100))
    locked.chmod(0o600)  # alice may see it but not read it
    for path in (hidden / "ckpt-3.hck", locked):
        proc = _as_alice([cmd, str(path)])
        assert proc.returncode == EXIT_PERMISSION, proc.stdout + proc.stderr
        assert "permission denied" in proc.stdout + proc.stderr
        assert "no such image" not in proc.stdout + proc.stderr


# -- stores that cannot be used ------------------------------------------------------------------------


def test_run_with_impossible_store(env: dict[str, str]) -> None:
    proc = hpcckpt(["run", "--store", "/proc/nope", "--", "true"], env)
    assert proc.returncode == EXIT_STORE, proc.stderr
    assert "/proc/nope" in proc.stderr and "hint: pass --store DIR" in proc.stderr


def _doctor_checks(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    assert proc.returncode == EXIT_ENGINE, proc.stderr  # "cannot checkpoint here", not a crash
    return {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


def test_doctor_with_impossible_store(env: dict[str, str]) -> None:
    checks = _doctor_checks(hpcckpt(["doctor", "--json", "--store", "/proc/nope"], env))
    for name in ("store", "catalog"):
        assert not checks[name]["ok"] and "/proc/nope" in str(checks[name]["detail"]), checks[name]
        assert "--store" in str(checks[name]["fix"])


@pytest.mark.multiuser
def test_store_the_user_cannot_write(shared_tmp: Path) -> None:
    store = shared_tmp / "store"  # under a root-owned 0755 dir: alice can neither create it nor write in it
    proc = _as_alice(["run", "--store", str(store), "--", "true"])
    assert proc.returncode == EXIT_STORE, proc.stderr
    assert str(store) in proc.stderr and "Permission denied" in proc.stderr and "hint:" in proc.stderr
    proc = _as_alice(["doctor", "--json", "--store", str(store)])
    checks = _doctor_checks(proc)
    assert not checks["store"]["ok"] and not checks["catalog"]["ok"]
    assert str(store) in str(checks["catalog"]["detail"])


@pytest.fixture
def full_disk(shared_tmp: Path) -> Iterator[Path]:
    """A tiny tmpfs, filled up: every write there fails with ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = shared_tmp / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "hpcckpt-test-full", str(mnt)], check=True)
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, bytes(4096)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_store_on_a_full_disk(env: dict[str, str], full_disk: Path) -> None:
    store = full_disk / "store"
    proc = hpcckpt(["run", "--store", str(store), "--", "true"], env)
    assert proc.returncode in (EXIT_STORE, EXIT_CATALOG), proc.stderr
    assert str(store) in proc.stderr and "full: free space there" in proc.stderr  # not "damaged: rebuild"
    checks = _doctor_checks(hpcckpt(["doctor", "--json", "--store", str(store)], env))
    assert not checks["store"]["ok"] and "No space left" in str(checks["store"]["detail"])
    assert not checks["catalog"]["ok"] and str(store) in str(checks["catalog"]["detail"])


# -- other flags a hostile user fills with nonsense ------------------------------------------------------


@pytest.mark.parametrize("args", [["checkpoint", "J", "--timeout", "nan"], ["checkpoint", "J", "--timeout", "-1"],
                                  ["checkpoint", "J", "--deadline", "inf"], ["resume", "J", "--deadline", "0"],
                                  ["run", "--deadline", "nan", "--", "true"], ["gc", "--dry-run", "--grace", "nan"],
                                  ["gc", "--dry-run", "--stale-after", "soon"],
                                  ["run", "--signal", "NOPE", "--", "true"], ["run", "--signal", "KILL", "--", "true"]])
def test_bad_seconds_durations_and_signals_are_usage_errors(args: list[str], env: dict[str, str]) -> None:
    """These were ValueError / AttributeError tracebacks (exit 1) from deep inside the runner and gc."""
    proc = hpcckpt(args, env)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    bad = args[-1] if args[-2] != "--" else args[-3]
    assert repr(bad) in proc.stderr  # the message quotes the bad value


@pytest.mark.parametrize("args", [["checkpoint", ""], ["resume", ""], ["checkpoint", "a/b"], ["resume", "x" * 300]])
def test_job_id_no_run_could_have_is_a_usage_error(args: list[str], env: dict[str, str]) -> None:
    proc = hpcckpt(args, env)
    assert proc.returncode == EXIT_USAGE and "invalid job id" in proc.stderr, proc.stderr
