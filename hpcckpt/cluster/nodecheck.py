"""Can this node checkpoint? The Prolog's question, answered cheaply.

The answer comes from ``hpcckpt doctor``'s required checks (CRIU present and
passing ``criu check``, PID namespaces). ``criu check`` takes a noticeable
fraction of a second and a node's answer rarely changes, so the Prolog caches
it in a root-only file for ``ttl`` seconds, keyed by the criu binary and the
kernel: an upgrade of either invalidates the cache at once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.core import doctor
from hpcckpt.errors import HpcckptError

_log = hlog.get("slurm.nodecheck")
DEFAULT_CACHE = Path(os.environ.get("HPCCKPT_NODECHECK_CACHE", "/run/hpcckpt/nodecheck.json"))
DEFAULT_TTL = 600.0


def doctor_problems() -> list[str]:
    """Failed required node checks from ``hpcckpt doctor``, as one line each."""
    problems: list[str] = []
    checks = [*doctor.check_criu(), doctor.check_pid_namespace()]
    for check in checks:
        if check.required and not check.ok:
            problems.append(f"{check.name}: {check.detail}")
    return problems


def _cache_key() -> str:
    criu = shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin") or ""
    mtime = 0
    if criu:
        try:
            mtime = os.stat(criu).st_mtime_ns
        except OSError:
            pass
    return f"{criu}:{mtime}:{os.uname().release}"


def node_problems(
    *,
    check: Callable[[], list[str]] = doctor_problems,
    cache: Path | None = DEFAULT_CACHE,
    ttl: float = DEFAULT_TTL,
    clock: Callable[[], float] = time.time,
) -> list[str]:
    """Problems that stop this node from checkpointing; [] when it can."""
    key = _cache_key()
    if cache is not None:
        try:
            doc = json.loads(cache.read_text())
            if doc.get("key") == key and clock() - float(doc.get("when", 0)) < ttl:
                return [str(p) for p in doc.get("problems", [])]
        except (OSError, ValueError, TypeError):
            pass  # no cache or an unreadable one: check afresh
    try:
        problems = check()
    except HpcckptError as err:
        problems = [err.message]
    if cache is not None:
        try:
            cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "when": clock(), "problems": problems}))
            os.replace(tmp, cache)
        except OSError as exc:
            hlog.event(_log, "slurm.nodecheck.cache", f"cannot cache the node check in {cache}: {exc}",
                       level=30)
    return problems
