"""Section names: the only paths an image can make unpack create.

A name is a relative POSIX path inside the target directory. Anything that
could escape it, or that the kernel would resolve surprisingly, is refused
before any byte reaches the disk; unpack additionally creates every component
itself relative to directory file descriptors, never following a symlink.
"""

from __future__ import annotations

from hpcckpt.image import format as F


class SectionNameError(ValueError):
    """A section name is unsafe or malformed (the reader adds the location)."""


def check_name(raw: bytes) -> str:
    """The decoded name, or SectionNameError saying what is wrong with it."""
    if not raw:
        raise SectionNameError("empty section name")
    if len(raw) > F.MAX_NAME:
        raise SectionNameError(f"section name of {len(raw)} bytes exceeds {F.MAX_NAME}")
    if b"\0" in raw:
        raise SectionNameError("section name contains a NUL byte")
    if raw.startswith(b"/"):
        raise SectionNameError(f"absolute section name {raw[:200]!r}")
    for part in raw.split(b"/"):
        if part in (b"", b".", b".."):
            raise SectionNameError(f"section name {raw[:200]!r} has an empty, '.' or '..' component")
        if len(part) > 255:
            raise SectionNameError(f"section name component of {len(part)} bytes exceeds 255")
    # surrogateescape keeps non-UTF-8 Linux file names byte-exact through the round trip
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")
