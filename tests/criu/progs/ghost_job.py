"""A job holding a deleted file at a path every copy of it uses (as OpenMPI's /dev/shm/open_mpi.0000).

argv: SHARED_DIR OUT STEPS MIB. Counts 0..STEPS-1 into OUT, with MIB of memory to make its restore take a
while; at the end checks that the deleted file still holds what was written to it.
"""

import os
import sys
import time

shared, out, steps, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
path = os.path.join(shared, "segment")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, b"ghost-" * 4096)
os.unlink(path)  # from now on a "ghost": CRIU restores it as PATH.cr.N.ghost beside the old path
ballast = bytearray(os.urandom(1 << 20)) * mib
with open(out, "a") as f:
    for i in range(steps):
        f.write(f"{i}\n")
        f.flush()
        time.sleep(0.05)
    ok = os.pread(fd, 6 * 4096, 0) == b"ghost-" * 4096 and len(ballast) == mib << 20
    f.write("ghost ok\n" if ok else "ghost LOST\n")
