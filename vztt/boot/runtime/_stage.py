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

        PID 1 reads `go` from the "go_fd" pipe before it sets anything up: the
        host puts it into the container's cgroups and the container's network
        interface in place once it knows init's pid. With "userns_fd", the
        first process joins that user namespace as its root before it makes
        the others, so they all belong to it.

    python3 _stage.py userns
        make a user namespace, say `ready`, live until end of stdin (the host
        writes its maps and keeps a file descriptor of it).

    python3 _stage.py osrelease PID RELEASE
        set kernel.virt_osrelease in init's UTS namespace (a user namespace's
        init cannot); a note on stderr if the kernel has none.

    python3 _stage.py enter PID USERNS PROCS_FILE... -- COMMAND...
        join the container's cgroups, then init's namespaces, confined, and
        exec COMMAND (nsenter without a user namespace).

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


def setup_mounts(root: str, console: str, container: str, userns: bool = False) -> None:
    """Mount what systemd needs under `root`, all in our private mount namespace."""
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)  # nothing propagates back to the host
    if userns:  # we are in the root already (see boot()), and it is locked: our own copy
        L.rebind_cwd()
    else:
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
        if userns:  # no mknod in a user namespace: the host's nodes, bound (as nspawn does)
            with open(f"{dev}/{name}", "w"):
                pass
            L.mount(f"/dev/{name}", f"{dev}/{name}", None, L.MS_BIND)
            continue
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
    os.chdir(root)  # (".": we are in it already)
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir("/")


def container_init(config: dict, status_fd: int) -> None:
    """Become the container's PID 1: runs in the child, never returns."""
    try:
        die_with_parent()  # (our parent is outside our pid namespace: getppid() says 0)
        filt = prepared_filter()
        # The host puts us into the container's cgroups (in a user namespace we may
        # not move ourselves there) and its network interface in place, then says go.
        if os.read(config["go_fd"], 2) != b"go":
            raise RuntimeError("the host went away before the container's cgroups and network were ready")
        os.close(config["go_fd"])
        L.unshare(L.CLONE_NEWCGROUP)  # after joining: the namespace is rooted at the container's cgroup
        userns = config.get("userns_fd") is not None
        if config.get("osrelease") and not userns:  # before /proc/sys goes read-only; in our new UTS namespace
            set_osrelease(config["osrelease"])  # (in a user namespace the host does it: `osrelease` below)
        root = "." if userns else config["root"]   # see boot()
        setup_mounts(root, config["console"], config["container"], userns)
        enter_root(root)
        L.sethostname(config["hostname"])
        L.interface_up("lo")
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
        if config.get("userns_fd") is not None:
            # The root by its path is out of reach for the container's ids (a state
            # directory may be 0700): we go there first, everything after is relative.
            os.chdir(config["root"])
            become_root_in(config["userns_fd"])  # every namespace below is the user namespace's
            # A change of ids clears the parent-death signal: set it again.
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


def become_root_in(userns_fd: int) -> None:
    """Join the user namespace and be its root (host ids: the container's slot)."""
    L.setns(userns_fd, L.CLONE_NEWUSER)
    os.close(userns_fd)
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


# setns order: the user namespace first (it grants the rights over the others),
# the mount namespace last (after it, /proc/PID is the container's).
ENTER_ORDER = (("cgroup", 0x02000000), ("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS),
               ("net", L.CLONE_NEWNET), ("pid", L.CLONE_NEWPID), ("mnt", L.CLONE_NEWNS))


def enter(args: list[str]) -> None:
    """enter PID USERNS PROCS... -- COMMAND: join the cgroups, then the namespaces
    of init (PID), as its user namespace's root with USERNS=1 (our own setns: the
    bounding set must be dropped after entering the user namespace, which resets
    it), else through nsenter; confined either way."""
    split = args.index("--")
    pid, userns, procs, command = args[0], args[1] == "1", args[2:split], args[split + 1:]
    join_cgroups(procs)
    filt = prepared_filter()
    if not userns:
        load_confinement(filt)  # nsenter needs only setns and chroot of what is left
        os.execv(command[0], command)
    fds = {name: os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY) for name, _ in (("user", 0), *ENTER_ORDER)}
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    become_root_in(fds.pop("user"))
    for name, flag in ENTER_ORDER:
        L.setns(fds.pop(name), flag)
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    os.close(root)
    child = os.fork()  # the pid namespace applies to children
    if child == 0:
        try:
            load_confinement(filt)
            os.execvp(command[0], command)
        except OSError as e:
            os.write(2, f"{command[0]}: {e.strerror}\n".encode())
            os._exit(127 if e.errno == 2 else 126)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # pass on what we get
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def osrelease(pid: str, release: str) -> None:
    """osrelease PID RELEASE: set kernel.virt_osrelease in init's UTS namespace, as
    the host's root (the sysctl file is the global root's to write, which the root
    of a container's user namespace is not)."""
    fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY)
    L.setns(fd, L.CLONE_NEWUTS)
    set_osrelease(release)


def hold_userns() -> None:
    """A fresh user namespace for the host to write the container's maps into and
    open (its fd is the container's user namespace); we go at end of stdin."""
    L.unshare(L.CLONE_NEWUSER)
    os.write(1, b"ready\n")
    while os.read(0, 1):
        pass


if __name__ == "__main__":
    if sys.argv[1] == "userns":
        hold_userns()
    elif sys.argv[1] == "osrelease":
        osrelease(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "boot":
        boot(json.loads(sys.argv[2]))
    elif sys.argv[1] == "enter":
        enter(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} boot CONFIG | enter PROCS... -- COMMAND...")
