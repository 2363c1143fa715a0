"""The helper process that turns a root tree into a running container.

Run by container.py as a script with the host's Python (never imported):

    python3 _stage.py boot CONFIG_JSON
        unshare the namespaces, fork the container's PID 1, which joins the
        container's cgroups, sets up its mounts, pivot_roots into the tree and
        execs init. The first process stays outside as its parent and exits
        with init's status (128+N if init died of signal N; SIGINT, 130, is a
        normal poweroff). It reports on the status pipe `pid N` (init's pid on
        the host), or `error: MESSAGE` if the setup or the exec failed; the
        pipe reaches end of file once init has been exec'd or has given up.

        With "go_fd" in the config, PID 1 reads `go` from that pipe before it
        execs init: the host puts the container's network interface in place
        once it knows init's pid, before the distribution's own network
        configuration runs.

    python3 _stage.py enter PROCS_FILE... -- COMMAND...
        join the container's cgroups, then exec COMMAND (nsenter).

A fresh process rather than a fork of the caller: forking a Python process that
has threads (the console reader) and then doing real work in the child is not
safe. When the owner dies, the first process gets SIGTERM and kills init
(PR_SET_PDEATHSIG; init gets SIGKILL should the first process die first), so
a killed owner does not leave a container running; its mounts and cgroups are
for cleanup_stale.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys

import _confine as C
import _linux as L

DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7),
           "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
LINKS = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
         "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}
NOSUID_NODEV = L.MS_NOSUID | L.MS_NODEV
NO_EXEC = NOSUID_NODEV | L.MS_NOEXEC


def die_with_parent(expected_parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    L.prctl(L.PR_SET_PDEATHSIG, sig)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # it died before the prctl


def join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def setup_mounts(root: str, console: str, container: str) -> None:
    """Mount what systemd needs under `root`, all in our private mount namespace."""
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)  # nothing propagates back to the host
    L.mount(root, root, None, L.MS_BIND | L.MS_REC)    # pivot_root wants a mount point

    def under(path: str) -> str:
        full = os.path.join(root, path)
        if os.path.islink(full):   # a mount (or mkdir) there would follow it out of the tree
            raise ValueError(f"/{path} is a symlink in the tree: nothing is mounted over a symlink")
        os.makedirs(full, exist_ok=True)
        return full

    proc = under("proc")
    L.mount("proc", proc, "proc", NO_EXEC)
    # Read-only sysfs: udev and other units that need to write there skip themselves.
    L.mount("sysfs", under("sys"), "sysfs", NO_EXEC | L.MS_RDONLY)
    # The cgroup2 tree, rooted at our cgroup namespace, i.e. the container's cgroup.
    L.mount("cgroup2", os.path.join(root, "sys/fs/cgroup"), "cgroup2", NO_EXEC)

    dev = under("dev")
    L.mount("tmpfs", dev, "tmpfs", L.MS_NOSUID | L.MS_NOEXEC, "mode=755,size=4m")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"{dev}/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)  # mknod's mode went through the umask
    for name, target in LINKS.items():
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts")
    L.mount("devpts", f"{dev}/pts", "devpts", L.MS_NOSUID | L.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5")
    os.mkdir(f"{dev}/shm")
    L.mount("tmpfs", f"{dev}/shm", "tmpfs", NOSUID_NODEV, "mode=1777")
    # Our own pty as the console: a tty shared with the caller would let
    # console-getty's vhangup() hang the caller up.
    with open(f"{dev}/console", "w"):
        pass
    L.mount(console, f"{dev}/console", None, L.MS_BIND)

    L.mount("tmpfs", under("run"), "tmpfs", NOSUID_NODEV, "mode=755")
    os.makedirs(f"{root}/run/systemd")
    with open(f"{root}/run/systemd/container", "w") as f:
        f.write(container + "\n")
    L.mount("tmpfs", under("tmp"), "tmpfs", NOSUID_NODEV, "mode=1777")
    mask_host_paths(root)


def mask_host_paths(root: str) -> None:
    """The host kernel's knobs read-only, its memory, keys, firmware and debug
    files hidden (_confine.py has the lists and why)."""
    proc, sys_ = os.path.join(root, "proc"), os.path.join(root, "sys")
    for path in C.PROC_READONLY:   # sysctls, sysrq, buses are the host kernel's
        full = os.path.join(proc, path)
        if os.path.lexists(full):  # (no CONFIG_MAGIC_SYSRQ: no sysrq-trigger)
            L.mount(full, full, None, L.MS_BIND | L.MS_REC)
            L.mount(None, full, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | NO_EXEC)
    # An empty file to bind over files: made on the /dev tmpfs, unlinked once bound
    # (the binds keep the inode), so nothing inside names it.
    empty = os.path.join(root, "dev", ".vztt-masked")
    with open(empty, "w"):
        pass
    os.chmod(empty, 0)
    try:
        for path in C.PROC_MASKED_FILES:
            full = os.path.join(proc, path)
            if os.path.isfile(full):
                L.mount(empty, full, None, L.MS_BIND)
                L.mount(None, full, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | NO_EXEC)
    finally:
        os.unlink(empty)
    for full in ([os.path.join(proc, p) for p in C.PROC_MASKED_DIRS]
                 + [os.path.join(sys_, p) for p in C.SYS_MASKED_DIRS]):
        if os.path.isdir(full) and not os.path.islink(full):
            L.mount("tmpfs", full, "tmpfs", L.MS_RDONLY | NO_EXEC, "size=4k,nr_inodes=1,mode=555")


def load_confinement(filt) -> None:  # type: ignore[no-untyped-def]
    """Limit this process (and so what it execs) to _confine.py's capabilities and
    system calls: the bounding set, the inheritable and ambient sets (so no exec
    gets a capability back), then the seccomp filter. No no_new_privs: setuid
    programs inside (su, ping) keep working, within the bounding set."""
    with open(L.CAP_LAST_CAP_FILE) as f:
        last = int(f.read())
    for cap in range(last + 1):
        if not C.KEEP_MASK & (1 << cap):
            L.prctl(L.PR_CAPBSET_DROP, cap)
    L.prctl(L.PR_CAP_AMBIENT, L.PR_CAP_AMBIENT_CLEAR_ALL)
    effective, permitted, inheritable = L.capget()
    L.capset(effective & C.KEEP_MASK, permitted & C.KEEP_MASK, inheritable & C.KEEP_MASK)
    filt.load()


def prepared_filter():  # type: ignore[no-untyped-def]
    """The seccomp filter, built while the host's Python modules are reachable
    (before pivot_root); loaded last, by load_confinement."""
    import seccomp
    filt = C.seccomp_filter()
    filt.set_attr(seccomp.Attr.CTL_NNP, 0)
    return filt


def set_osrelease(release: str) -> None:
    """What uname -r says in our UTS namespace, through kernel.virt_osrelease
    (vztt's kernel patch). A kernel without it: noted on the console, skipped."""
    try:
        with open(L.OSRELEASE_SYSCTL, "w") as f:
            f.write(release)
    except FileNotFoundError:
        os.write(2, f"vztt: this kernel has no kernel.virt_osrelease: osrelease {release} not applied\n".encode())


def enter_root(root: str) -> None:
    """pivot_root into `root` and drop the host's tree (no put_old directory
    needed: the old root is stacked under the new one, then detached)."""
    os.chdir(root)
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir("/")


def container_init(config: dict, status_fd: int) -> None:
    """Become the container's PID 1: runs in the child, never returns."""
    try:
        die_with_parent()  # (our parent is outside our pid namespace: getppid() says 0)
        join_cgroups(config["procs_files"])
        filt = prepared_filter()
        L.unshare(L.CLONE_NEWCGROUP)  # after joining: the namespace is rooted at the container's cgroup
        if config.get("osrelease"):  # before /proc/sys goes read-only; we are in the new UTS namespace
            set_osrelease(config["osrelease"])
        setup_mounts(config["root"], config["console"], config["container"])
        enter_root(config["root"])
        L.sethostname(config["hostname"])
        L.interface_up("lo")
        if config.get("go_fd") is not None:  # the host gives us an interface first
            if os.read(config["go_fd"], 2) != b"go":
                raise RuntimeError("the host went away before the container's network was ready")
            os.close(config["go_fd"])
        os.set_inheritable(status_fd, False)  # closes on exec: end of file tells success
        load_confinement(filt)  # last: the steps above need what it takes away
        init = config["init"]
        try:
            os.execve(init[0], init, config["env"])
        except OSError as e:
            raise OSError(e.errno, f"cannot execute {init[0]}: {e.strerror}") from None
    except Exception as e:  # report, do not raise: we are a forked child
        message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        os.write(status_fd, f"error: {' '.join(message.split())}\n".encode())
        os.write(2, f"vztt: {message}\n".encode())
    os._exit(127)


def boot(config: dict) -> None:
    status_fd = config["status_fd"]
    # If the owner dies we get SIGTERM, kill init and reap it: no zombie is left
    # for the host's init. Held back until the handler knows init's pid.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        die_with_parent(config["owner_pid"], signal.SIGTERM)
        L.unshare(L.CLONE_NEWNS | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET | L.CLONE_NEWPID)
        child = os.fork()  # the first child in the new pid namespace is its PID 1
    except OSError as e:
        os.write(status_fd, f"unavailable: {e.strerror}\n".encode())
        os._exit(126)
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        container_init(config, status_fd)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.write(status_fd, f"pid {child}\n".encode())
    os.close(status_fd)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # we go when init goes
    _, status = os.waitpid(child, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def enter(args: list[str]) -> None:
    split = args.index("--")
    join_cgroups(args[:split])
    load_confinement(prepared_filter())  # nsenter needs only setns and chroot of what is left
    command = args[split + 1:]
    os.execv(command[0], command)


if __name__ == "__main__":
    if sys.argv[1] == "boot":
        boot(json.loads(sys.argv[2]))
    elif sys.argv[1] == "enter":
        enter(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} boot CONFIG | enter PROCS... -- COMMAND...")
