"""What a process inside a container may still do: the capability bounding set,
the seccomp filter, and the /proc and /sys paths it must not reach.

Imported as a plain module by `_stage.py` (a script, outside the vztt package)
and applied by it twice: to the container's init right before it execs, and to
every command `Container.exec` runs (before nsenter), so nothing the host runs
inside has more than init has. Standard library plus libseccomp's Python
bindings (Debian's python3-seccomp): the filter is compiled by the library, not
written as BPF by hand.

The model is systemd-nspawn's defaults; where we differ it says so below.
"""

from __future__ import annotations

import errno
import platform

# -- capabilities ---------------------------------------------------------------

# linux/capability.h
CAPS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}

# What nspawn keeps by default (src/nspawn/nspawn.c, arg_caps_retain), plus
# CAP_NET_ADMIN, which nspawn adds too when the container has its own network
# (ours always has). One difference: nspawn keeps CAP_AUDIT_CONTROL; we drop it
# (the audit subsystem is not namespaced: a container must not change the host's
# audit rules; journald and sshd only need CAP_AUDIT_WRITE).
# Gone, among others: CAP_DAC_READ_SEARCH (open_by_handle_at), CAP_SYS_RAWIO
# (/proc/kcore, iopl, raw block I/O), CAP_SYSLOG (/dev/kmsg, dmesg), CAP_MAC_ADMIN,
# CAP_SYS_MODULE, CAP_SYS_TIME, CAP_BPF, CAP_PERFMON, CAP_SYS_PACCT, CAP_WAKE_ALARM.
KEEP = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_RAW", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT", "CAP_SYS_NICE", "CAP_SYS_PTRACE", "CAP_SYS_RESOURCE", "CAP_SYS_TTY_CONFIG",
    "CAP_AUDIT_WRITE",
)
KEEP_MASK = sum(1 << CAPS[name] for name in KEEP)

# -- system calls -----------------------------------------------------------------

# Refused with EPERM for everyone inside (podman's and nspawn's default profiles
# refuse the same): the calls that act on the host kernel as a whole, whatever
# namespace the caller is in.
DENY_EPERM = (
    "open_by_handle_at",                         # opens any inode of a host filesystem by number
    "kexec_load", "kexec_file_load",             # replace the host's kernel
    "init_module", "finit_module", "delete_module",
    "iopl", "ioperm",                            # raw port I/O
    "swapon", "swapoff",
    "acct",                                      # process accounting into a host file
    "bpf",                                       # systemd falls back when it gets EPERM (no BPF firewall)
    "perf_event_open",                           # host-wide profiling, a side channel
    "userfaultfd",                               # a classic help for kernel exploits
    "lookup_dcookie", "quotactl", "nfsservctl", "uselib", "vm86", "vm86old",
    "settimeofday", "clock_settime", "clock_settime64", "stime",   # the clock is the host's
    "syslog",                                    # the kernel log is the host's
)
# The kernel keyring is not namespaced without a user namespace: refused with
# ENOSYS (as if the kernel had no keyrings), which callers (systemd, sshd's
# pam_keyinit) treat as "no keyring here" and go on, where EPERM is an error.
DENY_ENOSYS = ("keyctl", "add_key", "request_key")

# reboot(2) in a child pid namespace only ends that namespace (how systemd powers
# the container off), so it stays; these commands of it reach the host itself.
LINUX_REBOOT_CMD_CAD_ON, LINUX_REBOOT_CMD_CAD_OFF = 0x89ABCDEF, 0x00000000
LINUX_REBOOT_CMD_SW_SUSPEND, LINUX_REBOOT_CMD_KEXEC = 0xD000FCE2, 0x45584543

# The ABIs a program on this machine may use: the filter covers each, so a 32-bit
# binary can run, and cannot dodge the rules by calling through the other ABI.
_EXTRA_ARCHES = {"x86_64": ("X86", "X32"), "aarch64": ("ARM",)}

# -- /proc and /sys -----------------------------------------------------------------

# Bound over with an empty read-only file (nspawn: "inaccessible"): host kernel
# memory, keys and timers.
PROC_MASKED_FILES = ("kcore", "kallsyms", "keys", "timer_list", "sched_debug", "latency_stats",
                     "timer_stats", "key-users", "kpagecount", "kpageflags", "kpagecgroup")
# An empty read-only tmpfs over them (podman: masked paths).
PROC_MASKED_DIRS = ("acpi", "scsi")
SYS_MASKED_DIRS = ("firmware", "kernel/debug", "kernel/tracing", "kernel/security", "fs/bpf", "fs/pstore")
# Read-only binds (nspawn's list): host-wide kernel knobs.
PROC_READONLY = ("sys", "sysrq-trigger", "bus", "fs", "irq", "asound")


def seccomp_filter():  # -> seccomp.SyscallFilter
    """The filter (not loaded): default allow, the calls above refused."""
    import seccomp
    filt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for arch in _EXTRA_ARCHES.get(platform.machine(), ()):
        try:
            filt.add_arch(getattr(seccomp.Arch, arch))
        except (AttributeError, RuntimeError, ValueError):
            pass  # libseccomp without that ABI
    for names, err in ((DENY_EPERM, errno.EPERM), (DENY_ENOSYS, errno.ENOSYS)):
        for name in names:
            try:
                filt.add_rule(seccomp.ERRNO(err), name)
            except (RuntimeError, ValueError):
                pass  # a call this architecture does not have (iopl on arm64, stime on x86_64)
    for cmd in (LINUX_REBOOT_CMD_CAD_ON, LINUX_REBOOT_CMD_CAD_OFF, LINUX_REBOOT_CMD_SW_SUSPEND,
                LINUX_REBOOT_CMD_KEXEC):
        filt.add_rule(seccomp.ERRNO(errno.EPERM), "reboot", seccomp.Arg(2, seccomp.EQ, cmd))
    return filt
