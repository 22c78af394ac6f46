"""Build and patch CRIU image files byte by byte, for hostile-input tests.

A tiny protobuf encoder/decoder (proto2 wire format) independent of
hpcckpt.criu.images, so the tests do not check the reader against itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

IMG_COMMON_MAGIC = 0x54564319
CORE_MAGIC = 0x55053847
FILES_MAGIC = 0x56303138
USERNS_MAGIC = 0x55474906
GHOST_FILE_MAGIC = 0x52583605
IPCNS_SEM_MAGIC = 0x59573019
CGROUP_MAGIC = 0x59383330

Field = tuple[int, int, "int | bytes"]  # (number, wire type, value)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fv(num: int, value: int) -> bytes:
    """A varint field."""
    return varint(num << 3) + varint(value)


def fb(num: int, data: bytes) -> bytes:
    """A length-delimited field (sub-message, string or packed)."""
    return varint(num << 3 | 2) + varint(len(data)) + data


def creds(uid: int, gid: int, groups: Sequence[int] = ()) -> bytes:
    pairs = ((1, uid), (2, gid), (3, uid), (4, gid), (5, uid), (6, gid), (7, uid), (8, gid))
    body = b"".join(fv(n, v) for n, v in pairs)
    body += fv(13, 0)  # secbits
    return body + b"".join(fv(14, g) for g in groups)


def core(uid: int, gid: int, groups: Sequence[int] = ()) -> bytes:
    """A core_entry: mtype x86_64, tc {comm}, thread_core {futex, creds}."""
    tc = fv(2, 0) + fv(3, 0) + fv(4, 0) + fb(6, b"job")
    thread_core = fv(1, 0) + fv(2, 0) + fb(10, creds(uid, gid, groups))
    return fv(1, 1) + fb(3, tc) + fb(5, thread_core)


def image(magic: int, entries: Iterable[bytes], *, payloads: Sequence[bytes] = ()) -> bytes:
    out = struct.pack("<II", IMG_COMMON_MAGIC, magic)
    for i, e in enumerate(entries):
        out += struct.pack("<I", len(e)) + e
        if i < len(payloads):
            out += payloads[i]
    return out


def decode(buf: bytes) -> list[Field]:
    fields: list[Field] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = _read_varint(buf, pos)
            fields.append((num, 0, v))
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            fields.append((num, 2, buf[pos : pos + n]))
            pos += n
        elif wire in (1, 5):
            w = 8 if wire == 1 else 4
            fields.append((num, wire, buf[pos : pos + w]))
            pos += w
        else:
            raise ValueError(f"wire type {wire}")
    return fields


def encode(fields: Iterable[Field]) -> bytes:
    out = b""
    for num, wire, value in fields:
        if wire == 0:
            assert isinstance(value, int)
            out += fv(num, value)
        elif wire == 2:
            assert isinstance(value, bytes)
            out += fb(num, value)
        else:
            assert isinstance(value, bytes)
            out += varint(num << 3 | wire) + value
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def patch_core_creds(path: Path, *, uid: int | None = None, gid: int | None = None) -> None:
    """Rewrite every uid-like (or gid-like) field of core_entry.thread_core.creds in a real core image."""
    data = path.read_bytes()
    magic = data[:8]
    (size,) = struct.unpack_from("<I", data, 8)
    entry, rest = data[12 : 12 + size], data[12 + size :]
    uid_fields, gid_fields = {1, 3, 5, 7}, {2, 4, 6, 8}

    def fix_creds(body: bytes) -> bytes:
        out: list[Field] = []
        for num, wire, value in decode(body):
            if uid is not None and num in uid_fields:
                value = uid
            elif gid is not None and num in gid_fields:
                value = gid
            out.append((num, wire, value))
        return encode(out)

    def fix_thread_core(body: bytes) -> bytes:
        return encode([(n, w, fix_creds(v) if n == 10 and isinstance(v, bytes) else v) for n, w, v in decode(body)])

    new_entry = encode(
        [(n, w, fix_thread_core(v) if n == 5 and isinstance(v, bytes) else v) for n, w, v in decode(entry)]
    )
    path.write_bytes(magic + struct.pack("<I", len(new_entry)) + new_entry + rest)
