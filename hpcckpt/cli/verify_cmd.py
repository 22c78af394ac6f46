"""`hpcckpt verify`: check images completely; the exit code says how they fared."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.context import current_user
from hpcckpt.progress import terminal_progress
from hpcckpt.store.verify import check_images

HELP = """\
Read every byte of each image and check it: magic, version, every record's
length, type and checksum, every chunk's content hash after decompression,
the section structure and the trailer (record count, length, digest).

An image that is intact but records a failed checkpoint counts as corrupt:
there is nothing to restore from it.

IMAGE|CKPTID is an image file, or a checkpoint id from 'hpcckpt list'. A
checkpoint id is also checked against its catalog row: the image's header
must name that checkpoint, job, owner and parent (a file copied over another
checkpoint's is corrupt). A checkpoint id found corrupt is marked 'corrupt'
in the catalog: 'hpcckpt list' shows it so, and resume no longer uses it.

exit status: 0 all images ok; 4 some image is corrupt (or a failed
checkpoint, or of an unsupported format); 5 some image is unreadable
(missing, not a regular file, I/O error) and none is corrupt; other codes as
listed below (for example 10 when you may not read an image, 11 when a
checkpoint id is not in the catalog, 2 for an id out of range).

examples:
  hpcckpt verify 17 18 19
  hpcckpt verify /scratch/ckpt/alice/4242/*.hck && echo all good
  hpcckpt verify --json 17 | jq '.[0].status'
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="check images completely", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE|CKPTID", help="image files or checkpoint ids")
    add_store_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with terminal_progress("verify"):
        results, code = check_images(args.images, current_user(), args.store, args.catalog, args.policy)
    if args.json:
        print_json([r.to_dict() for r in results])
    else:
        for r in results:
            line = f"{r.status.upper():<10} {r.path or r.arg}"
            if r.status == "ok":
                line += f"  ({r.sections} sections, {r.length} bytes, digest {r.digest})"
            else:
                line += "\n           " + r.error.replace("\n", "\n           ")
                if r.marked:
                    line += "\n           marked corrupt in the catalog"
            sys.stdout.write(line + "\n")
    return code
