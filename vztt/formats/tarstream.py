"""Tar streams for the other hosts' formats: the plain archive read as a stream,
rewritten member by member, and small archives made in memory.

The host formats are made from the plain archive (formats/__init__.py), so
they hold exactly its tree: GNU tar wrote it with vztt's reproducible flags,
and `rewrite_tar` copies every member byte for byte (headers, pax records with
xattrs, ACLs and file capabilities, hard links, device nodes) except the few
a format must change (LXC's /etc/hostname and /etc/hosts placeholders). A
no-op rewrite gives back the identical tar.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

import lz4.frame

BLOCK = 512
RECORD = 10240            # GNU tar's default record (20 blocks): archives end padded to it
CHUNK = 1 << 20

# old content (None: absent) -> new content (None: leave the member out)
Replace = Callable[[Optional[bytes]], Optional[bytes]]
# (normalized name, tar type flag) of every member, as it passes
Seen = Callable[[str, bytes], None]


class TarStreamError(ValueError):
    """A tar stream that ends early or has a header this reader does not follow."""


@contextlib.contextmanager
def plain_stream(archive: Path) -> Iterator[BinaryIO]:
    """The uncompressed tar of a plain archive (`.tar.lz4`), as a stream."""
    with lz4.frame.open(archive, "rb") as fh:
        yield fh  # type: ignore[misc]


def _read_exact(src: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            raise TarStreamError(f"tar stream ends {n - got} bytes early")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _number(field: bytes) -> int:
    if field[0] & 0x80:                                   # GNU base-256 for big values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" \0")
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, bytes]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


def normalized(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _member_bytes(info: tarfile.TarInfo, data: bytes) -> bytes:
    info.size = len(data)
    head = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return head + data + b"\0" * (_padded(len(data)) - len(data))


def rewrite_tar(src: BinaryIO, write: Callable[[bytes], None], replace: dict[str, Replace], epoch: int,
                seen: Seen | None = None) -> None:
    """Copy a tar stream member by member, byte for byte, except the regular files named
    in `replace` (normalized names: "etc/hostname"), whose content the function gives.
    Names absent from the stream are added at its end, in name order (root-owned, 0644,
    mtime `epoch`). The result ends as GNU tar ends one: two zero blocks, padded to a
    whole record."""
    pending = dict(replace)
    written = 0
    prefix = "./"

    def emit(data: bytes) -> None:
        nonlocal written
        write(data)
        written += len(data)

    try:
        while True:
            head = _read_exact(src, BLOCK)
            if head == b"\0" * BLOCK:
                break
            group = [head]
            pax: dict[str, bytes] = {}
            longname: Optional[bytes] = None
            while head[156:157] in (b"x", b"L", b"K"):           # extended headers of the next member
                size = _number(head[124:136])
                data = _read_exact(src, _padded(size))
                group.append(data)
                if head[156:157] == b"x":
                    pax.update(_pax_records(data[:size]))
                elif head[156:157] == b"L":
                    longname = data[:size].rstrip(b"\0")
                head = _read_exact(src, BLOCK)
                group.append(head)
            kind = head[156:157]
            if kind == b"g":                                      # global header: copied as it is
                emit(b"".join(group) + _read_exact(src, _padded(_number(head[124:136]))))
                continue
            if "path" in pax:
                raw_name = pax["path"]
            elif longname is not None:
                raw_name = longname
            else:
                name_field = head[0:100].split(b"\0", 1)[0]
                ustar_prefix = head[345:500].split(b"\0", 1)[0] if head[257:262] == b"ustar" else b""
                raw_name = ustar_prefix + b"/" + name_field if ustar_prefix else name_field
            name = raw_name.decode("utf-8", "surrogateescape")
            prefix = "./" if name.startswith("./") else ""
            size = int(pax["size"]) if "size" in pax else _number(head[124:136])
            body_len = _padded(size) if kind not in (b"1", b"2", b"3", b"4", b"5", b"6") else 0
            key = normalized(name)
            if seen is not None:
                seen(key, kind)
            if key in pending and kind in (b"0", b"\0", b"7"):
                new = pending.pop(key)(_read_exact(src, body_len)[:size])
                if new is not None:
                    info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
                    info.name = name
                    info.uname = info.gname = ""
                    emit(_member_bytes(info, new))
                continue
            emit(b"".join(group))
            left = body_len
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise TarStreamError(f"tar stream ends inside {name}")
                emit(chunk)
                left -= len(chunk)
    except (ValueError, IndexError) as e:
        if isinstance(e, TarStreamError):
            raise
        raise TarStreamError(f"unreadable tar header ({e})") from None
    while src.read(CHUNK):                                    # the rest of the last record
        pass
    for key in sorted(pending):
        new = pending[key](None)
        if new is None:
            continue
        info = tarfile.TarInfo(prefix + key)
        info.mode, info.uid, info.gid, info.mtime = 0o644, 0, 0, epoch
        info.uname = info.gname = ""
        emit(_member_bytes(info, new))
    end = b"\0" * (2 * BLOCK)
    emit(end + b"\0" * ((-(written + len(end))) % RECORD))


def small_tar(files: dict[str, bytes], epoch: int, dirs: tuple[str, ...] = ()) -> bytes:
    """A reproducible tar of a few files held in memory: names as given, sorted, root-owned,
    0644 (directories 0755), mtime `epoch`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries: list[tuple[str, bytes | None]] = [(d, None) for d in dirs] + list(files.items())
        for name, data in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def hosts_with(name: str, old: Optional[bytes]) -> bytes:
    """/etc/hosts with a `127.0.1.1 <name>` line after localhost's (Debian's way of
    naming the machine), any earlier 127.0.1.1 line dropped."""
    lines = (old or b"127.0.0.1\tlocalhost\n").decode(errors="replace").splitlines(keepends=True)
    lines = [line if line.endswith("\n") else line + "\n" for line in lines if not line.startswith("127.0.1.1")]
    at = next((i + 1 for i, line in enumerate(lines) if line.split()[:1] == ["127.0.0.1"]), 0)
    lines.insert(at, f"127.0.1.1\t{name}\n")
    return "".join(lines).encode()
