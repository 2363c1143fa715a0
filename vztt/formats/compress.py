"""Compression for the other hosts' formats: one level setting, reproducible bytes, every core.

The recipe's `compression.level` (0-9, default 6) sets, in one place:

  xz        `xz -<level>` (lxc's rootfs and meta, nspawn's tar, incus's metadata)
  gzip      zlib level max(1, level) (the OCI layer: OCI's common layer type)
  squashfs  xz from level 6 up (the smallest, what images.linuxcontainers.org
            ships), zstd at 3 x level (at least 1) below: 1 s instead of 47 s of CPU
            for debian-12, for tests and quick local builds

Reproducibility, per tool (docs/hosts.md):

- xz's multi-threaded encoder (`--threads=0`) cuts the input into blocks of a
  fixed size and compresses them independently: the output does not depend on
  the number of threads (-T2, -T0 and -T+1 give the same bytes; -T1 is the
  single-threaded encoder and gives others). `--no-adjust` forbids falling back
  to that encoder when memory is short; the block size is pinned. Other xz
  releases may encode differently: the bytes hold for one xz-utils (Debian 12:
  5.4.1), as the lock holds for one vztt.
- zlib (Python's) has no threads and no time stamp when mtime=0 and no name;
  zlib-ng or pigz would give other bytes.
- mksquashfs 4.5 is multi-threaded and reproducible by default (its fragment
  and inode order does not depend on the processor count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Mapping

from vztt.base.errors import BuildError
from vztt.base.proc import PIPE, kill_tree, spawn, tool_env

LEVEL_KEY = "compression.level"
DEFAULT_LEVEL = 6
SQUASHFS_XZ_FROM = 6
XZ_FLAGS = ["--format=xz", "--check=crc64", "--threads=0", "--no-adjust", "--block-size=24MiB"]
CHUNK = 1 << 20


@dataclass(frozen=True)
class Compression:
    level: int = DEFAULT_LEVEL

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Compression":
        return cls(int(settings.get(LEVEL_KEY, DEFAULT_LEVEL)))

    @property
    def xz(self) -> str:
        return f"xz -{self.level}"

    @property
    def gzip_level(self) -> int:
        return max(1, self.level)

    @property
    def squashfs(self) -> list[str]:
        """mksquashfs's compressor options."""
        if self.level >= SQUASHFS_XZ_FROM:
            return ["-comp", "xz"]
        return ["-comp", "zstd", "-Xcompression-level", str(max(1, 3 * self.level))]

    @property
    def squashfs_name(self) -> str:
        return "xz" if self.level >= SQUASHFS_XZ_FROM else f"zstd -{max(1, 3 * self.level)}"


class XzWriter:
    """`xz -<level>` writing `out`, fed by write(); used as a context manager. A
    failure (no space, xz missing or killed) is one BuildError naming the format and xz."""

    def __init__(self, out: Path, compression: Compression, fmt: str):
        self.out, self.fmt = out, fmt
        self._file: IO[bytes] = open(out, "wb")
        try:
            self.proc = spawn(["xz", f"-{compression.level}", *XZ_FLAGS, "--stdout", "-"],
                              what=f"format {fmt}: xz", error=BuildError, env=tool_env(), stdin=PIPE,
                              stdout=self._file, stderr=PIPE)
        except BaseException:
            self._file.close()
            raise
        self.bytes_in = 0

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            self._fail()
        self.bytes_in += len(data)

    def _fail(self) -> None:
        assert self.proc.stderr is not None
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        err = self.proc.stderr.read().decode(errors="replace").strip()
        status = self.proc.wait()
        lines = [line.removeprefix("xz: ") for line in err.splitlines() if line.strip()]
        raise BuildError(f"format {self.fmt}: xz: {lines[-1] if lines else f'exit status {status}'} "
                         f"(writing {self.out})")

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        if self.proc.wait() != 0:
            self._fail()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        self._file.close()

    def __enter__(self) -> "XzWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.close()
        finally:
            if self.proc.returncode is None:
                kill_tree(self.proc)
            for stream in (self.proc.stdin, self.proc.stderr):
                if stream is not None and not stream.closed:
                    try:
                        stream.close()
                    except BrokenPipeError:
                        pass
            self._file.close()


def xz_bytes(data: bytes, out: Path, compression: Compression, fmt: str) -> None:
    """A small file, xz'd to `out`."""
    with XzWriter(out, compression, fmt) as xz:
        xz.write(data)

