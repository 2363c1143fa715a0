"""Detached OpenPGP signatures: made with gpg, checked with gpgv.

The publisher signs the mirror's index with a key it names (`--sign-key`,
VZTT_SIGN_KEY) from its own GnuPG home (GNUPGHOME or ~/.gnupg); a
passphrase, if the key has one, comes from the agent or from the file named
by VZTT_SIGN_PASSPHRASE_FILE. A host verifies with gpgv against keyrings it
chose to trust, nothing else: gpgv runs with an empty scratch home, so
neither the user's keyring nor a key server plays a part.

(Never name this module gpg.py: it would shadow python3-gpg, which dnf imports.)
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vztt.base import proc
from vztt.base.errors import FetchError, VzttError

TIMEOUT = 120


class SignatureError(FetchError):
    """A signature that does not verify against the trusted keys (exit 5, as a checksum mismatch)."""

    kind = "signature"


class SigningError(VzttError):
    """The publisher cannot sign: no such secret key, gpg failed."""

    exit_code = 7
    kind = "signing"


@dataclass(frozen=True)
class Verified:
    fingerprint: str          # of the primary key that made the signature
    signer: str               # user id, as gpgv printed it


def _tool(name: str) -> str:
    return proc.require_tool(name, "gpgv" if name == "gpgv" else "gpg")


def _gpg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("GNUPGHOME", "HOME", "PATH", "GPG_AGENT_INFO")}
    env.setdefault("PATH", "/usr/bin:/bin")
    env["LC_ALL"] = "C"
    return env


# --------------------------------------------------------------------------
# Keyrings
# --------------------------------------------------------------------------

def dearmor(data: bytes) -> bytes:
    """Binary OpenPGP packets from an ASCII-armored block (gpgv reads only binary keyrings)."""
    text = data.decode("ascii", errors="replace")
    m = re.search(r"-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n(.*?)-----END PGP PUBLIC KEY BLOCK-----", text, re.S)
    if not m:
        raise SignatureError("not an armored OpenPGP public key block")
    body = m.group(1).split("\n\n", 1)[-1] if re.match(r"[A-Za-z-]+: ", m.group(1)) else m.group(1)
    lines = [l.strip() for l in body.replace("\r", "").splitlines() if l.strip() and not l.startswith("=")]
    try:
        return base64.b64decode("".join(lines), validate=True)
    except ValueError:
        raise SignatureError("armored key block: bad base64") from None


def keyring_bytes(paths: list[Path]) -> bytes:
    """The trusted keys of `paths` (binary keyrings or armored key files) as one binary keyring."""
    out = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise SignatureError(f"trusted keyring {path}: cannot read: {e.strerror}") from None
        if data.lstrip().startswith(b"-----BEGIN PGP"):
            try:
                data = dearmor(data)
            except SignatureError as e:
                raise SignatureError(f"trusted keyring {path}: {e}") from None
        if not data:
            raise SignatureError(f"trusted keyring {path}: empty")
        out.append(data)
    return b"".join(out)


# --------------------------------------------------------------------------
# Verifying (gpgv)
# --------------------------------------------------------------------------

def verify(data: bytes, signature: bytes, keyring: bytes, what: str) -> Verified:
    """Check a detached signature over `data` with gpgv against `keyring` (binary
    OpenPGP keys). Returns the signer; SignatureError otherwise."""
    if not keyring:
        raise SignatureError(f"{what}: no trusted keys to verify the signature with")
    with tempfile.TemporaryDirectory(prefix="vztt-gpgv-") as tmp:
        home = Path(tmp)
        os.chmod(home, 0o700)
        (home / "trusted.gpg").write_bytes(keyring)
        (home / "data").write_bytes(data)
        (home / "data.sig").write_bytes(signature)
        done = proc.run([_tool("gpgv"), "--homedir", home, "--keyring", home / "trusted.gpg", "--status-fd", "1",
                         home / "data.sig", home / "data"], what=what, error=SignatureError, env=_gpg_env(),
                        timeout=TIMEOUT, check=False)
    status = [l.split()[1:] for l in done.stdout.splitlines() if l.startswith("[GNUPG:] ")]
    kinds = {s[0] for s in status if s}
    good = [s for s in status if s and s[0] == "GOODSIG"]
    valid = [s for s in status if s and s[0] == "VALIDSIG"]
    bad = kinds & {"BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG", "NO_PUBKEY", "NODATA", "UNEXPECTED"}
    if done.returncode != 0 or bad or not good or not valid or len(good) != len(valid):
        if "BADSIG" in kinds:
            why = "bad signature: the file was changed after it was signed"
        elif "NO_PUBKEY" in kinds or "ERRSIG" in kinds:
            key = next((s[1] for s in status if s and s[0] in ("NO_PUBKEY", "ERRSIG") and len(s) > 1), "?")
            why = f"signed by key {key}, which is not among the trusted keys"
        elif "EXPKEYSIG" in kinds or "REVKEYSIG" in kinds or "EXPSIG" in kinds:
            why = "signed with an expired or revoked key, or the signature expired"
        elif "NODATA" in kinds:
            why = "the signature file holds no OpenPGP signature"
        else:
            lines = [l for l in done.stderr.splitlines() if l.strip()]
            why = lines[-1].strip() if lines else f"gpgv exit status {done.returncode}"
        raise SignatureError(f"{what}: {why}")
    fingerprint = valid[0][10] if len(valid[0]) > 10 else valid[0][1]    # the primary key
    return Verified(fingerprint=fingerprint.upper(), signer=" ".join(good[0][2:]))


# --------------------------------------------------------------------------
# Signing (gpg)
# --------------------------------------------------------------------------

def _gpg(args: list[str], *, input: bytes | None = None, what: str) -> bytes:
    cmd = [_tool("gpg"), "--batch", "--no-tty", "--yes"]
    passfile = os.environ.get("VZTT_SIGN_PASSPHRASE_FILE")
    if passfile:
        cmd += ["--pinentry-mode", "loopback", "--passphrase-file", passfile]
    done = proc.run(cmd + args, input=input, what=what, error=SigningError, env=_gpg_env(), timeout=TIMEOUT,
                    check=False, binary=True, timeout_hint=" (waiting for a passphrase? set VZTT_SIGN_PASSPHRASE_FILE)")
    if done.returncode != 0:
        lines = [l for l in done.stderr.decode(errors="replace").splitlines() if l.strip()]
        raise SigningError(f"{what}: {lines[-1].strip() if lines else f'gpg exit status {done.returncode}'}")
    return done.stdout


def secret_key_fingerprint(key: str) -> str:
    """The fingerprint of the signing (sub)key's primary key `key` names; SigningError if there is no secret key."""
    if not key or key.startswith("-"):
        raise SigningError(f"signing key {key!r}: not a key id, fingerprint or user id")
    home = os.environ.get("GNUPGHOME") or "~/.gnupg"
    try:
        out = _gpg(["--with-colons", "--list-secret-keys", "--", key], what=f"signing key {key}").decode()
    except SigningError:
        raise SigningError(f"signing key {key}: no secret key for it in {home}") from None
    fprs = [l.split(":")[9] for l in out.splitlines() if l.startswith("fpr:")]
    if not fprs:
        raise SigningError(f"signing key {key}: no secret key for it in {home}")
    prim = [l for l in out.splitlines() if l.startswith("sec:")]
    if len(prim) != 1:
        raise SigningError(f"signing key {key}: names {len(prim)} secret keys; give its fingerprint")
    return fprs[0].upper()


def export_public(fingerprint: str) -> bytes:
    """The public key (binary) of `fingerprint`, from the publisher's keyring."""
    data = _gpg(["--export", "--", fingerprint], what=f"signing key {fingerprint}")
    if not data:
        raise SigningError(f"signing key {fingerprint}: gpg --export gave nothing")
    return data


def sign_detached(data: bytes, fingerprint: str, armor: bool = True) -> bytes:
    """A detached signature over `data`, made by `fingerprint`: armored, or binary
    (systemd-pull's SHA256SUMS.gpg)."""
    return _gpg(["--local-user", fingerprint, *(["--armor"] if armor else []), "--detach-sign", "--output", "-",
                 "-"], input=data, what=f"signing with {fingerprint}")


def sign_file(path: Path, fingerprint: str) -> bytes:
    """An armored detached signature over the file `path` (read by gpg, never held in memory)."""
    return _gpg(["--local-user", fingerprint, "--armor", "--detach-sign", "--output", "-", "--", str(path)],
                what=f"signing {path} with {fingerprint}")
