"""The image's errors: corrupt (exit 4), unsupported (4), unreadable (5) and unsafe (4) images.

A corrupt image's message names the file, the byte offset and the record
where the check failed, so that an admin can look at it with ``hpcckpt info``.
"""

from __future__ import annotations

from hpcckpt.errors import HpcckptError
from hpcckpt.exitcodes import EXIT_CORRUPT, EXIT_UNREADABLE

_UNTRUSTED = ("the image cannot be trusted; resume from an older checkpoint (hpcckpt list JOBID) "
              "and run 'hpcckpt verify' on it")


class ImageError(HpcckptError):
    """Base for image problems."""

    exit_code = EXIT_CORRUPT


class CorruptImageError(ImageError):
    """The image's bytes are wrong: bad magic, length, checksum or structure.

    ``offset`` is the byte offset in the file, ``record`` the record index and
    ``rtype`` the record type name, where known.
    """

    exit_code = EXIT_CORRUPT

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 record: int | None = None, rtype: str | None = None, hint: str | None = None) -> None:
        where = [str(path)] if path is not None else []
        where += [f"offset {offset}"] if offset is not None else []
        where += [f"record {record}" + (f" ({rtype})" if rtype else "")] if record is not None else []
        super().__init__(f"{', '.join(where)}: {message}" if where else message, hint=hint or _UNTRUSTED)
        self.path, self.offset, self.record, self.rtype = path, offset, record, rtype


class UnsupportedImageError(ImageError):
    """A well-formed image of a format version this hpcckpt does not understand."""

    exit_code = EXIT_CORRUPT


class UnreadableImageError(ImageError):
    exit_code = EXIT_UNREADABLE


class UnsafeImageError(ImageError):
    """The image is intact but its content is refused (path traversal, devices, foreign uids)."""

    exit_code = EXIT_CORRUPT
