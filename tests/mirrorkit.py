"""Fixtures and helpers shared by the mirror and create tests: gpg keys made
for the run, a loopback nginx, small hand-made templates and archives.

Test modules import the fixtures they use (`from mirrorkit import keys, web`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lz4.frame
import pytest

from nginx import DAV_PASSWORD, DAV_USER, Nginx

NAME = "debian-12-x86_64-minimal"


# -- keys ----------------------------------------------------------------------------

@dataclass
class Keys:
    home: Path               # GNUPGHOME holding both secret keys
    publisher: str           # fingerprint of the key that signs the mirrors
    intruder: str            # a key nobody trusts
    trusted: Path            # binary keyring with the publisher's public key (what hosts trust)
    trusted_armored: Path    # the same key, armored

    def env(self, **extra: str) -> dict[str, str]:
        return {"GNUPGHOME": str(self.home), "VZTT_KEYRING": str(self.trusted), "VZTT_SIGN_KEY": self.publisher,
                **extra}


def _gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", *args], input=input,
                          capture_output=True, check=True).stdout


def _fingerprint(home: Path, uid: str) -> str:
    out = _gpg(home, "--with-colons", "--list-secret-keys", uid).decode()
    return next(l.split(":")[9] for l in out.splitlines() if l.startswith("fpr:"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    base = tmp_path_factory.mktemp("keys")
    home = base / "gnupg"
    home.mkdir(mode=0o700)
    try:
        for uid in ("vztt test publisher <publisher@example.invalid>", "intruder <intruder@example.invalid>"):
            _gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        publisher = _fingerprint(home, "publisher@example.invalid")
        intruder = _fingerprint(home, "intruder@example.invalid")
        trusted = base / "trusted.gpg"
        trusted.write_bytes(_gpg(home, "--export", publisher))
        armored = base / "trusted.asc"
        armored.write_bytes(_gpg(home, "--armor", "--export", publisher))
        yield Keys(home=home, publisher=publisher, intruder=intruder, trusted=trusted, trusted_armored=armored)
    finally:
        # gpg started an agent for this home: it must not outlive the tests.
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def sign(keys: Keys, key: str, data_file: Path) -> None:
    """(Re-)sign a file with `key`, as a publisher would: data_file.asc."""
    sig = _gpg(keys.home, "--local-user", key, "--armor", "--detach-sign", "--output", "-", str(data_file))
    data_file.with_name(data_file.name + ".asc").write_bytes(sig)


# -- the web server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with Nginx(tmp_path_factory.mktemp("www")) as server:
        yield server


DAV_ENV = {"VZTT_PUBLISH_USER": DAV_USER, "VZTT_PUBLISH_PASSWORD": DAV_PASSWORD}


# -- small templates made by hand ------------------------------------------------------

@dataclass
class Member:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    devmajor: int = 0
    devminor: int = 0


def tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.mode, info.mtime = m.type, m.mode, 1700000000
            info.linkname, info.devmajor, info.devminor = m.link, m.devmajor, m.devminor
            if m.type == tarfile.DIRTYPE:
                info.mode = 0o755
            info.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(m.data) if m.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def small_tree(extra: bytes = b"", hostname_file: bool = True) -> list[Member]:
    """A tiny root: enough for create's personalization and the tests' checks."""
    members = [Member("./", tarfile.DIRTYPE), Member("etc", tarfile.DIRTYPE),
               Member("etc/hosts", data=b"127.0.0.1\tlocalhost\n"),
               Member("etc/machine-id", data=b"0123456789abcdef0123456789abcdef\n", mode=0o444),
               Member("etc/os-release", data=b"ID=tiny\n"),
               Member("bin", tarfile.SYMTYPE, link="usr/bin"),
               Member("usr", tarfile.DIRTYPE), Member("usr/bin", tarfile.DIRTYPE),
               Member("usr/bin/payload", data=extra or b"payload\n", mode=0o755),
               Member("usr/bin/payload-link", tarfile.LNKTYPE, link="usr/bin/payload"),
               Member("etc/localtime", tarfile.SYMTYPE, link="/usr/share/zoneinfo/Etc/UTC")]
    return members


def install_template(cache: Path, name: str, archive: bytes, *, tar_size: int | None = None,
                     boot_test: str = "passed", created: str = "2026-01-01T00:00:00+00:00",
                     build_id: str | None = None, arch: str = "x86_64") -> dict:
    """Put a plain archive and its manifest into a cache, as a build would."""
    cache.mkdir(parents=True, exist_ok=True)
    file = f"{name}.plain.tar.lz4"
    (cache / file).write_bytes(archive)
    rec = {"file": file, "format": "plain", "sha256": hashlib.sha256(archive).hexdigest(), "size": len(archive)}
    if tar_size is not None:
        rec["tar_size"] = tar_size
    manifest = {"format": 1, "name": name, "created": created, "distro": "debian", "release": "tiny",
                "version": "0", "arch": arch, "recipe_digest": "sha256:" + "1" * 64,
                "lock_digest": "sha256:" + hashlib.sha256(archive).hexdigest(), "formats": ["plain"],
                "archive": rec, "archives": {"plain": rec}, "package_count": 0, "packages": [],
                "boot_test": {"result": boot_test}}
    if build_id:
        manifest["build_id"] = build_id
    (cache / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def tiny_template(cache: Path, name: str = "tiny-1-x86_64", payload: bytes = b"payload\n", **kw: object) -> dict:
    raw = tar_bytes(small_tree(payload))
    return install_template(cache, name, lz4.frame.compress(raw), tar_size=len(raw), **kw)  # type: ignore[arg-type]


# -- observing a directory -------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path below root: (mode, size, sha256 of regular files)."""
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, digest)
    return out


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".vztt-create-" in p.name]


# -- a connection that breaks -------------------------------------------------------------

class CuttingProxy:
    """A TCP proxy in front of nginx that drops a connection once, after `cut_after`
    bytes of one response (the first response that gets that far)."""

    def __init__(self, port: int, cut_after: int):
        self.target = ("127.0.0.1", port)
        self.cut_after = cut_after
        self.cuts = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, location: str) -> str:
        return f"http://127.0.0.1:{self.port}/{location}/"

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)

        def up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if self.cuts == 0 and sent + len(data) > self.cut_after:
                    self.cuts += 1
                    client.sendall(data[:self.cut_after - sent])
                    client.shutdown(socket.SHUT_RDWR)
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def copy_mirror(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
