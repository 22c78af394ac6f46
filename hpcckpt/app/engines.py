"""Which app engine a ``hpcckpt run --engine app`` (or the resume of one) uses, and what is recorded for it.

``--app-files GLOB`` chooses the ``files`` engine (the program's own restart
files, :mod:`hpcckpt.app.files_engine`); without it the program is taken to
use the ``hpcckpt.Checkpointer`` API (:mod:`hpcckpt.app.api_engine`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hpcckpt.app.api_engine import api_engine
from hpcckpt.app.files_engine import files_engine
from hpcckpt.app.signals import signal_number
from hpcckpt.core.runner.engines import EngineFactory
from hpcckpt.core.runner.relaunch import launch_record
from hpcckpt.errors import UsageError


def engine_record(argv: Sequence[str], cwd: str, env: Mapping[str, str], *, app_files: Sequence[str],
                  app_signal: str | None) -> dict[str, Any]:
    """What ``run`` records so that ``resume`` starts the same program the same way."""
    if app_signal and not app_files:
        raise UsageError("--app-signal asks a program to write its restart files: it needs --app-files",
                         hint="a program using hpcckpt.Checkpointer needs neither")
    if app_signal:
        signal_number(app_signal)  # refused now, not at the first interval
    if app_files:
        return launch_record("files", argv, cwd, env, app_files=list(app_files), app_signal=app_signal)
    return launch_record("api", argv, cwd, env)


def engine_factory(record: Mapping[str, Any]) -> EngineFactory:
    """The engine a launch record names."""
    if record.get("engine") == "files":
        files = record.get("app_files")
        sig = record.get("app_signal")
        return files_engine([str(f) for f in files] if isinstance(files, list) else [],
                            str(sig) if sig else None)
    if record.get("engine") == "api":
        return api_engine
    raise UsageError(f"the job was recorded with an unknown engine {record.get('engine')!r}")
