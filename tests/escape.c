/* Escape attempts, run as root inside a booted container (tests/test_escape.py).
 *
 *   escape ATTEMPT [ARGS...]
 *
 * Prints one line, "blocked ERRNO_NAME (what failed)" when the attempt failed,
 * or "ESCAPED (what worked)" when it got through; exits 0 either way (the
 * test reads the line). Built static by the test and copied into the
 * container's scratch tree (its overlay's upper directory), never into a
 * template. Each attempt stops at its first refused step: that step and its
 * errno are what the test asserts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int blocked(const char *step)
{
    printf("blocked %s (%s)\n", strerrorname_np(errno) ? strerrorname_np(errno) : "?", step);
    return 0;
}

static int escaped(const char *what)
{
    printf("ESCAPED (%s)\n", what);
    return 0;
}

/* The shocker exploit: a file handle for inode 2 (the root directory of an
 * ext4 filesystem), opened relative to any file of the mount. */
static int by_handle(void)
{
    struct { struct file_handle h; unsigned char bytes[8]; } fh = {0};
    fh.h.handle_bytes = 8;
    fh.h.handle_type = 1; /* FILEID_INO32_GEN */
    uint32_t ino = 2, gen = 0;
    memcpy(fh.h.f_handle, &ino, 4);
    memcpy(fh.h.f_handle + 4, &gen, 4);
    int mount_fd = open("/etc", O_RDONLY | O_DIRECTORY);
    int fd = open_by_handle_at(mount_fd, &fh.h, O_RDONLY);
    if (fd < 0)
        return blocked("open_by_handle_at");
    return escaped("open_by_handle_at opened inode 2");
}

static int block_device(const char *majmin)
{
    unsigned maj, min;
    if (sscanf(majmin, "%u:%u", &maj, &min) != 2)
        return fprintf(stderr, "bad MAJ:MIN\n"), 2;
    unlink("/tmp/hostdisk");
    if (mknod("/tmp/hostdisk", S_IFBLK | 0600, makedev(maj, min)) < 0)
        return blocked("mknod");
    int fd = open("/tmp/hostdisk", O_RDONLY);
    if (fd < 0)
        return blocked("open");
    char buf[512];
    if (read(fd, buf, sizeof buf) < 0)
        return blocked("read");
    return escaped("read the host's disk");
}

static int mount_disk(const char *majmin)
{
    unsigned maj, min;
    if (sscanf(majmin, "%u:%u", &maj, &min) != 2)
        return fprintf(stderr, "bad MAJ:MIN\n"), 2;
    unlink("/tmp/hostdisk");
    if (mknod("/tmp/hostdisk", S_IFBLK | 0600, makedev(maj, min)) < 0)
        return blocked("mknod");
    mkdir("/tmp/hostmnt", 0700);
    const char *types[] = {"ext4", "xfs", "btrfs", NULL};
    int err = 0;
    for (const char **t = types; *t; t++) {
        if (mount("/tmp/hostdisk", "/tmp/hostmnt", *t, MS_RDONLY, NULL) == 0) {
            umount("/tmp/hostmnt");
            return escaped("mounted the host's disk");
        }
        if (errno != EINVAL || !err)
            err = errno;   /* EINVAL: not that filesystem; keep the telling error */
    }
    errno = err;
    return blocked("mount");
}

/* cgroup v1's release_agent runs a program as root in the host's namespaces. */
static int release_agent(void)
{
    mkdir("/tmp/cg", 0700);
    if (mount("cgroup", "/tmp/cg", "cgroup", 0, "memory") < 0
        && mount("cgroup", "/tmp/cg", "cgroup", 0, "none,name=vzttescape") < 0)
        return blocked("mount cgroup v1");
    int fd = open("/tmp/cg/release_agent", O_WRONLY);
    if (fd < 0) {
        int e = errno;
        umount("/tmp/cg");
        errno = e;
        return blocked("open release_agent");
    }
    ssize_t n = write(fd, "/bin/true", 9);
    int e = errno;
    close(fd);
    umount("/tmp/cg");
    errno = e;
    if (n < 0)
        return blocked("write release_agent");
    return escaped("wrote release_agent");
}

/* A cgroup beside the container's: reachable neither through /sys/fs/cgroup
 * nor through a fresh cgroup2 mount (both rooted at the container's cgroup). */
static int sibling_cgroup(const char *sibling)
{
    char path[512];
    snprintf(path, sizeof path, "/sys/fs/cgroup/../%s/cgroup.procs", sibling);
    int fd = open(path, O_WRONLY);
    if (fd >= 0)
        return escaped("opened the sibling's cgroup.procs via /sys/fs/cgroup");
    mkdir("/tmp/cg2", 0700);
    if (mount("cgroup2", "/tmp/cg2", "cgroup2", 0, NULL) < 0)
        return blocked("mount cgroup2");
    snprintf(path, sizeof path, "/tmp/cg2/../%s/cgroup.procs", sibling);
    fd = open(path, O_WRONLY);
    int e = errno;
    umount("/tmp/cg2");
    errno = e;
    if (fd < 0)
        return blocked("open sibling cgroup.procs");
    return escaped("opened the sibling's cgroup.procs via a cgroup2 mount");
}

/* A fresh procfs (not the masked, read-only one we were given): its sysctls
 * are the host kernel's; kernel.core_pattern runs a program as the host's root.
 * Opened for writing only, nothing is written. */
static int fresh_proc(void)
{
    mkdir("/tmp/freshproc", 0700);
    if (mount("proc", "/tmp/freshproc", "proc", 0, NULL) < 0)
        return blocked("mount proc");
    int fd = open("/tmp/freshproc/sys/kernel/core_pattern", O_WRONLY);
    int e = errno;
    umount("/tmp/freshproc");
    errno = e;
    if (fd < 0)
        return blocked("open core_pattern");
    return escaped("core_pattern writable");
}

/* The container's own cgroup v1 limits (pids, memory) are the host's to set. */
static int raise_limit(void)
{
    mkdir("/tmp/cgpids", 0700);
    if (mount("cgroup", "/tmp/cgpids", "cgroup", 0, "pids") < 0)
        return blocked("mount cgroup v1 pids");
    int fd = open("/tmp/cgpids/pids.max", O_WRONLY);
    int e = errno;
    umount("/tmp/cgpids");
    errno = e;
    if (fd < 0)
        return blocked("open pids.max");
    return escaped("pids.max writable");
}

static int load_module(void)
{
    if (syscall(SYS_init_module, "", 0UL, "") < 0 && syscall(SYS_finit_module, 0, "", 0) < 0)
        return blocked("init_module/finit_module");
    return escaped("init_module");
}

static int kexec(void)
{
    if (syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0UL) < 0)
        return blocked("kexec_load");
    return escaped("kexec_load");
}

static int do_iopl(void)
{
    if (iopl(3) < 0)
        return blocked("iopl");
    return escaped("iopl(3)");
}

static int kmsg(void)
{
    int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);
    if (fd < 0 && errno == ENOENT) {   /* not in our /dev: make it */
        unlink("/tmp/kmsg");
        if (mknod("/tmp/kmsg", S_IFCHR | 0600, makedev(1, 11)) < 0)
            return blocked("mknod /dev/kmsg");
        fd = open("/tmp/kmsg", O_RDONLY | O_NONBLOCK);
    }
    if (fd < 0)
        return blocked("open kmsg");
    char buf[4096];
    if (read(fd, buf, sizeof buf) < 0 && errno != EAGAIN)
        return blocked("read kmsg");
    return escaped("read the host's kernel log");
}

static int kcore(void)
{
    int fd = open("/proc/kcore", O_RDONLY);
    if (fd < 0)
        return blocked("open /proc/kcore");
    unsigned char buf[4];
    ssize_t n = read(fd, buf, 4);
    if (n < 0)
        return blocked("read /proc/kcore");
    if (n < 4 || memcmp(buf, "\177ELF", 4) != 0) {
        errno = ENODATA;   /* masked: an empty file */
        return blocked("read /proc/kcore: empty");
    }
    return escaped("read kernel memory");
}

static int sysrq(void)
{
    /* Nothing is written: opening for writing is the test (a real write would act). */
    int fd = open("/proc/sysrq-trigger", O_WRONLY);
    if (fd < 0)
        return blocked("open /proc/sysrq-trigger");
    return escaped("opened /proc/sysrq-trigger for writing");
}

static int host_time(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (clock_settime(CLOCK_REALTIME, &now) == 0)
        return escaped("clock_settime");
    struct timeval tv = {now.tv_sec, 0};
    if (settimeofday(&tv, NULL) == 0)
        return escaped("settimeofday");
    return blocked("clock_settime/settimeofday");
}

static int do_ptrace(const char *pid)
{
    if (ptrace(PTRACE_ATTACH, atoi(pid), NULL, NULL) < 0)
        return blocked("ptrace attach");
    return escaped("attached to the process");
}

static int abstract_socket(const char *name)
{
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t len = strlen(name);
    memcpy(addr.sun_path + 1, name, len);
    if (connect(s, (struct sockaddr *)&addr, offsetof(struct sockaddr_un, sun_path) + 1 + len) < 0)
        return blocked("connect");
    return escaped("connected to the host's abstract socket");
}

static int proc_root(const char *pid, const char *path)
{
    char full[1024];
    snprintf(full, sizeof full, "/proc/%s/root%s", pid, path);
    int fd = open(full, O_RDONLY);
    if (fd < 0)
        return blocked("open /proc/PID/root/...");
    char buf[64];
    if (read(fd, buf, sizeof buf) < 0)
        return blocked("read");
    return escaped("read the host's file");
}

static int perf(void)
{
    struct perf_event_attr attr = {.type = PERF_TYPE_SOFTWARE, .size = sizeof attr,
                                   .config = PERF_COUNT_SW_CPU_CLOCK};
    if (syscall(SYS_perf_event_open, &attr, -1, 0, -1, 0) < 0)
        return blocked("perf_event_open");
    return escaped("perf_event_open on all processes");
}

static int do_bpf(void)
{
    char attr[128] = {0};
    if (syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, attr, sizeof attr) < 0)
        return blocked("bpf");
    return escaped("bpf");
}

static int do_keyctl(void)
{
    /* KEYCTL_JOIN_SESSION_KEYRING of a named keyring: without a user namespace,
     * the same keyring as the host's root. */
    if (syscall(SYS_keyctl, 1, "vztt-escape") < 0)
        return blocked("keyctl");
    return escaped("joined a host keyring");
}

static int do_swapon(void)
{
    if (swapon("/tmp/noswap", 0) < 0 && errno != ENOENT)
        return blocked("swapon");
    if (errno == ENOENT)
        return escaped("swapon reached the path lookup");
    return escaped("swapon");
}

static int do_userfaultfd(void)
{
    if (syscall(SYS_userfaultfd, 0) < 0)
        return blocked("userfaultfd");
    return escaped("userfaultfd");
}

static int do_sethostname(void)
{
    /* In the container's UTS namespace this works; the test checks the host's is unchanged. */
    if (sethostname("escaped-host", 12) < 0)
        return blocked("sethostname");
    printf("changed (own namespace)\n");
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2)
        return fprintf(stderr, "usage: escape ATTEMPT [ARGS]\n"), 2;
    const char *a = argv[1];
    const char *x = argc > 2 ? argv[2] : "", *y = argc > 3 ? argv[3] : "";
    if (!strcmp(a, "by-handle")) return by_handle();
    if (!strcmp(a, "block-device")) return block_device(x);
    if (!strcmp(a, "mount-disk")) return mount_disk(x);
    if (!strcmp(a, "release-agent")) return release_agent();
    if (!strcmp(a, "sibling-cgroup")) return sibling_cgroup(x);
    if (!strcmp(a, "fresh-proc")) return fresh_proc();
    if (!strcmp(a, "raise-limit")) return raise_limit();
    if (!strcmp(a, "module")) return load_module();
    if (!strcmp(a, "kexec")) return kexec();
    if (!strcmp(a, "iopl")) return do_iopl();
    if (!strcmp(a, "kmsg")) return kmsg();
    if (!strcmp(a, "kcore")) return kcore();
    if (!strcmp(a, "sysrq")) return sysrq();
    if (!strcmp(a, "time")) return host_time();
    if (!strcmp(a, "ptrace")) return do_ptrace(x);
    if (!strcmp(a, "abstract-socket")) return abstract_socket(x);
    if (!strcmp(a, "proc-root")) return proc_root(x, y);
    if (!strcmp(a, "perf")) return perf();
    if (!strcmp(a, "bpf")) return do_bpf();
    if (!strcmp(a, "keyctl")) return do_keyctl();
    if (!strcmp(a, "swapon")) return do_swapon();
    if (!strcmp(a, "userfaultfd")) return do_userfaultfd();
    if (!strcmp(a, "sethostname")) return do_sethostname();
    return fprintf(stderr, "unknown attempt %s\n", a), 2;
}
