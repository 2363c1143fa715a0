"""The other container hosts, run by the tests on this machine with their own
programs, each confined to a scratch directory and cleaned up after:

  TlsNginx   tests/nginx.py's loopback nginx plus an https server (a throwaway CA,
             TLS 1.3: Incus speaks nothing older) over the same /mirror/ root
  Lxc        lxc-create -t local / -t download, lxc-start, lxc-attach, lxc-stop (LXC 5)
  systemd    systemd-pull with our key as its keyring (private mount namespace),
             systemd-nspawn --boot without machined
  Podman     podman load/run and skopeo, storage and config in scratch (runc, vfs)
  Incusd     a private incusd (INCUS_DIR in scratch), its client, a pool without network

What each host needs here and why (crun vs runc, podman's ulimits, Incus's
https, LXC's wgetrc...) is in docs/hosts.md.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nginx import Nginx, free_port

TLS_SERVER = """\
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location /mirror/ {{
      alias {mirror}/;
    }}
  }}
}}
"""
RUNNING = ("running", "degraded")


def missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None and not Path(t).is_file()]


def run(*argv: str | os.PathLike[str], env: dict[str, str] | None = None, timeout: float = 300,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input)


def check(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def wait_running(*prefix: str | os.PathLike[str], timeout: float = 240, env: dict[str, str] | None = None) -> str:
    """`<prefix> systemctl is-system-running --wait` until it says running or degraded
    (right after start it fails: systemd's private socket is not there yet)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        try:
            state = run(*prefix, "systemctl", "is-system-running", "--wait", env=env, timeout=120).stdout.strip()
        except subprocess.TimeoutExpired:
            state = "timeout"
        if state in RUNNING:
            return state
        time.sleep(0.5)
    raise AssertionError(f"{' '.join(map(str, prefix))}: systemd never reached running (last: {state!r})")


# -- TLS ------------------------------------------------------------------------------

def make_ca(d: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed; `bundle` = the system's CAs + ours."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (d / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                       "server.pem", "ext.cnf"))
    check(run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vztt test CA",
              "-keyout", ca_key, "-out", ca, "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign"))
    check(run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key,
              "-out", csr))
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    check(run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
              "-extfile", ext, "-out", cert))
    bundle = d / "bundle.pem"
    bundle.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes() + ca.read_bytes())
    return {"ca": ca, "cert": cert, "key": key, "bundle": bundle}


class TlsNginx(Nginx):
    """/mirror/ over http on `port` and over https (our test CA) on `tls_port`."""

    def __init__(self, base: Path, tls: dict[str, Path]):
        super().__init__(base)
        self.tls, self.tls_port = tls, 0

    def config(self) -> str:
        self.tls_port = free_port()
        plain = super().config().rstrip()
        assert plain.endswith("}")
        return plain[:-1] + TLS_SERVER.format(port=self.tls_port, cert=self.tls["cert"], key=self.tls["key"],
                                              mirror=self.mirror_root)

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}/mirror/"


# -- cgroups the hosts leave behind -------------------------------------------------------

def cgroup_dirs(name: str) -> list[Path]:
    return sorted(Path("/sys/fs/cgroup").glob(f"*/{name}")) + sorted(Path("/sys/fs/cgroup").glob(name))


def remove_cgroups(name: str) -> None:
    """Empty cgroup directories `name` in every hierarchy, depth first (busy ones stay)."""
    for top in cgroup_dirs(name):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            pass


# -- LXC ----------------------------------------------------------------------------------

class Lxc:
    """LXC with a private lxcpath and image cache; containers get only a loopback
    (lxc.net.0.type = empty) and no AppArmor (this kernel has none)."""

    def __init__(self, scratch: Path, ca: Path | None = None):
        self.path, self.cache = scratch / "lxc", scratch / "lxc-cache"
        self.path.mkdir(parents=True)
        self.cache.mkdir()
        self.conf = scratch / "ct.conf"
        self.conf.write_text("lxc.net.0.type = empty\nlxc.apparmor.profile = unconfined\n")
        self.wgetrc = scratch / "wgetrc"
        self.wgetrc.write_text(f"ca_certificate = {ca}\n" if ca else "")
        self.names: list[str] = []
        self.had_pivot = bool(cgroup_dirs("lxc.pivot"))

    def env(self) -> dict[str, str]:
        # lxc-create hands its environment to the template: wget (lxc-download's only client,
        # https only) trusts our CA through WGETRC; the image cache stays in scratch.
        return {"WGETRC": str(self.wgetrc), "LXC_CACHE_PATH": str(self.cache)}

    def create(self, name: str, template: str, *args: str) -> subprocess.CompletedProcess[str]:
        self.names.append(name)
        return run("lxc-create", "-P", self.path, "-n", name, "-f", self.conf, "-t", template, "--", *args,
                   env=self.env(), timeout=600)

    def attach(self, name: str) -> tuple[str, ...]:
        return ("lxc-attach", "-P", str(self.path), "-n", name, "--clear-env", "--")

    def start(self, name: str) -> None:
        check(run("lxc-start", "-P", self.path, "-n", name, "-o", self.path / f"{name}.log"))

    def stop(self, name: str) -> subprocess.CompletedProcess[str]:
        return run("lxc-stop", "-P", self.path, "-n", name, "-t", "30", timeout=120)

    def cleanup(self) -> None:
        for name in self.names:
            run("lxc-stop", "-P", self.path, "-n", name, "-k", timeout=60)
            run("lxc-destroy", "-P", self.path, "-n", name, timeout=120)
        if not self.had_pivot:
            remove_cgroups("lxc.pivot")


# -- systemd ------------------------------------------------------------------------------

# systemd-pull 252 has no keyring option: it reads /etc/systemd/import-pubring.gpg if it
# exists, else /usr/lib/systemd/import-pubring.gpg. In a private mount namespace our key
# is bound over whichever exists (the host's keyring is never touched).
PULL_SCRIPT = """
keyring=$1 root=$2 url=$3 name=$4; shift 4
for ring in /etc/systemd/import-pubring.gpg /usr/lib/systemd/import-pubring.gpg; do
  [ -e "$ring" ] && mount --bind "$keyring" "$ring"
done
exec /lib/systemd/systemd-pull tar --image-root="$root" --sync=no "$@" "$url" "$name"
"""


def systemd_pull(keyring: Path, image_root: Path, url: str, name: str,
                 verify: str = "signature") -> subprocess.CompletedProcess[str]:
    """A fresh image root every time: a second pull of the same URL and ETag into one root
    skips download and verification."""
    image_root.mkdir(parents=True)
    return run("unshare", "--mount", "--propagation", "private", "/bin/sh", "-eu", "-c", PULL_SCRIPT, "sh",
               keyring, image_root, url, name, f"--verify={verify}", timeout=600)


def remove_image_root(image_root: Path) -> None:
    """systemd-pull keeps a pristine copy (.tar-<url>.<etag>) with FS_IMMUTABLE_FL set."""
    for kept in image_root.glob(".tar-*"):
        run("chattr", "-R", "-i", kept)
    shutil.rmtree(image_root, ignore_errors=True)


@contextmanager
def nspawn_booted(directory: Path, name: str, log: Path) -> Iterator[int]:
    """systemd-nspawn --boot of `directory` (no machined here: --register=no --keep-unit),
    its private network only; yields the container's init pid; halted (SIGRTMIN+3) after."""
    with open(log, "w") as out:
        proc = subprocess.Popen(["systemd-nspawn", "--quiet", f"--directory={directory}", f"--machine={name}",
                                 "--boot", "--register=no", "--keep-unit", "--private-network",
                                 "--console=read-only", "--link-journal=no"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    init = 0
    try:
        for _ in range(600):                 # nspawn's child named systemd (an intermediate child comes first)
            found = run("pgrep", "-P", str(proc.pid), "-x", "systemd").stdout.split()
            if found:
                init = int(found[0])
                break
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.1)
        assert init, "systemd-nspawn started no systemd"
        yield init
        os.kill(init, signal.SIGRTMIN + 3)    # systemd's halt
        assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- podman / skopeo ------------------------------------------------------------------------

CONTAINERS_CONF = """\
[containers]
netns = "none"
log_driver = "k8s-file"
# Raising a hard limit needs CAP_SYS_RESOURCE, which this machine's bounding set lacks:
# the container gets the limits we have, not podman's defaults (nofile 1048576).
default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]
[network]
network_config_dir = "{scratch}/cni"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{scratch}/events.log"
# crun 1.8 refuses hybrid cgroups whose cgroup2 holds a controller; runc does not.
runtime = "runc"
tmp_dir = "{scratch}/tmp"
image_copy_tmp_dir = "{scratch}/tmp"
volume_path = "{scratch}/root/volumes"
static_dir = "{scratch}/root/libpod"
"""
STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{scratch}/root"
runroot = "{scratch}/runroot"
"""


class Podman:
    """podman and skopeo with storage, config, temp files and cgroups of their own."""

    def __init__(self, scratch: Path, cgroup: str):
        self.scratch, self.cgroup = scratch, cgroup
        (scratch / "tmp").mkdir(parents=True)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        (scratch / "containers.conf").write_text(CONTAINERS_CONF.format(scratch=scratch, nofile=nofile))
        (scratch / "storage.conf").write_text(STORAGE_CONF.format(scratch=scratch))
        # containers/image keeps a blob-info cache for root in /var/lib/containers/cache,
        # whatever the storage root: removed after if it was not there before.
        self.had_var = Path("/var/lib/containers").exists()
        self.had_cni_lock = Path("/etc/cni/net.d/cni.lock").exists()

    def env(self) -> dict[str, str]:
        return {"CONTAINERS_CONF": str(self.scratch / "containers.conf"),
                "CONTAINERS_STORAGE_CONF": str(self.scratch / "storage.conf"), "TMPDIR": str(self.scratch / "tmp")}

    def __call__(self, *args: str | os.PathLike[str], tool: str = "podman",
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
        extra = ["--cgroup-parent", f"/{self.cgroup}"] if tool == "podman" and args[:1] == ("run",) else []
        return run(tool, *args[:1], *extra, *args[1:], env=self.env(), timeout=timeout)

    def cleanup(self) -> None:
        self("rm", "-af", timeout=120)
        self("rmi", "-af", timeout=120)
        remove_cgroups(self.cgroup)
        if not self.had_var:
            shutil.rmtree("/var/lib/containers", ignore_errors=True)
        if not self.had_cni_lock:
            Path("/etc/cni/net.d/cni.lock").unlink(missing_ok=True)


# -- Incus --------------------------------------------------------------------------------

INCUSD = "/usr/libexec/incus/incusd"
PRESEED = """\
config:
  images.auto_update_interval: "0"
profiles:
- name: default
  devices:
    root:
      path: /
      pool: default
      type: disk
storage_pools:
- name: default
  driver: dir
"""


class Incusd:
    """A private incusd: database, images, pool and socket in scratch; no bridge, no NAT.
    Go's TLS trusts our CA through SSL_CERT_FILE (client and daemon)."""

    def __init__(self, scratch: Path, bundle: Path):
        # Incus's containers run as uid 1000000 and up: every directory above their root must
        # let others through, which pytest's (0700) do not; /var/tmp does.
        self.dir = Path(tempfile.mkdtemp(prefix="vztt-incus-", dir="/var/tmp"))
        self.dir.chmod(0o711)
        self.conf = scratch / "incus-client"
        self.conf.mkdir()
        self.bundle = bundle
        self.log = scratch / "incusd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.had_pivot = bool(cgroup_dirs("lxc.pivot"))

    def env(self) -> dict[str, str]:
        return {"INCUS_DIR": str(self.dir), "INCUS_CONF": str(self.conf), "SSL_CERT_FILE": str(self.bundle)}

    def __call__(self, *args: str | os.PathLike[str], timeout: float = 600,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run("incus", *args, env=self.env(), timeout=timeout, input=input)

    def start(self) -> None:
        self.proc = subprocess.Popen([INCUSD, f"--logfile={self.log}"], env={**os.environ, **self.env()},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        check(self("admin", "waitready", "--timeout=60", timeout=90))
        check(self("admin", "init", "--preseed", input=PRESEED))

    def stop(self) -> None:
        if self.proc is not None:
            for name in self("list", "--format=csv", "--columns=n", timeout=60).stdout.split():
                self("delete", "-f", name, timeout=120)
            self("admin", "shutdown", timeout=180)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for mount in ("shmounts", "guestapi"):
            if os.path.ismount(self.dir / mount):
                run("umount", "-l", self.dir / mount)
        shutil.rmtree(self.dir, ignore_errors=True)
        if not self.had_pivot:
            remove_cgroups("lxc.pivot")


# -- small templates in every format, made by the formats themselves --------------------

TINY_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path
from vztt import formats
from vztt.base.mounts import enter_private_namespace
from vztt.formats import FormatContext
enter_private_namespace()           # incus unpacks onto a tmpfs: it goes with this process
a = json.loads(sys.argv[1])
cache, name = Path(a["cache"]), a["name"]
ctx = FormatContext(name=name, tree=Path("/nonexistent"), out=cache, work=Path(a["work"]),
                    source_date_epoch=a["epoch"], lock_digest=a["lock"], packages=[], settings=a["settings"],
                    plain=cache / formats.get("plain").file_name(name))
records = {}
for fmt_name in a["formats"]:
    fmt = formats.get(fmt_name)
    outs = {p.suffix: cache / p.cache_name(name) for p in fmt.part_list()}
    records[fmt_name] = fmt.write(dataclasses.replace(ctx, out=outs[fmt.part_list()[0].suffix], outs=outs)).to_json()
print(json.dumps(records))
"""
TINY_SETTINGS = {"distro": "tiny", "version": "1", "release": "one", "arch": "x86_64",
                 "summary": "Tiny 1 (one) x86_64 minimal", "compression.level": 0}


def write_host_formats(cache: Path, work: Path, name: str, manifest: dict, settings: dict, epoch: int,
                       formats: tuple[str, ...]) -> dict:
    """The other hosts' formats of the cached plain archive of `name`, written by the formats'
    own code (no image, no install: seconds), added to its manifest."""
    import json
    import sys
    work.mkdir(parents=True, exist_ok=True)
    args = {"cache": str(cache), "name": name, "work": str(work), "epoch": epoch,
            "lock": manifest["lock_digest"], "settings": settings, "formats": list(formats)}
    out = check(run(sys.executable, "-c", TINY_SCRIPT, json.dumps(args), timeout=600))
    manifest["archives"].update(json.loads(out))
    manifest["formats"] = ["plain", *formats]
    (cache / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def tiny_host_template(cache: Path, work: Path, name: str = "tiny-1-x86_64-minimal", payload: bytes = b"payload\n",
                       formats: tuple[str, ...] = ("lxc", "incus", "oci", "nspawn"), **kw: object) -> dict:
    """A tiny plain template (mirrorkit's) plus the other hosts' formats, written by the
    formats' own code from its archive; the manifest names them all."""
    from mirrorkit import tiny_template
    manifest = tiny_template(cache, name, payload, **kw)
    settings = {**TINY_SETTINGS, "arch": manifest["arch"]}
    return write_host_formats(cache, work, name, manifest, settings, 1735689600, formats)


def host_formats_of_build(src: Path, name: str, recipes: Path, cache: Path, work: Path,
                          formats: tuple[str, ...] = ("lxc", "incus", "oci", "nspawn")) -> dict:
    """A real build's other formats without building it again (an arm64 build under
    emulation takes minutes): its plain archive, manifest and lock linked into `cache`,
    then the formats written from the archive with the recipe's settings at compression
    level 0 (the fastest; every level gives the same metadata), from the lock's source date."""
    import json
    from vztt.recipe.recipe import RecipeStore
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "locks").mkdir(exist_ok=True)
    for rel in (f"{name}.plain.tar.lz4", f"locks/{name}.lock.json"):
        os.link(src / rel, cache / rel)
    manifest = json.loads((src / f"{name}.manifest.json").read_text())
    settings = {**RecipeStore(recipes).load(name).merged, "compression.level": 0}
    return write_host_formats(cache, work, name, manifest, settings, manifest["source_date_epoch"], formats)
