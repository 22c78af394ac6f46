"""A separate writer process for the concurrency and crash tests.

    python -m tests.catalog._worker commits ROOT URL JOB N     # N publishes, print ckptids as JSON
    python -m tests.catalog._worker crash ROOT URL JOB STEP    # SIGKILL itself at STEP of a publish
    python -m tests.catalog._worker loop ROOT URL JOB          # publish until killed

URL is "-" for the per-user SQLite default.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.store.images import Store


def main(argv: list[str]) -> int:
    mode, root, url, job = argv[:4]
    user = current_user()
    cat = open_catalog(None if url == "-" else url, Path(root), user)
    if mode == "commits":
        ids = []
        store = Store(Path(root), user)
        for i in range(int(argv[4])):
            with store.publish(cat, job_id=job, engine="files", node="n") as pub:
                pub.file.write(b"%d:%d\n" % (os.getpid(), i))
            ids.append(pub.ckptid)
        print(json.dumps(ids))
        return 0
    if mode == "crash":
        step = argv[4]

        def hook(name: str) -> None:
            if name == step:
                os.kill(os.getpid(), signal.SIGKILL)

        with Store(Path(root), user, step_hook=hook).publish(cat, job_id=job, engine="files", node="n") as pub:
            pub.file.write(b"new image " * 10000)
        return 0
    if mode == "loop":
        store = Store(Path(root), user)
        print("ready", flush=True)
        while True:
            with store.publish(cat, job_id=job, engine="files", node="n") as pub:
                pub.file.write(b"y" * 65536)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
