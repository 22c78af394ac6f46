"""`hpcckpt info`: what an image holds, or why its checkpoint failed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.context import current_user
from hpcckpt.exitcodes import EXIT_OK
from hpcckpt.image import read_header, verify_image
from hpcckpt.image.errors import ImageError
from hpcckpt.image.render import render_summary
from hpcckpt.store.resolve import catalog_lookup, parent_resolver, resolve_image

HELP = """\
Show an image: its header (job, engine, node, kernel, command line), the
process tree, the open files, the sections with their sizes and compression
ratios, and the error records of a failed checkpoint.

The whole image is read and checked on the way (as 'hpcckpt verify' does);
if it is corrupt, what could be read of its header is shown before the error.

IMAGE|CKPTID is an image file, or a checkpoint id from 'hpcckpt list'. An
incremental image is verified with every image of its chain (found through
the catalog; 'parents' lists them).

examples:
  hpcckpt info 17
  hpcckpt info /scratch/ckpt/alice/4242/ckpt-17.hck
  hpcckpt info --json 17 | jq '.sections[] | {name, size, ratio}'
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "info", help="show what an image holds", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE|CKPTID", help="image file or checkpoint id")
    add_store_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    user = current_user()
    lookup = catalog_lookup(user, args.store, args.catalog, args.policy)
    path = resolve_image(args.image, user, lookup)
    try:
        # An incremental image is checked with its whole chain, its parents found through the catalog.
        summary = verify_image(path, parent_resolver(user, lookup))
    except ImageError:
        if not args.json:
            try:
                meta = read_header(path)
                sys.stdout.write(
                    f"image       {path}\ncheckpoint  {meta.ckptid}  job {meta.job_id}  engine {meta.engine}\n"
                )
            except ImageError:
                pass  # the header itself is bad: the error below says where
        raise
    if args.json:
        print_json(dict(summary.to_dict(), path=str(path)))
    else:
        sys.stdout.write(render_summary(str(path), summary))
    return EXIT_OK
