"""Preemption signals for application-assisted checkpoints, in one place.

Slurm announces preemption and the end of a time limit with a signal
(SIGTERM, or what ``--signal`` asks for). The handler only raises a flag:
the program is in the middle of a step, possibly inside an MPI collective,
and the only safe place to checkpoint is the next ``due()`` call, where the
ranks agree on it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from hpcckpt.errors import PolicyError

Handler = Callable[[int, FrameType | None], Any] | int | None


def signal_number(name: str) -> int:
    """``"TERM"``, ``"SIGTERM"``, ``"15"`` -> 15; PolicyError for anything else."""
    text = name.strip().upper()
    if text.isdigit():
        num = int(text)
        if num in {s.value for s in signal.Signals}:
            return num
    else:
        full = text if text.startswith("SIG") else f"SIG{text}"
        if full in signal.Signals.__members__ and full not in ("SIGKILL", "SIGSTOP"):
            return int(signal.Signals[full])
    raise PolicyError(
        f"preemption signal {name!r} is not a signal that can be caught",
        hint="use a name such as TERM, USR1 or USR2 (policy preemption.signals, --app-signal)",
    )


class PreemptFlag:
    """Raised by any of the given signals; ``install`` only works in the main thread.

    A handler the program had before is still called after the flag is set,
    so installing a Checkpointer does not silently disable the program's own
    signal handling.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self._saved: dict[int, Handler] = {}

    def install(self, names: Sequence[str]) -> None:
        for name in names:
            num = signal_number(name)
            if num in self._saved:
                continue
            self._saved[num] = signal.signal(num, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._event.set()
        previous = self._saved.get(signum)
        if callable(previous):
            previous(signum, frame)

    def raise_flag(self, signum: int = 0) -> None:
        """Set the flag by hand (for example from a program's own handler)."""
        self.signum = signum
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()

    def uninstall(self) -> None:
        for num, previous in self._saved.items():
            signal.signal(num, previous if previous is not None else signal.SIG_DFL)
        self._saved.clear()
