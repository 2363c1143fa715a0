"""Foreign architectures: can this host run another architecture's programs?

An arm64 template built on an x86_64 host runs its maintainer scripts (dpkg
chrooted into the image), its hooks and, in the boot test, its init through
qemu-user, which the kernel starts for every aarch64 ELF through a
binfmt_misc entry. Two answers are needed, and checked before anything is
resolved or booted:

- `registered()`: an enabled entry (in an enabled binfmt_misc) whose
  magic/mask match that architecture's ELF header, both static (ET_EXEC) and
  PIE (ET_DYN), and whose flags hold F ("fix binary"). With F the kernel
  opens the interpreter when the entry is registered, so it works inside a
  chroot, an image or a container root that does not contain it, and nothing
  of the emulator ever goes into a template. Without F the kernel would look
  the interpreter up inside the tree at exec time.
- `runs()`: a 132-byte static program of that architecture (three
  instructions, exit(42), written here: no libc, no package) exits 42.

`init_arch(tree)` reads the machine of a tree's /sbin/init: the container
runtime compares it with the host's to know that a boot is emulated.
"""

from __future__ import annotations

import os
import platform
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vztt.base.errors import EnvironmentProblem, VzttError
from vztt.base.proc import run

BINFMT = Path("/proc/sys/fs/binfmt_misc")
EXIT_STATUS = 42

# vztt's arch name (uname -m) -> ELF e_machine and a program that exits 42.
# aarch64: movz x0,#42; movz x8,#93 (__NR_exit); svc #0
MACHINES: dict[str, tuple[int, bytes]] = {
    "aarch64": (0xB7, struct.pack("<3I", 0xD2800540, 0xD2800BA8, 0xD4000001)),
}
E_MACHINE_NAMES = {0x3E: "x86_64", 0xB7: "aarch64", 0x03: "i386", 0x28: "arm", 0xF3: "riscv64",
                   0x15: "ppc64", 0x16: "s390x"}
# What a Debian host installs and runs to get the entry (the Makefile's `make binfmt`).
SETUP_HINT = {"aarch64": "apt-get install qemu-user-static binfmt-support, then `make binfmt` "
                         "(mount binfmt_misc, update-binfmts --enable qemu-aarch64)"}


def host_arch() -> str:
    """The host's architecture in vztt's naming (uname -m)."""
    return platform.machine()


def is_foreign(arch: str) -> bool:
    return arch != host_arch()


@dataclass(frozen=True)
class Entry:
    """One magic-type binfmt_misc entry, as /proc/sys/fs/binfmt_misc/NAME says."""
    name: str
    enabled: bool
    interpreter: str
    flags: str
    offset: int
    magic: bytes
    mask: bytes

    def matches(self, header: bytes) -> bool:
        chunk = header[self.offset:self.offset + len(self.magic)]
        if len(chunk) < len(self.magic):
            return False
        mask = self.mask or b"\xff" * len(self.magic)
        return all((c & m) == (g & m) for c, m, g in zip(chunk, mask, self.magic))


def _ident() -> bytes:
    return b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)        # ELFCLASS64, LSB, EV_CURRENT, SYSV ABI


def elf_header(arch: str, e_type: int = 2) -> bytes:
    """The first 64 bytes of a little-endian ELF64 file for `arch` (what the entries' magic is
    compared with)."""
    e_machine, _ = MACHINES[arch]
    return _ident() + struct.pack("<HHIQQQIHHHHHH", e_type, e_machine, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0)


def tiny_executable(arch: str) -> bytes:
    """A whole static executable: ELF header, one PT_LOAD (read + execute), the code."""
    e_machine, code = MACHINES[arch]
    base, offset = 0x400000, 64 + 56
    header = _ident() + struct.pack("<HHIQQQIHHHHHH", 2, e_machine, 1, base + offset, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    size = offset + len(code)
    return header + struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x10000) + code


def entries(binfmt: Path = BINFMT) -> list[Entry]:
    """Every magic-type entry (extension entries have no magic and are skipped)."""
    found = []
    for path in sorted(binfmt.iterdir()) if binfmt.is_dir() else []:
        if path.name in ("register", "status"):
            continue
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(" ", 1) if " " in line else (line, "") for line in lines[1:])
        if "magic" not in fields or not lines:
            continue
        found.append(Entry(path.name, lines[0] == "enabled", fields.get("interpreter", ""),
                           fields.get("flags:", fields.get("flags", "")).strip(),
                           int(fields.get("offset", "0")), bytes.fromhex(fields["magic"]),
                           bytes.fromhex(fields.get("mask", ""))))
    return found


def registered(arch: str, binfmt: Path = BINFMT) -> tuple[Entry | None, str]:
    """The entry that runs `arch`'s programs, or None and why not (one clause)."""
    if not (binfmt / "status").exists():
        return None, f"binfmt_misc is not mounted on {binfmt}"
    if (binfmt / "status").read_text().strip() != "enabled":
        return None, f"binfmt_misc is disabled ({binfmt}/status)"
    headers = [elf_header(arch, 2), elf_header(arch, 3)]          # static and PIE
    matching = [e for e in entries(binfmt) if all(e.matches(h) for h in headers)]
    if not matching:
        return None, f"no binfmt_misc entry runs {arch} programs"
    usable = [e for e in matching if e.enabled and "F" in e.flags]
    if not usable:
        e = matching[0]
        if not e.enabled:
            return None, f"binfmt_misc entry {e.name} for {arch} is disabled"
        return None, (f"binfmt_misc entry {e.name} for {arch} has flags '{e.flags}', without F (fix binary: "
                      "the interpreter would have to be inside every image)")
    return usable[0], ""


def runs(arch: str) -> tuple[bool, str]:
    """Execute a tiny static `arch` program; (True, "") if it exits 42."""
    with tempfile.TemporaryDirectory(prefix="vztt-binfmt.") as tmp:
        exe = Path(tmp) / f"exit42-{arch}"
        exe.write_bytes(tiny_executable(arch))
        exe.chmod(0o755)
        proc = run([exe], what=f"a {arch} test program", check=False, timeout=60)
    if proc.returncode == EXIT_STATUS:
        return True, ""
    return False, f"a {arch} test program exited with {proc.returncode}, not {EXIT_STATUS}"


def require(arch: str, why: str, error: type[VzttError] = EnvironmentProblem) -> str | None:
    """Nothing for the host's own architecture; for another one, the binfmt entry's
    description, or `error` in one line naming what to install or mount."""
    if not is_foreign(arch):
        return None
    if arch not in MACHINES:
        raise error(f"{why}: this {host_arch()} host cannot run {arch} programs (vztt emulates only "
                    f"{', '.join(MACHINES)})")
    entry, reason = registered(arch)
    if entry is None:
        raise error(f"{why}: this {host_arch()} host cannot run {arch} programs: {reason}; "
                    f"{SETUP_HINT[arch]}")
    ok, reason = runs(arch)
    if not ok:
        raise error(f"{why}: binfmt_misc entry {entry.name} ({entry.interpreter}) is registered but {reason}")
    return f"{arch} under emulation: binfmt_misc {entry.name} (flags {entry.flags}) -> {entry.interpreter}"


def resolve_in_tree(tree: Path, path: str, limit: int = 40) -> Path:
    """`path` as the tree's own root resolves it (absolute links are the tree's, never the
    host's): /sbin/init -> <tree>/usr/lib/systemd/systemd. For reading only."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = resolved[:-1]
            continue
        if part == ".":
            continue
        candidate = tree.joinpath(*resolved, part)
        if candidate.is_symlink():
            limit -= 1
            if limit < 0:
                raise OSError(f"{path}: too many levels of symbolic links in {tree}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
        else:
            resolved.append(part)
    return tree.joinpath(*resolved)


def elf_arch(path: Path) -> str | None:
    """uname -m of an ELF file's machine (None: not an ELF file or unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return E_MACHINE_NAMES.get(machine, f"e_machine {machine:#x}")


def init_arch(tree: Path, init: str = "/sbin/init") -> str | None:
    """The architecture a root tree's init is built for."""
    return elf_arch(resolve_in_tree(tree, init))
