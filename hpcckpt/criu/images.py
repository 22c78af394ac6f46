"""A bounded, dependency-free reader of the user and group ids in CRIU images.

Why this exists: CRIU run as root restores whatever credentials an image
claims, so a user who crafts ``core-N.img`` with ``uid: 0`` would get a root
process from any root-run restore. Before a restore that hpcckpt starts with
privilege, every uid and gid recorded in the CRIU images is extracted here and
compared with the image owner's (``check_credentials``). The reader trusts no
byte: every length is bounded by the file, every nesting by a depth limit.

Grammar of a CRIU image file (``criu/include/magic.h``, ``criu/image.c``,
``lib/pycriu/images/images.py``), all integers little-endian::

    image      := header entry*
    header     := u32 IMG_COMMON_MAGIC u32 type_magic     -- most images
                | u32 IMG_SERVICE_MAGIC u32 type_magic    -- stats-*, irmap-cache
                | u32 type_magic                          -- inventory.img (and old images)
    entry      := u32 size, protobuf message (size bytes), [payload]
    raw image  := bytes, no header                        -- pages-*.img, ifaddr-*.img, ...

Payloads follow entries only in a few types: ghost files (file data after the
first entry), SysV IPC images (segment data), and the *-data / queue images.
Types whose payload this module does not need are not walked at all.

Protobuf wire format (proto2): ``key := varint(field << 3 | wire_type)``;
wire types 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Groups (3, 4)
are not used by CRIU and are refused. Repeated scalars may be packed (wire
type 2 holding varints).

Where the ids live (``images/*.proto`` of CRIU 4.2):

* ``core-N.img``     core_entry.thread_core(5).creds(10): uid 1, gid 2, euid 3,
  egid 4, suid 5, sgid 6, fsuid 7, fsgid 8, groups 14; core_entry.tc(3).loginuid(13)
* ``creds-N.img``    creds_entry (images of CRIU < 3.x)
* ``files.img``      file_entry.<type>.fown {uid 1, euid 2, pid 5}; unix_sk.file_perms(13) {uid 2, gid 3}
* ``tty-info.img``   uid 14, gid 15; ``memfd.img`` uid 2, gid 3; ``ghost-file-N.img`` uid 1, gid 2
* ``userns-N.img``   uid_map(1) / gid_map(2) extents {first 1, lower_first 2, count 3}
* ``ipcns-{shm,sem,msg}-N.img``  ipc_desc(1) {uid 2, gid 3, cuid 4, cgid 5}
* ``cgroup.img``     cgroup_perms {uid 2, gid 3} in dirs (recursive) and properties
* ``autofs-N.img``   uid 7, gid 8 (int32)
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hpcckpt.image.errors import CorruptImageError, UnreadableImageError, UnsafeImageError

_U32 = struct.Struct("<I")

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940

# Every type magic of criu/include/magic.h (CRIU 4.2). A file whose magic is
# not here is refused: it could be a type this reader does not know to check.
KNOWN_MAGICS: dict[int, str] = {
    0x58313116: "INVENTORY",
    0x50273030: "PSTREE",
    0x56213732: "FDINFO",
    0x56084025: "PAGEMAP",
    0x55053847: "CORE",
    0x54432030: "IDS",
    0x54123737: "VMAS",
    0x56513555: "PIPES",
    0x56453709: "PIPES_DATA",
    0x58364939: "FIFO",
    0x59333054: "FIFO_DATA",
    0x55344201: "SIGACT",
    0x54373943: "UNIXSK",
    0x56443851: "INETSK",
    0x60454618: "PACKETSK",
    0x57464056: "ITIMERS",
    0x52603957: "POSIX_TIMERS",
    0x56264026: "SK_QUEUES",
    0x54473203: "UTSNS",
    0x54023547: "CREDS",
    0x53115007: "IPC_VAR",
    0x46283044: "IPCNS_SHM",
    0x55453737: "IPCNS_MSG",
    0x59573019: "IPCNS_SEM",
    0x50363636: "REG_FILES",
    0x59255641: "EXT_FILES",
    0x51403912: "FS",
    0x57492820: "MM",
    0x59133954: "REMAP_FPATH",
    0x52583605: "GHOST_FILE",
    0x51465506: "TCP_STREAM",
    0x44523722: "EVENTFD_FILE",
    0x45023858: "EVENTPOLL_FILE",
    0x44433746: "EVENTPOLL_TFD",
    0x57323820: "SIGNALFD",
    0x48424431: "INOTIFY_FILE",
    0x54562009: "INOTIFY_WD",
    0x55563928: "MNTS",
    0x57373951: "NETDEV",
    0x55933752: "NETNS",
    0x59433025: "TTY_FILES",
    0x59453036: "TTY_INFO",
    0x59413026: "TTY_DATA",
    0x54323616: "FILE_LOCKS",
    0x57113925: "RLIMIT",
    0x55096122: "FANOTIFY_FILE",
    0x56506035: "FANOTIFY_MARK",
    0x59255647: "SIGNAL",
    0x58005614: "NETLINK_SK",
    0x61394011: "NS_FILES",  # CPUINFO shares this value in magic.h
    0x57143751: "TUNFILE",
    0x59383330: "CGROUP",
    0x50493712: "TIMERFD",
    0x61404013: "CPUINFO",
    0x55474906: "USERNS",
    0x64413049: "SECCOMP",
    0x67343323: "BINFMT_MISC",
    0x49353943: "AUTOFS",
    0x56303138: "FILES",
    0x48453499: "MEMFD_INODE",
    0x43114433: "TIMENS",
    0x61157326: "PIDNS",
    0x57506142: "BPFMAP_FILE",
    0x64324033: "BPFMAP_DATA",
    0x59423047: "APPARMOR",
    0x54435556: "PIDFD",
    0x57093306: "STATS",
    0x57004059: "IRMAP_CACHE",
}

# Raw images (RAW_IMAGE_MAGIC == 0: no header at all) hold page data or
# netlink dumps, never credentials; CRIU opens them by name only.
_RAW_NAME = re.compile(
    r"^(pages|pages-shmem|ifaddr|route|route6|rule|iptables|ip6tables|nftables|netns-ct|netns-exp)-\d+\.img$"
    r"|^tmpfs(-dev)?-\d+\.tar\.gz$"
)
# Files CRIU itself leaves next to images and never restores from.
_SIDE_FILE = re.compile(r"^(stats-(dump|restore)|irmap-cache|[^/]*\.log|[^/]*\.pid)$")

# Bounds. A real core entry is a few KiB and a files.img entry less than one;
# these limits are far above any legitimate image and far below harm.
MAX_ENTRY_BYTES = 16 << 20
MAX_DEPTH = 32
MAX_FILES = 1 << 20
MAX_DISTINCT = 1 << 16

# Kinds of id, by what a mismatch means.
UID_KINDS = frozenset({"uid", "euid", "suid", "fsuid", "fown_uid", "fown_euid", "file_uid", "userns_uid", "ipc_uid"})
GID_KINDS = frozenset({"gid", "egid", "sgid", "fsgid", "groups", "file_gid", "userns_gid", "ipc_gid"})
# loginuid is audit identity, not privilege: CRIU only writes it with
# CAP_AUDIT_CONTROL, and a job started by slurmd inherits whatever login
# session started slurmd. It is reported, never checked.
INFO_KINDS = frozenset({"loginuid"})


@dataclass(frozen=True, order=True)
class Credential:
    """One id found in an image: what it is, its value, and where it was."""

    kind: str
    id: int
    file: str
    offset: int

    def describe(self) -> str:
        return f"{self.kind}={self.id} in {self.file} (entry at offset {self.offset})"


# --- schemas -----------------------------------------------------------------


@dataclass
class Msg:
    """Which fields of a protobuf message hold ids (``str`` leaf: the kind) or sub-messages.

    ``guard``: collect this message's ids only if the named field is nonzero.
    CRIU writes fown {uid 0, euid 0} for every file with no owner process
    (pid 0) and never applies them, so only fowns with a pid carry meaning.
    ``extent``: the message is a uid_gid_extent {first 1, lower_first 2,
    count 3}; it yields its lowest and highest host id under this kind, which
    is enough: a range of two or more ids can never be all the owner's.
    """

    fields: dict[int, str | Msg] = field(default_factory=dict)
    guard: int | None = None
    signed: bool = False  # int32 leaves (autofs): -1 means "not set"
    extent: str | None = None


_CREDS = Msg(
    {1: "uid", 2: "gid", 3: "euid", 4: "egid", 5: "suid", 6: "sgid", 7: "fsuid", 8: "fsgid", 14: "groups"}
)
_FOWN = Msg({1: "fown_uid", 2: "fown_euid"}, guard=5)
_FILE_PERMS = Msg({2: "file_uid", 3: "file_gid"})
_CORE = Msg({3: Msg({13: "loginuid"}), 5: Msg({10: _CREDS})})
_UNIX_SK = Msg({9: _FOWN, 13: _FILE_PERMS})

# file_entry field -> that type's entry, with the field number of its fown.
_FOWN_AT = {3: 5, 4: 13, 6: 6, 7: 11, 8: 3, 9: 3, 10: 3, 12: 3, 13: 4, 14: 3, 15: 5, 18: 4, 19: 4, 20: 4, 21: 4, 22: 5}
_FILE = Msg({num: Msg({fown: _FOWN}) for num, fown in _FOWN_AT.items()})
_FILE.fields[16] = _UNIX_SK

_IPC_DESC = Msg({2: "ipc_uid", 3: "ipc_gid", 4: "ipc_uid", 5: "ipc_gid"})
_IPC = Msg({1: _IPC_DESC})

_USERNS = Msg({1: Msg(extent="userns_uid"), 2: Msg(extent="userns_gid")})

_CG_PERMS = Msg({2: "file_uid", 3: "file_gid"})
_CG_DIR = Msg({3: Msg({3: _CG_PERMS}), 4: _CG_PERMS})
_CG_DIR.fields[2] = _CG_DIR  # children: the same message, recursively
_CGROUP = Msg({2: Msg({2: _CG_DIR})})

# Old-style per-type images (before files.img): each entry is that type's message.
_OLD_FILE_IMAGES = {
    "REG_FILES": 5,
    "INETSK": 13,
    "PACKETSK": 6,
    "NETLINK_SK": 11,
    "EVENTFD_FILE": 3,
    "EVENTPOLL_FILE": 3,
    "SIGNALFD": 3,
    "TIMERFD": 3,
    "INOTIFY_FILE": 4,
    "FANOTIFY_FILE": 3,
    "EXT_FILES": 5,
    "PIPES": 4,
    "TTY_FILES": 4,
    "BPFMAP_FILE": 4,
    "PIDFD": 5,
}


@dataclass(frozen=True)
class _Plan:
    schema: Msg
    # Bytes of payload after an entry, from that entry's top-level scalars;
    # None: entries follow each other directly.
    payload: Callable[[Mapping[int, int]], int] | None = None
    first_only: bool = False


def _round8(n: int) -> int:
    return (n + 7) & ~7


PLANS: dict[str, _Plan] = {
    "CORE": _Plan(_CORE),
    "CREDS": _Plan(_CREDS),
    "FILES": _Plan(_FILE),
    "UNIXSK": _Plan(_UNIX_SK),
    "TTY_INFO": _Plan(Msg({14: "file_uid", 15: "file_gid"})),
    "MEMFD_INODE": _Plan(Msg({2: "file_uid", 3: "file_gid"})),
    # The first entry describes the file; its data (or chunk entries) follow.
    "GHOST_FILE": _Plan(Msg({1: "file_uid", 2: "file_gid"}), first_only=True),
    "USERNS": _Plan(_USERNS),
    "CGROUP": _Plan(_CGROUP),
    "AUTOFS": _Plan(Msg({7: "file_uid", 8: "file_gid"}, signed=True)),
    "IPCNS_SEM": _Plan(Msg({1: _IPC_DESC}), payload=lambda top: _round8(2 * top.get(2, 0))),
    # Segments written before in_pagemaps (field 3) carry their data inline,
    # rounded to 4 bytes (criu/ipc_ns.c).
    "IPCNS_SHM": _Plan(
        Msg({1: _IPC_DESC}), payload=lambda top: 0 if top.get(3, 0) else (top.get(2, 0) + 3) & ~3
    ),
}
for _name, _fown_field in _OLD_FILE_IMAGES.items():
    PLANS[_name] = _Plan(Msg({_fown_field: _FOWN}))


# --- protobuf walking --------------------------------------------------------


class _Corrupt(Exception):
    """Internal: a structural problem at a position inside one entry."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.pos = pos


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise _Corrupt("truncated varint", pos)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >= 1 << 64:
                raise _Corrupt("varint wider than 64 bits", pos)
            return result, pos
    raise _Corrupt("varint longer than 10 bytes", pos)


def string_field(buf: bytes, number: int) -> str | None:
    """The last value of string field ``number`` of one protobuf message; ValueError if malformed.

    For the one-field messages CRIU sends outside its images (the image
    streamer's file requests).
    """
    pos, end, found = 0, len(buf), None
    try:
        while pos < end:
            key, pos = _varint(buf, pos, end)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(buf, pos, end)
            elif wire == 2:
                length, pos = _varint(buf, pos, end)
                if length > end - pos:
                    raise _Corrupt(f"field {num} claims {length} bytes, only {end - pos} left", pos)
                if num == number:
                    found = buf[pos : pos + length].decode("utf-8", "surrogateescape")
                pos += length
            elif wire in (1, 5) and end - pos >= (8 if wire == 1 else 4):
                pos += 8 if wire == 1 else 4
            else:
                raise _Corrupt(f"field {num}: wire type {wire} unexpected or truncated", pos)
    except _Corrupt as exc:
        raise ValueError(f"{exc} at byte {exc.pos}") from exc
    return found


def _walk(buf: bytes, pos: int, end: int, msg: Msg, depth: int, out: list[tuple[str, int]]) -> dict[int, int]:
    """Append the ``(kind, id)`` pairs of ``msg`` in ``buf[pos:end]`` to ``out``.

    Returns the message's scalar fields (last value of each varint field),
    which payload sizes, guards and extents are computed from.
    """
    if depth > MAX_DEPTH:
        raise _Corrupt(f"messages nested deeper than {MAX_DEPTH}", pos)
    mine: list[tuple[str, int]] = []
    scalars: dict[int, int] = {}
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise _Corrupt("field number 0", pos)
        target = msg.fields.get(num)
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            scalars[num] = value
            if isinstance(target, str):
                ident = _as_id(value, msg.signed, pos)
                if ident is not None:
                    mine.append((target, ident))
            elif isinstance(target, Msg):
                raise _Corrupt(f"field {num} should be a message but is a varint", pos)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _Corrupt(f"field {num} claims {length} bytes, only {end - pos} left", pos)
            sub_end = pos + length
            if isinstance(target, Msg):
                _walk(buf, pos, sub_end, target, depth + 1, mine)
            elif isinstance(target, str):  # packed repeated ids
                p = pos
                while p < sub_end:
                    value, p = _varint(buf, p, sub_end)
                    ident = _as_id(value, msg.signed, p)
                    if ident is not None:
                        mine.append((target, ident))
            pos = sub_end
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if end - pos < width:
                raise _Corrupt(f"truncated fixed{width * 8} (field {num})", pos)
            if target is not None:
                raise _Corrupt(f"field {num} has wire type fixed{width * 8}, expected an id", pos)
            pos += width
        else:
            raise _Corrupt(f"unsupported wire type {wire} (field {num})", pos)
    if msg.extent is not None:
        lower, count = scalars.get(2, 0), scalars.get(3, 0)
        if count:
            high = lower + count - 1
            if high > 0xFFFFFFFF:
                raise _Corrupt(f"id map extent {lower}+{count} goes past 2^32", pos)
            mine.append((msg.extent, lower))
            mine.append((msg.extent, high))
    if msg.guard is None or scalars.get(msg.guard, 0):
        out.extend(mine)
    return scalars


def _as_id(value: int, signed: bool, pos: int) -> int | None:
    """A 32-bit id from a varint; None for an int32 -1 ("not set")."""
    if signed:
        value &= 0xFFFFFFFF
        return None if value == 0xFFFFFFFF else value
    if value > 0xFFFFFFFF:
        raise _Corrupt(f"id {value} does not fit in 32 bits", pos)
    return value


# --- image files --------------------------------------------------------------


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    return data if data is not None else b""


class _FileScanner:
    """Reads one CRIU image file, entry by entry, never more than one entry in memory."""

    def __init__(self, f: BinaryIO, path: Path, size: int, found: dict[tuple[str, int], Credential]) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.found = found
        self.rtype = "?"

    def corrupt(self, message: str, offset: int, record: int | None = None) -> CorruptImageError:
        return CorruptImageError(
            message,
            path=str(self.path),
            offset=offset,
            record=record,
            rtype=self.rtype,
            hint="this CRIU image is malformed or was crafted; do not restore it, use an older checkpoint",
        )

    def scan(self) -> None:
        if self.size == 0:
            return  # CRIU writes empty images for empty sets and reads them as such
        head = _read_exact(self.f, 4)
        if len(head) < 4:
            raise self.corrupt("file shorter than a CRIU magic", 0)
        (magic,) = _U32.unpack(head)
        pos = 4
        if magic in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
            head = _read_exact(self.f, 4)
            if len(head) < 4:
                raise self.corrupt("file ends inside its header", 4)
            (magic,) = _U32.unpack(head)
            pos = 8
        name = KNOWN_MAGICS.get(magic)
        if name is None:
            raise UnsafeImageError(
                f"{self.path}: offset {pos - 4}: unknown CRIU image magic {magic:#010x}",
                hint="hpcckpt cannot vouch for the credentials in an image type it does not know; "
                "the image comes from another CRIU version or was crafted",
            )
        self.rtype = name
        if name == "IPCNS_MSG":
            self._scan_ipc_msg(pos)
            return
        plan = PLANS.get(name)
        if plan is None:
            return  # a type that records no ids
        index = 0
        while True:
            entry = self._entry(pos, index)
            if entry is None:
                return
            body, body_pos = entry
            scalars = self._walk_entry(body, body_pos, plan.schema, index)
            pos = body_pos + len(body)
            if plan.first_only:
                return
            if plan.payload is not None:
                pos = self._skip(pos, plan.payload(scalars), index)
            index += 1

    def _entry(self, pos: int, index: int) -> tuple[bytes, int] | None:
        """The next entry's bytes and the offset where they start; None at a clean end."""
        head = _read_exact(self.f, 4)
        if not head:
            return None
        if len(head) < 4:
            raise self.corrupt("file ends inside an entry's size", pos, index)
        (length,) = _U32.unpack(head)
        if length > MAX_ENTRY_BYTES:
            raise self.corrupt(f"entry claims {length} bytes, more than the {MAX_ENTRY_BYTES} allowed", pos, index)
        if length > self.size - pos - 4:
            raise self.corrupt(f"entry claims {length} bytes, only {self.size - pos - 4} left in the file", pos, index)
        body = _read_exact(self.f, length)
        if len(body) != length:
            raise self.corrupt("file shrank while being read", pos, index)
        return body, pos + 4

    def _skip(self, pos: int, n: int, index: int) -> int:
        if n > self.size - pos:
            raise self.corrupt(f"entry's data claims {n} bytes, only {self.size - pos} left", pos, index)
        self.f.seek(pos + n)
        return pos + n

    def _walk_entry(self, body: bytes, body_pos: int, schema: Msg, index: int) -> dict[int, int]:
        pairs: list[tuple[str, int]] = []
        try:
            scalars = _walk(body, 0, len(body), schema, 0, pairs)
        except _Corrupt as err:
            raise self.corrupt(str(err), body_pos + err.pos, index) from None
        for kind, ident in pairs:
            key = (kind, ident)
            if key not in self.found:
                if len(self.found) >= MAX_DISTINCT:
                    raise UnsafeImageError(
                        f"{self.path}: more than {MAX_DISTINCT} distinct ids in the images; refusing",
                        hint="a real job's image has a handful of ids; this one was crafted",
                    )
                self.found[key] = Credential(kind, ident, str(self.path), body_pos - 4)
        return scalars

    def _scan_ipc_msg(self, pos: int) -> None:
        """ipc_msg_entry {desc 1, qbytes 2, qnum 3}, then qnum x (ipc_msg {mtype 1, msize 2}, data)."""
        index = 0
        while True:
            entry = self._entry(pos, index)
            if entry is None:
                return
            body, body_pos = entry
            scalars = self._walk_entry(body, body_pos, _IPC, index)
            pos = body_pos + len(body)
            for _ in range(scalars.get(3, 0)):
                index += 1
                msg = self._entry(pos, index)
                if msg is None:
                    raise self.corrupt("message queue ends before its qnum messages", pos, index)
                mbody, mpos = msg
                mscalars = self._walk_entry(mbody, mpos, Msg(), index)
                pos = self._skip(mpos + len(mbody), _round8(mscalars.get(2, 0)), index)
            index += 1


# Directories hpcckpt keeps beside CRIU's images in a dump: the job's temporary files
# (hpcckpt.core.launch.scratch), put back by the resumer with the caller's credentials; CRIU never reads them.
SIDE_DIRS = frozenset({"hpcckpt-scratch"})


def _is_plain_dir(dfd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_member(dfd: int, name: str, dir_path: Path) -> tuple[int, os.stat_result] | None:
    """Open ``name`` in the directory for reading, refusing anything but a regular file.

    lstat first so that device nodes and FIFOs are never opened (opening one
    as root can block or have side effects), then O_NOFOLLOW and a check that
    the opened inode is the one that was lstat'ed, so a swap in between is seen.
    """
    path = dir_path / name
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        what = _file_kind(st.st_mode)
        raise UnsafeImageError(
            f"{path}: is a {what}; a CRIU image directory holds only regular files",
            hint="the image was crafted to make a privileged restore touch another file; do not restore it",
        )
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeImageError(f"{path}: became a symlink while being checked") from None
        raise UnreadableImageError(f"{path}: cannot open: {err.strerror}") from None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
        os.close(fd)
        raise UnsafeImageError(f"{path}: was replaced while being checked")
    return fd, fst


def _file_kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return word
    return "special file"


def scan_credentials(images_dir: Path) -> list[Credential]:
    """Every distinct (kind, id) recorded in the CRIU images of ``images_dir``, with where it was first seen.

    Raises UnsafeImageError for a symlink, device or other non-regular file,
    or an unknown image type; CorruptImageError for a malformed entry;
    UnreadableImageError when the directory cannot be read.
    """
    images_dir = Path(images_dir)
    try:
        dfd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeImageError(f"{images_dir}: is not a directory (or is a symlink to one)") from None
        raise UnreadableImageError(f"{images_dir}: cannot open: {err.strerror}") from None
    found: dict[tuple[str, int], Credential] = {}
    try:
        names = sorted(os.listdir(dfd))
        if len(names) > MAX_FILES:
            raise UnsafeImageError(f"{images_dir}: {len(names)} files, more than the {MAX_FILES} allowed")
        for name in names:
            if name in SIDE_DIRS and _is_plain_dir(dfd, name):
                continue
            opened = _open_member(dfd, name, images_dir)
            if opened is None:
                continue
            if _RAW_NAME.match(name) or _SIDE_FILE.match(name):
                os.close(opened[0])
                continue
            fd, st = opened
            with os.fdopen(fd, "rb") as f:
                _FileScanner(f, images_dir / name, st.st_size, found).scan()
    finally:
        os.close(dfd)
    return sorted(found.values())


def image_credentials(images_dir: Path) -> set[tuple[str, int]]:
    """The set of ``(kind, id)`` recorded in the CRIU images of ``images_dir``."""
    return {(c.kind, c.id) for c in scan_credentials(images_dir)}


def check_credentials(images_dir: Path, uid: int, gid: int, groups: Iterable[int] = ()) -> list[Credential]:
    """Refuse the images unless every uid in them is ``uid`` and every gid is ``gid`` or in ``groups``.

    Returns the credentials that were checked. Raises UnsafeImageError naming
    the file, the entry offset and the offending id.
    """
    allowed_gids = {gid, *groups}
    creds = scan_credentials(images_dir)
    # Report the most telling mismatch first: the process uid, then other uids.
    for cred in sorted(creds, key=lambda c: (c.kind not in UID_KINDS, c.kind not in ("uid", "gid"), c)):
        if cred.kind in INFO_KINDS:
            continue
        if cred.kind in UID_KINDS:
            ok = cred.id == uid
            want = f"uid {uid}"
        elif cred.kind in GID_KINDS:
            ok = cred.id in allowed_gids
            want = "gid " + ", ".join(str(g) for g in sorted(allowed_gids))
        else:  # a kind added to a schema without a rule: fail closed
            ok, want = False, "a known kind"
        if not ok:
            raise UnsafeImageError(
                f"{cred.file}: entry at offset {cred.offset}: {cred.kind} {cred.id} is not the image owner's "
                f"({want}); refusing to restore",
                hint="a checkpoint may only recreate processes with its owner's own credentials; "
                "this image was crafted or taken from another user's job",
            )
    return creds


# --- open regular files, as CRIU recorded them ----------------------------------
#
# The checkpoint pipeline dumps with the job left running, so sizes read from
# /proc afterwards are not the sizes at the freeze. CRIU records each regular
# file's size at the freeze (``reg_file_entry.size``) and refuses a restore
# when the file's size differs, so these are the sizes worth recording.
#
# Where they live (``images/*.proto`` of CRIU 4.2):
#
# * ``pstree.img``        pstree_entry {pid 1, ppid 2, pgid 3, sid 4, threads 5}: pids
#   inside the job's PID namespace
# * ``ids-<pid>.img``     task_kobj_ids_entry {files_id 2}: which fd table the task uses
# * ``fdinfo-<files_id>.img``  fdinfo_entry {id 1, flags 2 (FD_CLOEXEC), type 3, fd 4}
# * ``files.img``         file_entry {type 1, id 2, reg 3}; reg_file_entry {id 1,
#   flags 2 (open flags), pos 3, name 6, size 8 (absent for O_WRONLY|O_APPEND), ext 9,
#   mode 10 (st_mode: devices and directories are "regular" entries too)}
# * ``remap-fpath.img``   remap_file_path_entry {orig_id 1}: deleted or unlinked files,
#   which CRIU brings back from its own copy rather than from the path

FD_TYPE_REG = 1
MAX_ENTRIES = 1 << 20  # per image file; a job with a million open files is not a job
_MAX_PATH = 1 << 16

Fields = dict[int, list[int | bytes]]


@dataclass(frozen=True)
class DumpedFile:
    """A regular file open in a dumped task, as CRIU recorded it."""

    pid: int  # the task's pid inside the job's PID namespace (pstree.img)
    fd: int
    path: str
    flags: int  # open(2) flags
    pos: int
    size: int | None  # None: CRIU records (and checks) no size, as for O_WRONLY|O_APPEND files
    remapped: bool = False  # deleted or unlinked at the dump: restored from CRIU's own copy


def _fields(buf: bytes, pos: int, end: int) -> Fields:
    """One protobuf message's top-level fields: varints as ints, length-delimited as bytes."""
    out: Fields = {}
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise _Corrupt("field number 0", pos)
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            out.setdefault(num, []).append(value)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _Corrupt(f"field {num} claims {length} bytes, only {end - pos} left", pos)
            out.setdefault(num, []).append(buf[pos : pos + length])
            pos += length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if end - pos < width:
                raise _Corrupt(f"truncated fixed{width * 8} (field {num})", pos)
            out.setdefault(num, []).append(int.from_bytes(buf[pos : pos + width], "little"))
            pos += width
        else:
            raise _Corrupt(f"unsupported wire type {wire} (field {num})", pos)
    return out


class _Entries:
    """The entries of one CRIU image file of a known type, each decoded one level deep."""

    def __init__(self, dfd: int, images_dir: Path, name: str, rtype: str) -> None:
        self.dfd = dfd
        self.path = images_dir / name
        self.name = name
        self.rtype = rtype

    def corrupt(self, message: str, offset: int, record: int | None = None) -> CorruptImageError:
        return CorruptImageError(message, path=str(self.path), offset=offset, record=record, rtype=self.rtype,
                                 hint="CRIU wrote a malformed image or it was changed; take the checkpoint again")

    def read(self, *, required: bool) -> list[tuple[int, Fields]]:
        """(offset of the entry's size field, its fields) for each entry; [] for a missing optional file."""
        opened = _open_member(self.dfd, self.name, self.path.parent)
        if opened is None:
            if required:
                raise UnreadableImageError(f"{self.path}: missing from the CRIU dump",
                                           hint="the dump is incomplete; take the checkpoint again")
            return []
        fd, st = opened
        with os.fdopen(fd, "rb") as f:
            data = f.read(st.st_size + 1)
        if len(data) != st.st_size:
            raise self.corrupt(f"changed size while being read ({st.st_size} -> {len(data)} bytes)", 0)
        return self._parse(data)

    def _parse(self, data: bytes) -> list[tuple[int, Fields]]:
        if not data:
            return []
        if len(data) < 4:
            raise self.corrupt("file shorter than a CRIU magic", 0)
        (magic,) = _U32.unpack_from(data, 0)
        pos = 4
        if magic in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
            if len(data) < 8:
                raise self.corrupt("file ends inside its header", 4)
            (magic,) = _U32.unpack_from(data, 4)
            pos = 8
        if KNOWN_MAGICS.get(magic) != self.rtype:
            raise self.corrupt(f"magic {magic:#010x} is not that of a {self.rtype} image", pos - 4)
        out: list[tuple[int, Fields]] = []
        while pos < len(data):
            index = len(out)
            if index >= MAX_ENTRIES:
                raise self.corrupt(f"more than {MAX_ENTRIES} entries", pos, index)
            if len(data) - pos < 4:
                raise self.corrupt("file ends inside an entry's size", pos, index)
            (length,) = _U32.unpack_from(data, pos)
            if length > MAX_ENTRY_BYTES or length > len(data) - pos - 4:
                raise self.corrupt(f"entry claims {length} bytes, {len(data) - pos - 4} left in the file", pos,
                                   index)
            try:
                out.append((pos, _fields(data, pos + 4, pos + 4 + length)))
            except _Corrupt as err:
                raise self.corrupt(str(err), err.pos, index) from None
            pos += 4 + length
        return out


def _one(fields: Fields, num: int, default: int | None = None) -> int | None:
    """The last value of scalar field ``num`` (proto2: the last one wins)."""
    vals = [v for v in fields.get(num, ()) if isinstance(v, int)]
    return vals[-1] if vals else default


def _need(entries: _Entries, fields: Fields, num: int, offset: int, what: str) -> int:
    value = _one(fields, num)
    if value is None:
        raise entries.corrupt(f"{what} (field {num}) is missing", offset)
    return value


def _regular_files(files: _Entries) -> Iterator[tuple[int, int, Fields, list[bytes]]]:
    """(offset, file id, reg_file_entry fields, its names) of each regular-file entry of files.img."""
    for off, fe in files.read(required=True):
        if _one(fe, 1) != FD_TYPE_REG:
            continue
        fid = _need(files, fe, 2, off, "file id")
        body = [v for v in fe.get(3, ()) if isinstance(v, bytes)]
        if not body:
            raise files.corrupt(f"regular file {fid} has no reg_file_entry", off)
        try:
            reg = _fields(body[-1], 0, len(body[-1]))
        except _Corrupt as err:
            raise files.corrupt(f"reg_file_entry: {err}", off) from None
        yield off, fid, reg, [v for v in reg.get(6, ()) if isinstance(v, bytes)]


def dumped_files(images_dir: Path) -> list[DumpedFile]:
    """Every regular file open in the dumped tree, one record per (task, fd), in pstree order.

    Reads pstree.img, ids-N.img, fdinfo-N.img, files.img and remap-fpath.img
    with the same bounds and refusals as :func:`scan_credentials`.
    """
    images_dir = Path(images_dir)
    try:
        dfd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise UnreadableImageError(f"{images_dir}: cannot open: {err.strerror}") from None
    try:
        regs: dict[int, tuple[str, int, int, int | None]] = {}  # file id -> (name, flags, pos, size)
        files = _Entries(dfd, images_dir, "files.img", "FILES")
        for off, fid, reg, names in _regular_files(files):
            if not names or len(names[-1]) > _MAX_PATH or _one(reg, 9, 0):
                continue  # external files (ext) name no path of ours; CRIU resolves them itself
            mode = _one(reg, 10)
            if mode is not None and not stat.S_ISREG(mode):
                continue  # devices, directories: CRIU's "regular file" entries cover every path-opened fd
            name = names[-1].decode("utf-8", "surrogateescape")
            regs[fid] = (name, _need(files, reg, 2, off, "flags"), _need(files, reg, 3, off, "pos"), _one(reg, 8))
        remapped = {
            _need(remaps, e, 1, off, "orig_id")
            for remaps in [_Entries(dfd, images_dir, "remap-fpath.img", "REMAP_FPATH")]
            for off, e in remaps.read(required=False)
        }
        out: list[DumpedFile] = []
        tables: dict[int, list[tuple[int, int]]] = {}  # files_id -> [(fd, file id)]
        pstree = _Entries(dfd, images_dir, "pstree.img", "PSTREE")
        for off, task in pstree.read(required=True):
            pid = _need(pstree, task, 1, off, "pid")
            ids = _Entries(dfd, images_dir, f"ids-{pid}.img", "IDS")
            entries = ids.read(required=True)
            if len(entries) != 1:
                raise ids.corrupt(f"{len(entries)} entries, expected 1", 0)
            files_id = _need(ids, entries[0][1], 2, entries[0][0], "files_id")
            if files_id not in tables:
                fdinfo = _Entries(dfd, images_dir, f"fdinfo-{files_id}.img", "FDINFO")
                tables[files_id] = [
                    (_need(fdinfo, e, 4, o, "fd"), _need(fdinfo, e, 1, o, "id"))
                    for o, e in fdinfo.read(required=False) if _one(e, 3) == FD_TYPE_REG
                ]
            for fd, fid in tables[files_id]:
                if fid in regs:
                    name, flags, pos, size = regs[fid]
                    out.append(DumpedFile(pid, fd, name, flags, pos, size, fid in remapped))
        return out
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class RecordedPath:
    """A path CRIU will open again at restore: an open file, the program, a mapped library, the cwd."""

    path: str
    mode: int | None  # st_mode at the dump (CRIU refuses another one); None: not recorded
    size: int | None  # st_size at the dump for a regular file (CRIU refuses another one); None: not checked


def recorded_paths(images_dir: Path) -> list[RecordedPath]:
    """Every path-named file entry of files.img, once each, sorted: what the restore needs to find as it was.

    CRIU keeps one ``reg_file_entry`` per opened file whatever refers to it:
    a descriptor, a task's executable (``mm.img``), a file-backed mapping (a
    shared library, ``vma`` entries), its cwd and root (``fs.img``). At
    restore it reopens each by name and checks the mode and the size it
    recorded. External files (``ext``) and deleted or unlinked ones (which
    CRIU brings back from its own copy) are left out.
    """
    images_dir = Path(images_dir)
    try:
        dfd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise UnreadableImageError(f"{images_dir}: cannot open: {err.strerror}") from None
    try:
        files = _Entries(dfd, images_dir, "files.img", "FILES")
        remapped = {
            _need(remaps, e, 1, off, "orig_id")
            for remaps in [_Entries(dfd, images_dir, "remap-fpath.img", "REMAP_FPATH")]
            for off, e in remaps.read(required=False)
        }
        found: dict[str, RecordedPath] = {}
        for _off, fid, reg, names in _regular_files(files):
            if not names or len(names[-1]) > _MAX_PATH or _one(reg, 9, 0) or fid in remapped:
                continue
            name = names[-1].decode("utf-8", "surrogateescape")
            if not name.startswith("/"):
                name = "/" + name  # CRIU names files relative to the root of their mount namespace
            mode, size = _one(reg, 10), _one(reg, 8)
            prev = found.get(name)
            if prev is not None:
                # Two descriptors of one path: the same inode for CRIU; keep whatever is recorded.
                mode = prev.mode if mode is None else mode
                size = prev.size if size is None else size
            found[name] = RecordedPath(name, mode, size if mode is None or stat.S_ISREG(mode) else None)
        return [found[k] for k in sorted(found)]
    finally:
        os.close(dfd)
