"""The hpcckpt image: one self-checking, streamable file per checkpoint.

The layout is in :mod:`hpcckpt.image.format` and docs/format.md.
"""

from __future__ import annotations

from hpcckpt.image.model import ImageMeta, ImageSummary, OpenFile, PackStats, SectionInfo, TaskInfo
from hpcckpt.image.pack import pack_dir, write_error_image
from hpcckpt.image.reader import read_header, verify_image
from hpcckpt.image.unpack import unpack_image

__all__ = [
    "ImageMeta",
    "ImageSummary",
    "OpenFile",
    "PackStats",
    "SectionInfo",
    "TaskInfo",
    "pack_dir",
    "read_header",
    "unpack_image",
    "verify_image",
    "write_error_image",
]
