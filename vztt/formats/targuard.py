"""The tar guard: a parser of tar streams that lets a member through only when it is safe.

GNU tar does the extraction (formats/safetar.py), but it only ever sees bytes
that passed `TarGuard` first. The guard parses the tar stream itself, header
by header, and lets a member through only when it is safe:

- every name and hard-link target is relative, without `..`, below the root;
- no member goes through, or replaces, an earlier member that is not a
  directory: a symlink (wherever it points, absolute targets included, as a
  root filesystem has plenty) can never be written through, so no link leads
  out of the destination;
- device nodes: only the harmless character devices a root may ship
  (null, zero, full, random, urandom, tty, console, ptmx); no block devices;
- only the header types, pax keywords and xattr namespaces it understands,
  valid header checksums, one way to read every field: what the guard checked
  is what tar extracts (no parser differential);
- bounded sizes: total stream bytes, member count, name, pax header lengths.

A member that fails stops the stream before tar sees its header.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Callable

from vztt.base.errors import VzttError

BLOCK = 512


class UnsafeArchive(VzttError):
    """An archive that is damaged, truncated, or tries to escape its destination."""

    exit_code = 6
    kind = "archive"


# Character devices a root filesystem may carry (major, minor).
SAFE_CHAR_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)}
PAX_KEYS = {b"path", b"linkpath", b"size", b"uid", b"gid", b"uname", b"gname", b"mtime", b"atime", b"ctime",
            b"comment", b"charset", b"hdrcharset", b"SCHILY.acl.access", b"SCHILY.acl.default"}
XATTR_PREFIXES = (b"SCHILY.xattr.", b"LIBARCHIVE.xattr.")
XATTR_NAMESPACES = (b"user.", b"security.", b"system.posix_acl_access", b"system.posix_acl_default")
TYPES = {b"0": "file", b"1": "hardlink", b"2": "symlink", b"3": "chardev", b"4": "blockdev", b"5": "dir",
         b"6": "fifo"}
POSIX_MAGIC, GNU_MAGIC = b"ustar\x0000", b"ustar  \x00"
MAX_PAX = 1 << 20
MAX_LONGNAME = 1 << 16
MAX_PATH = 4096
MAX_NAME = 255
ZERO_BLOCK = bytes(BLOCK)
_OCTAL = re.compile(rb"[0-7]*")


@dataclass
class Limits:
    max_bytes: int                          # uncompressed tar stream
    max_members: int = 1_000_000
    types: frozenset[str] = frozenset({"file", "hardlink", "symlink", "chardev", "dir", "fifo"})
    allow: Callable[[str, str], bool] | None = None    # (path, type) -> allowed; None: any path


@dataclass
class Member:
    path: str          # normalized, relative, "" for the root itself
    type: str
    size: int
    link: str = ""


@dataclass
class GuardStats:
    members: int = 0
    bytes: int = 0               # tar stream bytes seen
    data_bytes: int = 0          # file contents
    names: list[str] = field(default_factory=list)   # first few, for reports


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _number(field_: bytes, what: str) -> int:
    if field_[:1] == b"\x80":                # GNU base-256, positive
        return int.from_bytes(field_[1:], "big")
    if field_[:1] and field_[0] & 0x80:
        raise UnsafeArchive(f"negative or malformed {what} field")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(text):
        raise UnsafeArchive(f"bad octal {what} field {text[:20]!r}")
    return int(text, 8) if text else 0


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")[:200]


def normalize(name: bytes, what: str = "member") -> str:
    """A member name as a relative path below the root ("" is the root), or UnsafeArchive."""
    if b"\0" in name:
        raise UnsafeArchive(f"{what} {_show(name)!r}: NUL in name")
    if name.startswith(b"/"):
        raise UnsafeArchive(f"{what} {_show(name)!r}: absolute path")
    parts = [p for p in name.decode("utf-8", "surrogateescape").split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"{what} {_show(name)!r}: '..' leads out of the destination")
    if len(name) > MAX_PATH or (parts and max(map(len, parts)) > MAX_NAME):
        raise UnsafeArchive(f"{what} {_show(name)[:80]!r}...: name too long")
    return "/".join(parts)


class TarGuard:
    """Feed it a tar stream in pieces; it returns the part that may go on to tar.

    Bytes of a member are held back until its header (and the pax or GNU long
    name records before it) checked out; the contents of a checked member pass
    straight through. `finish()` raises if the stream ended early.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self.held = bytearray()      # extended headers (and their records) waiting for their member's header
        self.partial = bytearray()   # a header split across two pieces
        self.data_left = 0           # bytes of the current member's data (padded) still to pass
        self.meta: dict[bytes, bytes] | None = None
        self.longname: bytes | None = None
        self.longlink: bytes | None = None
        self.meta_kind = b""         # b"x", b"L", b"K" while reading an extended header's record
        self.meta_data = bytearray()
        self.meta_size = 0
        self.pos = 0                 # stream offset of the next byte to parse
        self.ended = False
        self.kinds: dict[str, str] = {}     # path -> "dir" | "file" | other type, for every path seen
        self.stats = GuardStats()

    # -- the stream ---------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """The pieces of `data` (and of earlier, held data) that may go on to tar, in order.
        Member contents are passed as slices of `data`, not copied: write them before
        the buffer behind `data` is reused."""
        n = len(data)
        self.stats.bytes += n
        if self.ended:
            return []                 # padding after the end marker: ignored, never passed on
        if self.stats.bytes > self.limits.max_bytes:
            raise UnsafeArchive(f"archive unpacks to more than {self.limits.max_bytes} bytes")
        mv = memoryview(data)
        out: list[bytes | memoryview] = []
        i = 0
        while i < n:
            if self.data_left:
                take = min(self.data_left, n - i)
                if self.meta_kind:
                    self.held += mv[i:i + take]
                    self.meta_data += mv[i:i + take]
                else:
                    out.append(mv[i:i + take])       # contents of a checked member pass straight on
                i += take
                self.pos += take
                self.data_left -= take
                if not self.data_left and self.meta_kind:
                    self._meta_done()
                continue
            if self.partial or n - i < BLOCK:
                take = min(BLOCK - len(self.partial), n - i)
                self.partial += mv[i:i + take]
                i += take
                if len(self.partial) < BLOCK:
                    break
                header = bytes(self.partial)
                self.partial.clear()
            else:
                header = bytes(mv[i:i + BLOCK])
                i += BLOCK
            if header == ZERO_BLOCK:
                # End of archive: tar stops at the first zero block; so do we, and hand it two.
                if self.meta is not None or self.longname is not None or self.longlink is not None:
                    raise UnsafeArchive("archive ends right after an extended header")
                out.append(ZERO_BLOCK * 2)
                self.ended = True
                return out
            self._header(header)
            self.pos += BLOCK
            if self.meta_kind or self.meta is not None or self.longname is not None or self.longlink is not None:
                self.held += header                    # an extended header: held until its member checks out
                if not self.meta_kind:                 # an empty record
                    continue
            else:
                if self.held:                          # the member's extended headers, then its header
                    out.append(bytes(self.held))
                    self.held.clear()
                out.append(header)
        return out

    def finish(self) -> None:
        if not self.ended:
            if self.data_left or self.held or self.partial or self.meta_kind:
                raise UnsafeArchive(f"truncated archive: it ends inside a member, after {self.stats.bytes} bytes")
            raise UnsafeArchive(f"truncated archive: no end-of-archive marker after {self.stats.bytes} bytes")

    # -- headers ------------------------------------------------------------

    def _header(self, h: bytes) -> None:
        stored = _number(h[148:156], "checksum")
        if stored != _byte_sum(h) and stored != sum(b - 256 if b > 127 else b for b in h[:148] + b" " * 8 + h[156:]):
            raise UnsafeArchive(f"bad header checksum at byte {self.pos} (damaged or not a tar archive)")
        magic = h[257:265]
        if magic not in (POSIX_MAGIC, GNU_MAGIC):
            raise UnsafeArchive(f"unsupported tar header format (magic {magic!r})")
        typeflag = h[156:157]
        size = _number(h[124:136], "size")
        if typeflag in (b"x", b"L", b"K"):
            limit = MAX_PAX if typeflag == b"x" else MAX_LONGNAME
            if size > limit:
                raise UnsafeArchive(f"extended header of {size} bytes (limit {limit})")
            if (typeflag == b"x" and self.meta is not None) or (typeflag == b"L" and self.longname is not None) \
                    or (typeflag == b"K" and self.longlink is not None):
                raise UnsafeArchive("two extended headers of the same kind for one member")
            self.meta_kind, self.meta_size = typeflag, size
            self.meta_data = bytearray()
            self.data_left = _padded(size)
            if not self.data_left:
                self._meta_done()
            return
        kind = TYPES.get(typeflag)
        if kind is None:
            raise UnsafeArchive(f"unsupported member type {typeflag!r} (sparse, multi-volume, global "
                                "headers and the like are refused)")
        meta = self.meta or {}
        if magic == POSIX_MAGIC and h[345:500].strip(b"\0"):
            name = _cstr(h[345:500]) + b"/" + _cstr(h[0:100])
        else:
            name = _cstr(h[0:100])
        if self.longname is not None:
            name = self.longname
        link = _cstr(h[157:257])
        if self.longlink is not None:
            link = self.longlink
        if b"path" in meta:
            if self.longname is not None:
                raise UnsafeArchive("both a GNU long name and a pax path for one member")
            name = meta[b"path"]
        if b"linkpath" in meta:
            if self.longlink is not None:
                raise UnsafeArchive("both a GNU long link and a pax linkpath for one member")
            link = meta[b"linkpath"]
        if b"size" in meta:
            size = _pax_int(meta[b"size"], "size")
        self.meta = self.longname = self.longlink = None
        member = self._check(name, kind, size, link, h)
        self.stats.members += 1
        if len(self.stats.names) < 20:
            self.stats.names.append(member.path or ".")
        if self.stats.members > self.limits.max_members:
            raise UnsafeArchive(f"more than {self.limits.max_members} members")
        carries_data = kind == "file"
        if not carries_data and size:
            # tar skips what a header says follows; we do the same, but nothing sane ships that.
            raise UnsafeArchive(f"member {member.path!r}: a {kind} with {size} bytes of data")
        self.stats.data_bytes += size
        self.data_left = _padded(size)

    def _meta_done(self) -> None:
        data = bytes(self.meta_data[:self.meta_size])
        kind, self.meta_kind = self.meta_kind, b""
        self.meta_data = bytearray()
        if kind == b"x":
            self.meta = _parse_pax(data)
        elif kind == b"L":
            self.longname = _cstr(data)
        else:
            self.longlink = _cstr(data)

    def _check(self, name: bytes, kind: str, size: int, link: bytes, h: bytes) -> Member:
        if kind not in self.limits.types:
            raise UnsafeArchive(f"member {_show(name)!r}: {kind} members are not allowed here")
        if kind != "dir" and name.endswith(b"/"):
            raise UnsafeArchive(f"member {_show(name)!r}: a {kind} named like a directory")
        path = normalize(name)
        if not path and kind != "dir":
            raise UnsafeArchive(f"member {_show(name)!r}: the root itself must be a directory")
        if self.limits.allow is not None and not self.limits.allow(path, kind):
            raise UnsafeArchive(f"member {path!r} ({kind}) does not belong in this archive")
        # Nothing may go through, or replace, something that is not a directory.
        # A directory in `kinds` had its own ancestors checked: usually one lookup does.
        parent = path.rpartition("/")[0]
        if parent and self.kinds.get(parent) != "dir":
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                seen = self.kinds.get(parent)
                if seen is None:
                    self.kinds[parent] = "dir"          # tar makes it a directory
                elif seen != "dir":
                    raise UnsafeArchive(f"member {path!r} goes through {parent!r}, a {seen} of this archive: "
                                        "a link could lead it out of the destination")
        before = self.kinds.get(path)
        if before is not None and not (before == "dir" and kind == "dir"):
            raise UnsafeArchive(f"member {path!r} ({kind}) would replace an earlier {before}")
        text_link = ""
        if kind == "hardlink":
            target = normalize(link, f"hard link {path!r} ->")
            if self.kinds.get(target) != "file":
                raise UnsafeArchive(f"hard link {path!r} -> {target!r}: the target is not an earlier regular file")
            text_link = target
        elif kind == "symlink":
            if not link or b"\0" in link or len(link) > MAX_PATH:
                raise UnsafeArchive(f"symlink {path!r}: empty or overlong target")
            text_link = link.decode("utf-8", "backslashreplace")
        elif kind in ("chardev", "blockdev"):
            dev = (_number(h[329:337], "devmajor"), _number(h[337:345], "devminor"))
            if kind == "blockdev" or dev not in SAFE_CHAR_DEVICES:
                raise UnsafeArchive(f"member {path!r}: device node {kind} {dev[0]}:{dev[1]} is refused")
        self.kinds[path] = "dir" if kind == "dir" else ("file" if kind == "file" else kind)
        return Member(path=path, type=kind, size=size, link=text_link)


def _byte_sum(h: bytes) -> int:
    """The unsigned tar checksum (the checksum field counted as spaces). adler32's low
    half is 1 + the byte sum mod 65521: exact for pieces of at most 256 bytes."""
    return ((zlib.adler32(h[:148]) & 0xFFFF) + (zlib.adler32(h[156:412]) & 0xFFFF)
            + (zlib.adler32(h[412:]) & 0xFFFF) - 3 + 8 * 32)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _pax_int(value: bytes, what: str) -> int:
    if not value.isdigit() or len(value) > 20:
        raise UnsafeArchive(f"pax {what}: {value[:30]!r} is not a number")
    return int(value)


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:          # padding after the last record
            if data[pos:].strip(b"\0"):
                raise UnsafeArchive("pax header: data after the padding")
            break
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not data[pos:space].isdigit():
            raise UnsafeArchive("pax header: malformed record length")
        length = int(data[pos:space])
        record = data[space + 1:pos + length]
        if length <= space - pos + 2 or pos + length > len(data) or not record.endswith(b"\n"):
            raise UnsafeArchive("pax header: record runs past its header")
        key, eq, value = record[:-1].partition(b"=")
        if not eq or not key:
            raise UnsafeArchive("pax header: record without a keyword")
        if key.startswith(XATTR_PREFIXES):
            xname = key.split(b".xattr.", 1)[1]
            if not xname.startswith(XATTR_NAMESPACES):
                raise UnsafeArchive(f"pax header: extended attribute {_show(xname)!r} is not allowed "
                                    "(user., security. and POSIX ACLs only)")
        elif key not in PAX_KEYS:
            raise UnsafeArchive(f"pax header: unsupported keyword {_show(key)!r}")
        if key in (b"path", b"linkpath") and not value:
            raise UnsafeArchive(f"pax header: empty {key.decode()}")
        if key in records:
            raise UnsafeArchive(f"pax header: {_show(key)} given twice")
        records[key] = value
        pos += length
    return records
