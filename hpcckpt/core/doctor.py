"""`hpcckpt doctor`: can this node checkpoint, and if not, what to do about it.

Each check is a small function returning a :class:`Check`. ``required``
checks decide the exit status: doctor exits 0 only when ``hpcckpt run`` can
really checkpoint here. Informational checks (Slurm, MPI, soft-dirty) only
report.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpcckpt.catalog import open_catalog
from hpcckpt.context import User, current_user
from hpcckpt.core.launch import network
from hpcckpt.criu.engine import Criu
from hpcckpt.errors import HpcckptError
from hpcckpt.fs.layout import StoreLayout
from hpcckpt.fs.safe import STORE_HINT
from hpcckpt.store.site import Site


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorInputs:
    store_root: Path
    catalog_url: str | None
    user: User


def check_criu() -> list[Check]:
    try:
        criu = Criu.locate()
    except HpcckptError as err:
        return [Check("criu", False, err.message, fix=err.hint or "")]
    try:
        version = criu.version()
    except HpcckptError as err:
        return [Check("criu", False, f"{criu.path}: {err.message}", fix=err.hint or "")]
    out = [Check("criu", True, f"{criu.path}, version {version}")]
    ok, text = criu.check()
    last = text.strip().splitlines()[-1] if text.strip() else ""
    out.append(
        Check(
            "criu check",
            ok,
            last if ok else f"'criu check' failed on kernel {os.uname().release}: {last}",
            fix="" if ok else "build CRIU >= 4.2 for this kernel: sudo scripts/setup.sh (see docs/install.md)",
        )
    )
    if os.getuid() != 0:
        caps = criu.unprivileged_capable()
        out.append(
            Check(
                "criu capabilities",
                caps,
                "criu has cap_checkpoint_restore and cap_sys_ptrace"
                if caps
                else f"{criu.path} lacks the file capabilities ordinary users need",
                fix="" if caps else f"as root: setcap cap_sys_ptrace,cap_checkpoint_restore=eip {criu.path}",
            )
        )
    dirty = criu.has_feature("mem_dirty_track")
    out.append(
        Check(
            "soft-dirty tracking",
            dirty,
            "available: criu pre-dump --track-mem can shorten freezes"
            if dirty
            else "not available on this kernel; hpcckpt dedupes unchanged memory itself",
            required=False,
        )
    )
    return out


def check_pid_namespace() -> Check:
    unshare = shutil.which("unshare")
    if not unshare:
        return Check("pid namespace", False, "the 'unshare' command is missing", fix="apt-get install util-linux")
    argv = [unshare, "--pid", "--fork", "--kill-child", "true"]
    if os.getuid() != 0:
        argv = [unshare, "--user", "--map-root-user", "--pid", "--fork", "true"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Check("pid namespace", False, f"cannot run unshare: {err}")
    if proc.returncode == 0:
        return Check("pid namespace", True, "jobs can run in their own PID namespace")
    return Check(
        "pid namespace",
        False,
        f"cannot create a PID namespace: {proc.stderr.strip() or proc.returncode}",
        fix="run as root, or allow user namespaces (sysctl kernel.unprivileged_userns_clone=1)",
    )


def check_store(inputs: DoctorInputs) -> Check:
    udir = inputs.store_root / inputs.user.name
    try:
        udir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix=".doctor-", dir=udir)
        try:
            os.write(fd, b"hpcckpt doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        return Check(
            "store",
            False,
            f"store {udir} is not writable: {err.strerror or err}",
            fix=STORE_HINT,
        )
    free = shutil.disk_usage(udir).free
    return Check("store", True, f"{udir} is writable ({free / 2**30:.1f} GiB free)")


def check_catalog(inputs: DoctorInputs) -> Check:
    try:
        cat = open_catalog(inputs.catalog_url, inputs.store_root, inputs.user)
        try:
            n = len(cat.list(uid=inputs.user.uid))
        finally:
            cat.close()
    except HpcckptError as err:
        return Check("catalog", False, err.message, fix=err.hint or "")
    except OSError as err:  # doctor reports what is wrong; it never dies of it
        return Check("catalog", False, f"cannot open the catalog: {err}", fix=STORE_HINT)
    where = inputs.catalog_url or str(StoreLayout(inputs.store_root).catalog_file(inputs.user))
    return Check("catalog", True, f"{where} opens ({n} checkpoints)")


def check_slurm() -> Check:
    found = [c for c in ("sbatch", "scontrol", "squeue") if shutil.which(c)]
    if len(found) == 3:
        return Check("slurm", True, "sbatch, scontrol and squeue found", required=False)
    return Check(
        "slurm",
        False,
        "Slurm commands not found: hpcckpt works without Slurm, but cannot requeue jobs",
        required=False,
    )


def check_mpi4py() -> Check:
    if importlib.util.find_spec("mpi4py") is not None:
        return Check("mpi4py", True, "installed: application-assisted MPI checkpoints work", required=False)
    return Check(
        "mpi4py",
        False,
        "not installed: needed only for application-assisted MPI checkpoints",
        required=False,
        fix="pip install 'hpcckpt[mpi]'",
    )


def check_network() -> list[Check]:
    """Whether jobs can have a network namespace of their own, reach the outside from it, and which lock
    CRIU would use for a job on the node's own network (policy job.network: host)."""
    unshare = shutil.which("unshare")
    argv = [unshare or "unshare", *(["--user", "--map-root-user"] if os.getuid() != 0 else []), "--net", "true"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        ok, why = proc.returncode == 0, proc.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        ok, why = False, str(err)
    out = [Check("network namespace", ok,
                 "jobs get a network namespace of their own (job.network: private)" if ok
                 else f"cannot create a network namespace: {why}",
                 fix="" if ok else "allow user namespaces, or set job.network: host in the site policy")]
    helper = network.helper_path()
    tun = Path("/dev/net/tun")
    tun_ok = tun.exists() and (os.getuid() == 0 or os.access(tun, os.R_OK | os.W_OK))
    out.append(Check("outside link", bool(helper and tun_ok),
                     f"{helper}: private jobs reach the outside (outbound only)" if helper and tun_ok
                     else ("slirp4netns is not installed" if not helper else "/dev/net/tun is not usable by you")
                     + ": private jobs have loopback only",
                     fix="" if helper and tun_ok else "apt-get install slirp4netns; chmod 0666 /dev/net/tun "
                     "(udev's default)", required=False))
    lock = ("iptables" if shutil.which("iptables-restore") else "nftables" if shutil.which("nft") else None)
    out.append(Check("network lock", lock is not None,
                     "private jobs need none; jobs with job.network: host lock with "
                     + (lock or "nothing: neither iptables nor nftables is installed"),
                     fix="" if lock else "apt-get install nftables (only for job.network: host)", required=False))
    return out


def run_checks(inputs: DoctorInputs) -> list[Check]:
    checks: list[Check] = []
    steps: list[Callable[[], Check | list[Check]]] = [
        check_criu,
        check_pid_namespace,
        check_network,
        lambda: check_store(inputs),
        lambda: check_catalog(inputs),
        check_slurm,
        check_mpi4py,
    ]
    for step in steps:
        result = step()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def all_required_ok(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.required)


def default_inputs(site: Site) -> DoctorInputs:
    return DoctorInputs(site.store_root, site.catalog_url, current_user())
