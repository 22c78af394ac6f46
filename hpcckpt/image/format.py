"""The byte layout of an hpcckpt image: every constant and struct lives here.

docs/format.md is the full description; this is the grammar the code follows.
All integers are little-endian. ``xxh3_64``/``xxh3_128`` are the XXH3 hashes
(https://github.com/Cyan4973/xxHash) with the seed given.

::

    image     := PREAMBLE HEADER meta* body TRAILER EOF
    meta      := TASKS | FILES | optional
    body      := (section | ERROR | optional)*
    section   := SECTION_BEGIN (CHUNK | CHUNK_REF)* SECTION_END
    record    := RECORD_HEADER payload[length]

    PREAMBLE (16 bytes)      <8s H H I>  head magic, version major, version minor,
                                         low 32 bits of xxh3_64(first 12 bytes, seed 0)
    RECORD_HEADER (16 bytes) <H H I Q>   type, flags, payload length,
                                         checksum = xxh3_64(type|flags|length bytes + payload,
                                                            seed = record index)

Record indexes count from 0 (the HEADER) and the seed makes a record that is
moved, dropped or repeated fail its checksum. The TRAILER's digest is
xxh3_128 over the PREAMBLE and every RECORD_HEADER before the trailer: each
header carries its payload's checksum, so the digest covers every byte while
costing one hash of 16 bytes per record.
"""

from __future__ import annotations

import struct
from typing import Final

HEAD_MAGIC: Final = b"\x89HCKPT\r\n"  # high bit and CRLF catch 7-bit and text-mode mangling, as PNG's
TAIL_MAGIC: Final = b"HCKPTEND"
VERSION_MAJOR: Final = 1
VERSION_MINOR: Final = 1  # 1.1: CHUNK_REF records (incremental images)
SUPPORTED_MAJOR: Final = frozenset({1})

PREAMBLE = struct.Struct("<8sHHI")
RECORD_HEADER = struct.Struct("<HHIQ")
# The part of RECORD_HEADER the checksum covers (everything but the checksum).
RECORD_HEADER_CHECKED: Final = 8

# Record types. Values are part of the format: never renumber.
T_HEADER: Final = 1
T_TASKS: Final = 2
T_FILES: Final = 3
T_SECTION_BEGIN: Final = 4
T_CHUNK: Final = 5
T_CHUNK_REF: Final = 6  # incremental images (format 1.1): a chunk stored in an earlier image
T_SECTION_END: Final = 7
T_ERROR: Final = 8
T_TRAILER: Final = 15

TYPE_NAMES: Final = {
    T_HEADER: "header",
    T_TASKS: "tasks",
    T_FILES: "files",
    T_SECTION_BEGIN: "section_begin",
    T_CHUNK: "chunk",
    T_CHUNK_REF: "chunk_ref",
    T_SECTION_END: "section_end",
    T_ERROR: "error",
    T_TRAILER: "trailer",
}

# Record flags. A reader skips a record of unknown type only when it is optional;
# the other bits are reserved and must be zero, so they can gain a meaning later.
RF_OPTIONAL: Final = 0x0001
RF_KNOWN: Final = RF_OPTIONAL

# HEADER payload: fixed part, then a UTF-8 JSON object of json_len bytes.
HEADER_FIXED = struct.Struct("<IId")  # image flags, json_len, created (unix time)
# Image flags (HEADER). Bits not listed are passed through from ImageMeta.flags.
IF_ERROR: Final = 0x0001  # the checkpoint failed; ERROR records say why

# SECTION_BEGIN payload: fixed part, then the name (UTF-8 bytes, surrogateescape).
SECTION_BEGIN = struct.Struct("<IBBHIQqI")
#   section number, kind, codec, reserved(0), st_mode, size, mtime_ns, name_len
K_FILE: Final = 1
K_DIR: Final = 2
KIND_NAMES: Final = {K_FILE: "file", K_DIR: "dir"}

# CHUNK payload: fixed part, then the stored bytes (the rest of the payload).
CHUNK = struct.Struct("<IBBHQI16s")
#   section number, codec, reserved(0), reserved(0), offset in section, raw length, xxh3_128(raw)
# CHUNK_REF payload (format 1.1): the chunk's bytes are a CHUNK record of another image.
CHUNK_REF = struct.Struct("<IIQQI16s")
#   section number, reserved(0), ckptid of the image whose CHUNK holds the bytes,
#   offset in section, raw length, xxh3_128(raw)
# Only chunks at least this long are referenced: a ref costs a seek into
# another file on restore, which small metadata files are not worth.
MIN_REF: Final = 64 << 10
SECTION_END = struct.Struct("<IIQ")  # section number, chunk count, size

# TRAILER payload.
TRAILER = struct.Struct("<8sQQ16s")  # tail magic, record count (incl. trailer), total length, digest

# Chunk codecs.
C_NONE: Final = 0
C_ZSTD: Final = 1
C_LZ4: Final = 2
CODEC_NAMES: Final = {C_NONE: "none", C_ZSTD: "zstd", C_LZ4: "lz4"}
CODEC_IDS: Final = {v: k for k, v in CODEC_NAMES.items()}

# Bounds. Every length read from an image is checked against these before use.
MAX_CHUNK: Final = 16 << 20
MIN_CHUNK: Final = 4 << 10
DEFAULT_CHUNK: Final = 4 << 20
MAX_PAYLOAD: Final = MAX_CHUNK + 4096  # a chunk plus its fixed fields, with room
MAX_JSON: Final = 1 << 20  # header, tasks and files records
MAX_NAME: Final = 4096
MAX_ERROR: Final = 1 << 20
MAX_SECTIONS: Final = 1 << 20

# Unpacked files keep permission bits only: setuid/setgid/sticky from an image
# must never reach a file created by root.
MODE_MASK: Final = 0o777


def type_name(rtype: int) -> str:
    return TYPE_NAMES.get(rtype, f"type {rtype}")
