"""What the image header records about the machine it was taken on.

Restore compares these with the target node (CRIU images do not survive a
change of architecture, and some kernels refuse them), so they are taken from
the kernel itself rather than from anything the job can set.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def system_info() -> dict[str, Any]:
    uts = os.uname()
    return {
        "arch": uts.machine,
        "kernel_release": uts.release,
        "kernel_version": uts.version,
        "machine": uts.machine,
        "hostname": socket.gethostname(),
        "byteorder": "little",
    }
