"""A safe, self-describing encoding of an application's checkpoint state.

The state of an application-assisted checkpoint comes back from disk into a
running program, possibly after the file sat on a shared filesystem that other
people can write to. ``pickle`` would run code chosen by whoever wrote the
file, so this module encodes a fixed set of plain types itself and refuses
everything else, both when encoding and when decoding.

Grammar (all integers little-endian)::

    file    := header value
    header  := MAGIC(8) = b"HCKSTATE"  version:u16  flags:u16  reserved:u32  body_len:u64
    value   := tag:u8 payload
    tag  0  None
         1  False
         2  True
         3  int      i64
         4  bigint   len:u32 two's-complement bytes (little-endian)
         5  float    f64
         6  str      len:u64 utf-8 bytes
         7  bytes    len:u64 raw bytes
         8  list     count:u64 value*
         9  tuple    count:u64 value*
        10  dict     count:u64 (key:value value:value)*   keys: None/bool/int/float/str/bytes/tuple
        11  ndarray  dtype_len:u16 dtype(ascii, numpy ``dtype.str``) ndim:u8 dim:u64*ndim
                     nbytes:u64 raw C-order bytes
        12  npscalar same payload as ndarray, ndim 0; decodes to a numpy scalar
        13  bytearray len:u64 raw bytes

``body_len`` is the number of bytes after the header, so a truncated file is
caught before any value is trusted. The enclosing image checksums every byte;
this module's checks catch bugs and hand-edited files, and every error names
the file and the byte offset.

numpy is imported only when an array is met, so programs without numpy can
checkpoint bytes and dicts.
"""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path
from typing import Any, BinaryIO

from hpcckpt.errors import UsageError
from hpcckpt.image.errors import CorruptImageError

MAGIC = b"HCKSTATE"
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

_HEADER = struct.Struct("<8sHHIQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")

T_NONE, T_FALSE, T_TRUE, T_INT, T_BIGINT, T_FLOAT, T_STR, T_BYTES = range(8)
T_LIST, T_TUPLE, T_DICT, T_NDARRAY, T_NPSCALAR, T_BYTEARRAY = range(8, 14)

# Deep enough for any real state, shallow enough that a crafted file cannot
# exhaust Python's recursion limit.
MAX_DEPTH = 64
_MAX_NDIM = 32
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

_HINT_TYPES = (
    "checkpoint state may hold None, bool, int, float, str, bytes, bytearray, lists, tuples, "
    "dicts and numpy arrays/scalars (not object or structured dtypes); convert other objects first"
)


class _Encoder:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.written = 0

    def _w(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.written += len(data)

    def value(self, obj: Any, depth: int, where: str) -> None:
        if depth > MAX_DEPTH:
            raise UsageError(f"checkpoint state nested deeper than {MAX_DEPTH} levels at {where}")
        # bool before int: bool is a subclass of int.
        if obj is None:
            self._w(_U8.pack(T_NONE))
        elif obj is True or obj is False:
            self._w(_U8.pack(T_TRUE if obj else T_FALSE))
        elif type(obj) is int:
            self._int(obj)
        elif type(obj) is float:
            self._w(_U8.pack(T_FLOAT) + _F64.pack(obj))
        elif type(obj) is str:
            data = obj.encode("utf-8", "surrogatepass")
            self._w(_U8.pack(T_STR) + _U64.pack(len(data)))
            self._w(data)
        elif type(obj) in (bytes, bytearray):
            self._w(_U8.pack(T_BYTES if type(obj) is bytes else T_BYTEARRAY) + _U64.pack(len(obj)))
            self._w(obj)
        elif type(obj) in (list, tuple):
            self._w(_U8.pack(T_LIST if type(obj) is list else T_TUPLE) + _U64.pack(len(obj)))
            for i, item in enumerate(obj):
                self.value(item, depth + 1, f"{where}[{i}]")
        elif type(obj) is dict:
            self._w(_U8.pack(T_DICT) + _U64.pack(len(obj)))
            for key, item in obj.items():
                if not _is_key(key):
                    raise UsageError(
                        f"checkpoint state: dict key {key!r} at {where} has type {type(key).__name__}",
                        hint="dict keys must be None, bool, int, float, str, bytes or tuples of those",
                    )
                self.value(key, depth + 1, f"{where}.<key>")
                self.value(item, depth + 1, f"{where}[{key!r}]")
        else:
            self._numpy(obj, where)

    def _int(self, obj: int) -> None:
        if _I64_MIN <= obj <= _I64_MAX:
            self._w(_U8.pack(T_INT) + _I64.pack(obj))
            return
        nbytes = (obj.bit_length() + 8) // 8  # room for the sign bit
        data = obj.to_bytes(nbytes, "little", signed=True)
        self._w(_U8.pack(T_BIGINT) + _U32.pack(len(data)))
        self._w(data)

    def _numpy(self, obj: Any, where: str) -> None:
        np = _numpy_if_loaded()
        if np is None or not isinstance(obj, (np.ndarray, np.generic)):
            raise UsageError(
                f"checkpoint state: cannot encode {type(obj).__name__} at {where}", hint=_HINT_TYPES
            )
        scalar = isinstance(obj, np.generic)
        if not scalar and type(obj) is not np.ndarray:  # subclasses (masked arrays, matrices) carry more than data
            raise UsageError(
                f"checkpoint state: numpy subclass {type(obj).__name__} at {where} is not supported",
                hint="pass np.asarray(x) and the extra fields (e.g. the mask) as separate entries",
            )
        arr = np.asarray(obj)
        dt = arr.dtype
        if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise UsageError(
                f"checkpoint state: numpy dtype {dt} at {where} is not supported", hint=_HINT_TYPES
            )
        descr = dt.str.encode("ascii")
        if arr.ndim > _MAX_NDIM:
            raise UsageError(f"checkpoint state: array at {where} has {arr.ndim} dimensions")
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        head = _U8.pack(T_NPSCALAR if scalar else T_NDARRAY) + _U16.pack(len(descr)) + descr
        head += _U8.pack(arr.ndim) + b"".join(_U64.pack(d) for d in arr.shape)
        head += _U64.pack(arr.nbytes)
        self._w(head)
        if arr.nbytes:
            # Viewed as bytes: the buffer protocol refuses some dtypes (datetime64).
            self._w(memoryview(arr.reshape(-1).view(np.uint8)))


def _is_key(key: Any) -> bool:
    if key is None or type(key) in (bool, int, float, str, bytes):
        return True
    return type(key) is tuple and all(_is_key(k) for k in key)


def _numpy_if_loaded() -> Any:
    # An object can only be a numpy array if numpy is already imported, so
    # there is no reason to pay for importing it here.
    import sys

    return sys.modules.get("numpy")


def encode(state: Any, out: BinaryIO) -> int:
    """Write ``state`` to ``out`` (a seekable binary file); return the bytes written.

    Raises UsageError naming the offending path inside ``state`` for types
    that cannot be encoded.
    """
    start = out.tell()
    out.write(_HEADER.pack(MAGIC, VERSION, 0, 0, 0))
    enc = _Encoder(out)
    enc.value(state, 0, "state")
    end = out.tell()
    out.seek(start)
    out.write(_HEADER.pack(MAGIC, VERSION, 0, 0, enc.written))
    out.seek(end)
    return _HEADER.size + enc.written


def encode_bytes(state: Any) -> bytes:
    buf = io.BytesIO()
    encode(state, buf)
    return buf.getvalue()


def write_file(state: Any, path: Path) -> int:
    """Encode ``state`` into a new file at ``path`` (mode 0600), fsynced."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        n = encode(state, f)
        f.flush()
        os.fsync(f.fileno())
    return n


class _Decoder:
    def __init__(self, data: memoryview, name: str) -> None:
        self.data = data
        self.name = name
        self.pos = 0

    def fail(self, msg: str, offset: int | None = None) -> CorruptImageError:
        return CorruptImageError(
            msg,
            path=self.name,
            offset=self.pos if offset is None else offset,
            hint="the checkpoint state file is damaged or was not written by hpcckpt; "
            "restore from an older checkpoint (hpcckpt list JOBID)",
        )

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(
                f"{what} needs {n} bytes but only {len(self.data) - self.pos} remain (truncated?)"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u(self, st: struct.Struct, what: str) -> Any:
        return st.unpack(self.take(st.size, what))[0]

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"values nested deeper than {MAX_DEPTH} levels")
        at = self.pos
        tag = self.u(_U8, "tag")
        if tag == T_NONE:
            return None
        if tag in (T_FALSE, T_TRUE):
            return tag == T_TRUE
        if tag == T_INT:
            return self.u(_I64, "int")
        if tag == T_BIGINT:
            n = self.u(_U32, "bigint length")
            return int.from_bytes(self.take(n, "bigint"), "little", signed=True)
        if tag == T_FLOAT:
            return self.u(_F64, "float")
        if tag == T_STR:
            n = self.u(_U64, "str length")
            raw = self.take(n, "str")
            try:
                return bytes(raw).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as err:
                raise self.fail(f"invalid utf-8 in str: {err.reason}", at) from None
        if tag in (T_BYTES, T_BYTEARRAY):
            n = self.u(_U64, "bytes length")
            raw = self.take(n, "bytes")
            return bytes(raw) if tag == T_BYTES else bytearray(raw)
        if tag in (T_LIST, T_TUPLE):
            n = self.count()
            items = [self.value(depth + 1) for _ in range(n)]
            return items if tag == T_LIST else tuple(items)
        if tag == T_DICT:
            n = self.count()
            out: dict[Any, Any] = {}
            for _ in range(n):
                key_at = self.pos
                key = self.value(depth + 1)
                if not _is_key(key):
                    raise self.fail(f"dict key of type {type(key).__name__} is not allowed", key_at)
                out[key] = self.value(depth + 1)
            return out
        if tag in (T_NDARRAY, T_NPSCALAR):
            return self.ndarray(tag == T_NPSCALAR, at)
        raise self.fail(f"unknown value tag {tag}", at)

    def count(self) -> int:
        n: int = self.u(_U64, "count")
        # Each element takes at least one byte: a larger count is a lie that
        # would otherwise make us loop (or allocate) for a very long time.
        if n > len(self.data) - self.pos:
            raise self.fail(f"element count {n} exceeds the {len(self.data) - self.pos} bytes left")
        return n

    def ndarray(self, scalar: bool, at: int) -> Any:
        import numpy as np

        dlen = self.u(_U16, "dtype length")
        raw_descr = bytes(self.take(dlen, "dtype"))
        try:
            descr = raw_descr.decode("ascii")
            dt = np.dtype(descr)
        except (UnicodeDecodeError, TypeError, ValueError):
            raise self.fail(f"bad numpy dtype {raw_descr!r}", at) from None
        if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.str != descr:
            raise self.fail(f"numpy dtype {descr!r} is not allowed in checkpoint state", at)
        ndim = self.u(_U8, "ndim")
        if ndim > _MAX_NDIM or (scalar and ndim != 0):
            raise self.fail(f"bad array rank {ndim}", at)
        shape = tuple(self.u(_U64, "dimension") for _ in range(ndim))
        nbytes = self.u(_U64, "array length")
        count = math.prod(shape)
        if count * dt.itemsize != nbytes:
            raise self.fail(
                f"array of shape {shape} and dtype {descr} needs {count * dt.itemsize} bytes, "
                f"header says {nbytes}",
                at,
            )
        raw = self.take(nbytes, "array data")
        # copy(): the result must own its memory and be writable, not alias
        # the decoder's buffer.
        arr = np.frombuffer(raw, dtype=dt, count=count).reshape(shape).copy()
        return arr[()] if scalar else arr


def decode(data: bytes | bytearray | memoryview, name: str = "<state>") -> Any:
    """Decode a whole encoded state; ``name`` labels errors (usually the file path)."""
    view = memoryview(data).cast("B")
    dec = _Decoder(view, name)
    head = dec.take(_HEADER.size, "header")
    magic, version, _flags, _reserved, body_len = _HEADER.unpack(head)
    if magic != MAGIC:
        raise dec.fail(f"not a checkpoint state file (magic {bytes(magic)!r})", 0)
    if version not in SUPPORTED_VERSIONS:
        raise CorruptImageError(
            f"checkpoint state format version {version} is not supported "
            f"(this hpcckpt reads {sorted(SUPPORTED_VERSIONS)})",
            path=name,
            offset=8,
            hint="restore with the hpcckpt version that wrote it, or a newer one",
        )
    if body_len != len(view) - _HEADER.size:
        raise dec.fail(
            f"length mismatch: header says {body_len} body bytes, file has {len(view) - _HEADER.size}",
            16,
        )
    value = dec.value(0)
    if dec.pos != len(view):
        raise dec.fail(f"{len(view) - dec.pos} unexpected bytes after the state value")
    return value


def read_file(path: Path) -> Any:
    return decode(path.read_bytes(), str(path))
