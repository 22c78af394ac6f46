"""`hpcckpt image pack|unpack`: images to and from plain directories."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, cast

from hpcckpt.cli.common import add_json_arg, print_json
from hpcckpt.context import current_user
from hpcckpt.errors import UsageError
from hpcckpt.exitcodes import EXIT_OK
from hpcckpt.image import ImageMeta, PackStats, pack_dir, unpack_image
from hpcckpt.image import format as F
from hpcckpt.image.output import write_image_file
from hpcckpt.progress import CountingWriter, terminal_progress

HELP = """\
Pack a directory (a CRIU dump, application files) into one hpcckpt image,
or unpack an image into a directory. Checkpoints made by 'hpcckpt run' are
already images; these commands are for moving dumps in and out by hand.

'-' as OUT or IMAGE means standard output or input: images are written and
read in one sequential pass, so they can be piped.

examples:
  hpcckpt image pack --codec zstd /tmp/dump dump.hck
  hpcckpt image unpack dump.hck /tmp/restore      # then: criu restore -D /tmp/restore
  hpcckpt image pack /tmp/dump - | ssh node2 hpcckpt image unpack - /tmp/dump
"""

PACK_HELP = """\
Pack DIR (regular files and directories only; symlinks and devices are
refused) into the image OUT, written 0600 under a temporary name and renamed
when complete. The checkpoint id is 0: the image is not in any catalog.

examples:
  hpcckpt image pack /tmp/dump dump.hck
  hpcckpt image pack --codec lz4 --job-id 4242 /tmp/dump dump.hck
"""

UNPACK_HELP = """\
Verify IMAGE completely while unpacking it into DIR (which must be missing
or empty). Nothing is left in DIR unless the whole image checked out; file
modes (permission bits only) and modification times are restored.

examples:
  hpcckpt image unpack dump.hck /tmp/restore
  cat dump.hck | hpcckpt image unpack - /tmp/restore
"""


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4M or 1048576)") from exc


def register(sub: Any) -> None:
    p = sub.add_parser(
        "image", help="pack a directory into an image, or unpack one", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    isub = p.add_subparsers(dest="image_command", metavar="ACTION")
    pk = isub.add_parser("pack", help="pack a directory into an image", description=PACK_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pk.add_argument("dir", metavar="DIR")
    pk.add_argument("out", metavar="OUT", help="image file to write, or - for standard output")
    pk.add_argument("--codec", choices=sorted(F.CODEC_IDS), default="none", help="chunk compression")
    pk.add_argument("--level", type=int, default=3, help="compression level (default 3)")
    pk.add_argument("--chunk-size", type=_size, default=F.DEFAULT_CHUNK,
                    help=f"chunk size, {F.MIN_CHUNK >> 10}K to {F.MAX_CHUNK >> 20}M (default 4M)")
    pk.add_argument("--job-id", default="", help="job id to record in the header")
    pk.add_argument("--engine", default="files", choices=("criu", "app", "files"), help="default: files")
    pk.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_json_arg(pk)
    pk.set_defaults(func=run_pack)
    up = isub.add_parser("unpack", help="unpack an image into a directory", description=UNPACK_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("image", metavar="IMAGE", help="image file, or - for standard input")
    up.add_argument("dir", metavar="DIR", help="new or empty target directory")
    add_json_arg(up)
    up.set_defaults(func=run_unpack)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    raise UsageError("say 'pack' or 'unpack'")


def run_pack(args: argparse.Namespace) -> int:
    if not F.MIN_CHUNK <= args.chunk_size <= F.MAX_CHUNK:
        raise UsageError(f"--chunk-size must be between {F.MIN_CHUNK} and {F.MAX_CHUNK} bytes")
    user = current_user()
    meta = ImageMeta(
        ckptid=0, job_id=args.job_id, engine=args.engine, uid=user.uid, gid=user.gid, user=user.name,
        node=os.uname().nodename, cwd=os.getcwd(),
    )

    def write(out: BinaryIO) -> PackStats:
        with terminal_progress("pack") as meter:
            if meter is not None:
                meter.start(args.out, 0)  # the output's size is known only at the end
                out = cast(BinaryIO, CountingWriter(out, meter))
            return pack_dir(Path(args.dir), out, meta, codec=args.codec, level=args.level,
                            chunk_size=args.chunk_size)

    if args.out == "-":
        if sys.stdout.isatty():
            raise UsageError("refusing to write an image to a terminal", hint="redirect standard output")
        stats = write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return EXIT_OK
    stats = write_image_file(Path(args.out), write, force=args.force)
    if args.json:
        print_json(vars(stats))
    else:
        ratio = stats.bytes_in / stats.bytes_out if stats.bytes_out else 1.0
        sys.stdout.write(
            f"packed {args.dir} -> {args.out}: {stats.sections} sections, {stats.bytes_in} bytes in, "
            f"{stats.bytes_out} bytes out (ratio {ratio:.2f}), digest {stats.digest}\n"
        )
    return EXIT_OK


def run_unpack(args: argparse.Namespace) -> int:
    src: Path | BinaryIO = sys.stdin.buffer if args.image == "-" else Path(args.image)
    with terminal_progress("unpack"):
        summary = unpack_image(src, Path(args.dir))
    if args.json:
        print_json(summary.to_dict())
    else:
        total = sum(s.size for s in summary.sections)
        sys.stdout.write(
            f"unpacked {args.image} -> {args.dir}: {len(summary.sections)} sections, {total} bytes, "
            f"checkpoint {summary.meta.ckptid} of job {summary.meta.job_id or '-'}\n"
        )
    return EXIT_OK
