"""The fixture distribution's packages: which Debian files become which EL
package, with EL's names, splits, dependencies and scriptlets (built by
tests/rpmdist.py; the generated files are in rpmdist_files.py).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from rpmdist_files import (ARCH, FILESYSTEM_DIRS, FILESYSTEM_LINKS, MULTIARCH, NM_CONF, PAM_FILES, ROOTFILES,
                           SAME, SETUP_FILES, SSHD_FILES, SYSTEMD_POST, SYSTEMD_POSTTRANS, SYSTEMD_PRE, SYSUSERS_BASIC,
                           Content, release_files, rpm_macros, systemd_post, systemd_postun_with_restart,
                           systemd_preun, sysuser)

RELEASE_NAME = "vztt-fixture-release"
# what vztt's recipes/el.toml installs (packages.base); the tests boot this set
BASE = (
    "system-release", "setup", "filesystem", "basesystem", "bash", "coreutils", "glibc-minimal-langpack",
    "systemd", "rpm", "dnf", "openssh-server", "openssh-clients", "iproute", "iputils", "procps-ng",
    "util-linux", "shadow-utils", "passwd", "rootfiles", "hostname", "less", "vim-minimal", "findutils",
    "tar", "gzip", "which", "NetworkManager",
)

# ==========================================================================
# The distribution: which Debian files become which EL package
# ==========================================================================

@dataclass(frozen=True)
class Take:
    """Files of one Debian package that go into an EL package.

    `paths`: fnmatch patterns on the usr-merged path (`*` crosses `/`); empty:
    every file of the .deb that no Take with patterns claimed.
    """

    deb: str
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class ElPackage:
    name: str
    summary: str
    take: tuple[Take, ...] = ()
    evr: str | None = None           # "[E:]V-R" for packages made of generated files only; else from the first deb
    arch: str = ARCH
    requires: tuple[str, ...] = ()
    requires_pre: tuple[str, ...] = ()
    requires_post: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    files: dict[str, Content] = field(default_factory=dict)   # generated files (win over a deb's)
    dirs: tuple[str, ...] = ()       # extra directories owned (created empty)
    modes: dict[str, int] = field(default_factory=dict)       # path -> mode, over the deb's
    rename: dict[str, str] = field(default_factory=dict)      # deb path -> path in the package
    drop: tuple[str, ...] = ()       # patterns: files of the takes left out
    ghost: dict[str, int] = field(default_factory=dict)       # %ghost %config files: path -> mode
    scripts: dict[str, str] = field(default_factory=dict)     # "pre", "post", "posttrans", "preun", "postun"
    spec_extra: str = ""             # verbatim spec lines (file triggers)
    requires_exclude: str = ""       # regex: automatic requirements to leave out (%__requires_exclude)

    @property
    def debs(self) -> list[str]:
        return list(dict.fromkeys(t.deb for t in self.take))


# Everything of this kind leaves every package: documentation (EL's would be
# %doc, and the templates install with nodocs anyway), translations, and what
# only Debian's tools use (init scripts, runit, lintian, apport, pam-configs).
GLOBAL_DROP = (
    "/usr/share/doc", "/usr/share/doc/*", "/usr/share/man", "/usr/share/man/*", "/usr/share/info", "/usr/share/info/*",
    "/usr/share/lintian", "/usr/share/lintian/*", "/usr/share/bug", "/usr/share/bug/*", "/usr/share/locale",
    "/usr/share/locale/*", "/usr/share/doc-base", "/usr/share/doc-base/*", "/usr/share/menu", "/usr/share/menu/*",
    "/usr/share/apport", "/usr/share/apport/*", "/usr/share/runit", "/usr/share/runit/*", "/usr/share/icons",
    "/usr/share/icons/*", "/usr/share/applications", "/usr/share/applications/*", "/usr/share/pam-configs",
    "/usr/share/pam-configs/*", "/usr/share/pam", "/usr/share/pam/*", "/usr/share/gdb", "/usr/share/gdb/*",
    "/usr/lib/mime", "/usr/lib/mime/*", "/usr/include", "/usr/include/*", "/usr/share/pkgconfig",
    "/usr/share/pkgconfig/*", f"{MULTIARCH}/pkgconfig", f"{MULTIARCH}/pkgconfig/*", "/etc/init.d", "/etc/init.d/*",
    "/etc/rc?.d", "/etc/rc?.d/*", "/etc/sv", "/etc/sv/*", "/etc/runit", "/etc/runit/*", "/var/log/runit",
    "/var/log/runit/*", "/etc/ufw", "/etc/ufw/*", "/etc/X11", "/etc/X11/*", "/etc/logcheck", "/etc/logcheck/*",
    "/etc/cron.*", "/etc/update-motd.d", "/etc/update-motd.d/*",
)


def _lib(name: str, *debs: str, summary: str = "", **kw) -> ElPackage:     # type: ignore[no-untyped-def]
    return ElPackage(name, summary or f"{name} shared libraries (from Debian's {', '.join(debs)})",
                     take=tuple(Take(d) for d in debs), **kw)


def release_package(major: int) -> ElPackage:
    """The release package (EL's almalinux-release, centos-stream-release...) for EL `major`."""
    return ElPackage(RELEASE_NAME, f"vztt EL{major} fixture release files", evr=f"{major}.0-1.el{major}",
                     arch="noarch",
                     provides=("system-release", f"system-release(releasever) = {major}", f"redhat-release = {major}.0",
                               f"base-module(platform:el{major})"),
                     files=release_files(major), dirs=("/etc/yum.repos.d", "/etc/pki/rpm-gpg", "/etc/dnf",
                                                       "/etc/dnf/vars"))


RPM_MACROS_FILE = "/usr/lib/rpm/macros.d/macros.dbpath"
UTIL_LINUX_CORE = tuple(f"/usr/{p}" for p in (
    "bin/dmesg", "bin/findmnt", "bin/lsblk", "bin/more", "bin/mountpoint", "bin/nsenter", "bin/unshare",
    "bin/setsid", "bin/flock", "bin/getopt", "sbin/agetty", "sbin/blkid", "sbin/blockdev", "sbin/fsck",
    "sbin/sulogin", "sbin/switch_root", "sbin/pivot_root", "sbin/losetup", "sbin/swapon", "sbin/swapoff",
    "bin/mount", "bin/umount"))
GLIBC_FROM_LIBC_BIN = ("/usr/sbin/ldconfig", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/ld.so.conf.d/*",
                       "/etc/gai.conf", "/etc/bindresvport.blacklist", "/etc/default/nss", "/var/cache/ldconfig")
RPM_RUNTIME = ("/usr/bin/rpm", "/usr/bin/rpmdb", "/usr/bin/rpmkeys", "/usr/bin/rpmquery", "/usr/bin/rpmverify",
               "/usr/lib/rpm/rpmdb_dump", "/usr/lib/rpm/rpmdb_load", "/usr/lib/rpm/rpm.daily",
               "/usr/lib/rpm/rpm.supp", "/usr/lib/rpm/rpmpopt-*", "/usr/lib/rpm/tgpg", "/usr/lib/rpm/rpm2cpio.sh")
RPM_PLUGINS = ("audit", "dbus_announce", "fsverity", "ima", "prioreset", "selinux", "syslog", "systemd_inhibit")

PACKAGES: tuple[ElPackage, ...] = (
    # ---- the base of every EL system, made here
    ElPackage("filesystem", "The basic directory layout for a Linux system", evr="3.16-5.el9",
              requires_pre=("setup",),
              files={k: ("symlink", v) for k, v in FILESYSTEM_LINKS.items()}, dirs=tuple(FILESYSTEM_DIRS),
              modes=dict(FILESYSTEM_DIRS)),
    ElPackage("setup", "A set of system configuration and setup files", evr="2.13.7-10.el9", arch="noarch",
              take=(Take("netbase"),), files=SETUP_FILES, dirs=("/etc/profile.d",),
              modes={"/etc/shadow": 0o000, "/etc/gshadow": 0o000}),
    ElPackage("basesystem", "The skeleton package which defines a simple system", evr="11-13.el9",
              arch="noarch", requires_pre=("setup", "filesystem")),
    release_package(9),
    ElPackage("rootfiles", "The basic required files for the root user's directory", evr="8.1-31.el9",
              arch="noarch", files=ROOTFILES),
    # ---- glibc
    ElPackage("glibc", "The GNU libc libraries", take=(Take("libc6"), Take("libc-bin", GLIBC_FROM_LIBC_BIN)),
              requires_pre=("basesystem",), requires=(f"glibc-common = {SAME}", f"glibc-langpack = {SAME}"),
              provides=("rtld(GNU_HASH)",),
              files={"/etc/nsswitch.conf": textwrap.dedent("""\
                  passwd:     files systemd
                  shadow:     files
                  group:      files systemd
                  hosts:      files myhostname dns
                  services:   files
                  netgroup:   files
                  automount:  files
                  aliases:    files
                  ethers:     files
                  gshadow:    files
                  networks:   files dns
                  protocols:  files
                  publickey:  files
                  rpc:        files
                  """)},
              ghost={"/etc/ld.so.cache": 0o644},
              # ldconfig without a shell (bash needs glibc): rpm's lua, as EL's glibc does
              scripts={"post": '-p <lua>\nrpm.execute("/usr/sbin/ldconfig")'},
              spec_extra=textwrap.dedent(f"""\
                  %transfiletriggerin -P 2000000 -p <lua> -- {MULTIARCH} /usr/lib64
                  rpm.execute("/usr/sbin/ldconfig")

                  %transfiletriggerpostun -P 2000000 -p <lua> -- {MULTIARCH} /usr/lib64
                  rpm.execute("/usr/sbin/ldconfig")
                  """)),
    ElPackage("glibc-gconv-extra", "All iconv converter modules for glibc",
              take=(Take("libc6", (f"{MULTIARCH}/gconv", f"{MULTIARCH}/gconv/*")),), requires=(f"glibc = {SAME}",)),
    ElPackage("glibc-common", "Common binaries and locale data for glibc", take=(Take("libc-bin"),),
              requires=(f"glibc = {SAME}",), drop=("/usr/share/libc-bin/*", "/usr/share/libc-bin")),
    ElPackage("glibc-minimal-langpack", "Minimal language packs for glibc (C.UTF-8)",
              take=(Take("libc-bin", ("/usr/lib/locale", "/usr/lib/locale/*")),),
              requires=(f"glibc = {SAME}", f"glibc-common = {SAME}"), provides=(f"glibc-langpack = {SAME}",)),
    # ---- shared libraries, with EL's names
    _lib("libgcc", "libgcc-s1", "gcc-12-base"),
    _lib("libstdc++", "libstdc++6"),
    _lib("libgomp", "libgomp1"),
    _lib("zlib", "zlib1g"),
    _lib("xz-libs", "liblzma5"),
    _lib("bzip2-libs", "libbz2-1.0"),
    _lib("libzstd", "libzstd1"),
    _lib("lz4-libs", "liblz4-1"),
    _lib("libcap", "libcap2", "libcap2-bin"),
    _lib("libcap-ng", "libcap-ng0"),
    _lib("libacl", "libacl1"),
    _lib("libattr", "libattr1"),
    _lib("libselinux", "libselinux1"),
    _lib("libsepol", "libsepol2"),
    _lib("libsemanage", "libsemanage2", "libsemanage-common"),
    _lib("pcre2", "libpcre2-8-0"),
    _lib("libblkid", "libblkid1"),
    _lib("libmount", "libmount1"),
    _lib("libuuid", "libuuid1"),
    _lib("libfdisk", "libfdisk1"),
    _lib("libsmartcols", "libsmartcols1"),
    _lib("gmp", "libgmp10"),
    _lib("mpfr", "libmpfr6"),
    _lib("libsigsegv", "libsigsegv2"),
    _lib("readline", "libreadline8", "readline-common"),
    _lib("ncurses-libs", "libtinfo6", "libncursesw6", requires=("ncurses-base",)),
    ElPackage("ncurses-base", "Descriptions of common terminals", arch="noarch", take=(Take("ncurses-base"),)),
    _lib("openssl-libs", "libssl3"),
    _lib("audit-libs", "libaudit1", "libaudit-common"),
    _lib("libxcrypt", "libcrypt1"),
    _lib("libdb", "libdb5.3"),
    _lib("libgcrypt", "libgcrypt20", drop=("/usr/share/libgcrypt20", "/usr/share/libgcrypt20/*")),
    _lib("libgpg-error", "libgpg-error0"),
    _lib("libapparmor", "libapparmor1"),
    _lib("cryptsetup-libs", "libcryptsetup12"),
    _lib("device-mapper-libs", "libdevmapper1.02.1", requires=("device-mapper",)),
    ElPackage("device-mapper", "Device mapper utility", take=(Take("dmsetup"),)),
    _lib("libargon2", "libargon2-1"),
    _lib("json-c", "libjson-c5"),
    _lib("kmod-libs", "libkmod2"),
    _lib("libseccomp", "libseccomp2"),
    _lib("iptables-libs", "libip4tc2", "libxtables12"),
    _lib("p11-kit", "libp11-kit0"),
    _lib("libffi", "libffi8"),
    _lib("libtasn1", "libtasn1-6"),
    _lib("nettle", "libnettle8", "libhogweed6"),
    _lib("gnutls", "libgnutls30"),
    _lib("libunistring", "libunistring2"),
    _lib("libidn2", "libidn2-0"),
    _lib("libpsl", "libpsl5"),
    _lib("libnghttp2", "libnghttp2-14"),
    _lib("libssh2", "libssh2-1"),
    _lib("librtmp", "librtmp1"),
    _lib("libbrotli", "libbrotli1"),
    _lib("krb5-libs", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libgssapi-krb5-2"),
    _lib("keyutils-libs", "libkeyutils1"),
    _lib("libcom_err", "libcom-err2"),
    _lib("openldap", "libldap-2.5-0"),
    _lib("cyrus-sasl-lib", "libsasl2-2", "libsasl2-modules-db"),
    _lib("libcurl", "libcurl3-gnutls"),
    _lib("libxml2", "libxml2"),
    _lib("libicu", "libicu72"),
    _lib("libyaml", "libyaml-0-2"),
    _lib("glib2", "libglib2.0-0"),
    _lib("gpgme", "libgpgme11", requires=("gnupg2",)),
    _lib("libassuan", "libassuan0"),
    _lib("libksba", "libksba8"),
    _lib("npth", "libnpth0"),
    ElPackage("gnupg2", "Utility for secure communication and data storage",
              take=(Take("gpg"), Take("gpgconf"), Take("gpg-agent"))),
    _lib("libedit", "libedit2"),
    _lib("libbsd", "libbsd0"),
    _lib("libmd", "libmd0"),
    _lib("libcbor", "libcbor0.8"),
    _lib("libfido2", "libfido2-1"),
    _lib("libtirpc", "libtirpc3", "libtirpc-common"),
    _lib("libnsl2", "libnsl2"),
    _lib("tcp_wrappers-libs", "libwrap0"),
    _lib("elfutils-libelf", "libelf1"),
    _lib("elfutils-libs", "libdw1"),
    _lib("libbpf", "libbpf1"),
    _lib("libmnl", "libmnl0"),
    _lib("expat", "libexpat1"),
    _lib("sqlite-libs", "libsqlite3-0"),
    _lib("lua-libs", "liblua5.3-0"),
    _lib("popt", "libpopt0"),
    _lib("libarchive", "libarchive13"),
    _lib("libsolv", "libsolv1", "libsolvext1"),
    _lib("librepo", "librepo0"),
    _lib("libmodulemd", "libmodulemd2"),
    _lib("file-libs", "libmagic1", "libmagic-mgc"),
    _lib("libcomps", "libcomps0"),
    _lib("libdnf", "libdnf2", "libdnf2-common"),
    _lib("rpm-libs", "librpm9", "librpmio9", requires=(f"rpm = {SAME}",)),
    _lib("rpm-build-libs", "librpmbuild9", requires=(f"rpm-libs = {SAME}",)),
    _lib("rpm-sign-libs", "librpmsign9", requires=(f"rpm-libs = {SAME}",)),
    _lib("fsverity-utils", "libfsverity0"),
    _lib("dbus-libs", "libdbus-1-3"),
    # ---- pam, systemd, dbus
    ElPackage("pam", "An extensible library which provides authentication for applications",
              take=(Take("libpam0g"), Take("libpam-modules"), Take("libpam-modules-bin"), Take("libpam-runtime")),
              drop=("/usr/sbin/pam-auth-update", "/usr/sbin/pam_getenv"),   # Debian's (perl) config generator
              files=PAM_FILES, modes={"/usr/sbin/unix_chkpwd": 0o4755}),
    ElPackage("systemd", "System and Service Manager",
              take=(Take("systemd"), Take("systemd-sysv"), Take("libsystemd-shared")),
              requires=(f"systemd-libs = {SAME}", f"systemd-pam = {SAME}", "dbus", "util-linux-core"),
              requires_pre=("/usr/bin/getent", "/usr/sbin/groupadd"),
              requires_post=("coreutils", "grep", "sed"),        # as Fedora's/EL's systemd.spec
              # Debian's base-passwd user list gives way to upstream's (EL's) basic.conf
              files={"/usr/lib/sysusers.d/basic.conf": SYSUSERS_BASIC},
              ghost={"/etc/machine-id": 0o444},
              scripts={"pre": SYSTEMD_PRE, "post": SYSTEMD_POST, "posttrans": SYSTEMD_POSTTRANS}),
    _lib("systemd-libs", "libsystemd0", "libudev1", "libnss-systemd", "libnss-myhostname",
         summary="systemd libraries and NSS modules"),
    ElPackage("systemd-pam", "systemd PAM module", take=(Take("libpam-systemd"),), requires=(f"systemd = {SAME}",)),
    ElPackage("dbus-broker", "Linux D-Bus Message Broker", take=(Take("dbus-broker"),),
              requires=("dbus-common",), requires_post=("systemd",),
              scripts={"post": systemd_post("dbus-broker.service"),
                       "preun": systemd_preun("dbus-broker.service")}),
    ElPackage("dbus-common", "D-BUS message bus configuration", arch="noarch",
              take=(Take("dbus-system-bus-common"),), requires_pre=("/usr/bin/getent", "/usr/sbin/groupadd",
                                                                    "/usr/sbin/useradd"),
              scripts={"pre": sysuser("messagebus", 81, "System message bus", "/")}),
    ElPackage("dbus", "D-BUS message bus", evr="1:1.12.20-8.el9", requires=("dbus-broker", "dbus-common")),
    # ---- the base commands
    ElPackage("bash", "The GNU Bourne Again shell", take=(Take("bash"),),
              requires=("filesystem",), provides=("/bin/sh", "/bin/bash"),
              files={"/usr/bin/sh": ("symlink", "bash")}),
    ElPackage("coreutils", "A set of basic GNU tools commonly used in shell scripts", take=(Take("coreutils"),)),
    ElPackage("grep", "Pattern matching utilities", take=(Take("grep"),)),
    ElPackage("sed", "A GNU stream text editor", take=(Take("sed"),)),
    ElPackage("gawk", "The GNU version of the AWK text processing utility", take=(Take("gawk"),),
              files={"/usr/bin/awk": ("symlink", "gawk")}),
    ElPackage("findutils", "The GNU versions of find utilities (find and xargs)", take=(Take("findutils"),)),
    ElPackage("tar", "GNU file archiving program", take=(Take("tar"),)),
    ElPackage("gzip", "The GNU data compression program", take=(Take("gzip"),)),
    ElPackage("hostname", "Utility to set/show the host name or domain name", take=(Take("hostname"),)),
    ElPackage("less", "A text file browser similar to more, but better", take=(Take("less"),)),
    ElPackage("which", "Displays where a particular program in your path is located",
              take=(Take("debianutils", ("/usr/bin/which.debianutils",)),),
              rename={"/usr/bin/which.debianutils": "/usr/bin/which"}),
    ElPackage("vim-minimal", "A minimal version of the VIM editor", take=(Take("vim-tiny"),),
              rename={"/usr/bin/vim.tiny": "/usr/bin/vi"}, drop=("/usr/share/vim/vim90/doc/README.Debian",),
              files={"/usr/bin/" + n: ("symlink", "vi") for n in ("ex", "view", "rvi", "rview")}),
    ElPackage("procps-ng", "System and process monitoring utilities", take=(Take("procps"), Take("libproc2-0"))),
    ElPackage("util-linux-core", "The most essential utilities from the util-linux suite",
              take=(Take("mount"), Take("util-linux", UTIL_LINUX_CORE))),
    ElPackage("util-linux", "A collection of basic system utilities",
              take=(Take("util-linux"), Take("bsdutils"), Take("util-linux-extra"),
                    Take("login", ("/usr/bin/login", "/usr/sbin/nologin", "/etc/pam.d/login"))),
              requires=(f"util-linux-core = {SAME}", "pam")),
    ElPackage("shadow-utils", "Utilities for managing accounts and shadow password files",
              take=(Take("passwd"), Take("login", ("/etc/login.defs", "/usr/bin/faillog", "/usr/bin/lastlog",
                                                    "/usr/bin/newgrp", "/usr/bin/sg"))),
              requires=("setup",), modes={"/usr/bin/chage": 0o755, "/usr/bin/expiry": 0o755},
              drop=("/usr/sbin/shadowconfig",)),
    ElPackage("passwd", "An utility for setting or changing passwords using PAM",
              take=(Take("passwd", ("/usr/bin/passwd", "/etc/pam.d/passwd")),), requires=("pam", "setup")),
    ElPackage("iproute", "Advanced IP routing and network device configuration tools", take=(Take("iproute2"),)),
    ElPackage("iproute-tc", "Linux Traffic Control utility",
              take=(Take("iproute2", ("/usr/sbin/tc", f"{MULTIARCH}/tc", f"{MULTIARCH}/tc/*",
                                      "/usr/share/bash-completion/completions/tc")),),
              requires=(f"iproute = {SAME}",)),
    _lib("linux-atm-libs", "libatm1"),
    # ---- NetworkManager: what brings an EL system's network up (from the keyfile `vztt create --ip` writes)
    _lib("libndp", "libndp0"),
    _lib("NetworkManager-libnm", "libnm0", summary="Libraries for adding NetworkManager support to applications"),
    ElPackage("NetworkManager", "Network connection manager and user applications", take=(Take("network-manager"),),
              requires=(f"NetworkManager-libnm = {SAME}", "dbus"), requires_post=("systemd",),
              # EL's base package only: the device plugins (wifi, team, wwan, bluetooth, adsl, ppp) are EL's
              # NetworkManager-wifi, -team, ... subpackages and need wpa_supplicant, libteamdctl, ModemManager,
              # bluez, pppd; nmtui (libnewt) is NetworkManager-tui. Debian's own: the ifupdown settings plugin
              # and its dispatcher script, the netdev group's polkit rules (EL has no such group).
              drop=(f"{MULTIARCH}/NetworkManager", f"{MULTIARCH}/NetworkManager/*", "/usr/lib/pppd", "/usr/lib/pppd/*",
                    "/usr/bin/nmtui", "/usr/bin/nmtui-*", "/etc/NetworkManager/dispatcher.d/01-ifupdown",
                    "/usr/share/polkit-1/rules.d", "/usr/share/polkit-1/rules.d/*", "/var/lib/polkit-1",
                    "/var/lib/polkit-1/*"),
              files={"/etc/NetworkManager/NetworkManager.conf": NM_CONF},
              # secrets live there: root's only (Debian's postinst chmods it; EL's spec owns it 0700)
              modes={"/var/lib/NetworkManager": 0o700, "/etc/NetworkManager/system-connections": 0o700},
              scripts={"post": systemd_post("NetworkManager.service", "NetworkManager-wait-online.service",
                                            "NetworkManager-dispatcher.service", "nm-priv-helper.service"),
                       "preun": systemd_preun("NetworkManager.service", "NetworkManager-wait-online.service",
                                              "NetworkManager-dispatcher.service", "nm-priv-helper.service")}),
    ElPackage("iputils", "Network monitoring tools including ping", take=(Take("iputils-ping"),)),
    # ---- openssh: EL's split, EL's units
    ElPackage("openssh", "An open source implementation of SSH protocol version 2",
              take=(Take("openssh-client", ("/usr/bin/ssh-keygen", "/usr/lib/openssh/ssh-keysign")),
                    Take("openssh-server", ("/etc/ssh/moduli",)))),
    ElPackage("openssh-clients", "An open source SSH client applications", take=(Take("openssh-client"),),
              requires=(f"openssh = {SAME}",)),
    ElPackage("openssh-server", "An open source SSH server daemon",
              take=(Take("openssh-server"), Take("openssh-sftp-server")),
              # Debian's ssh.service/ssh.socket give way to EL's sshd units; /etc/default/ssh to /etc/sysconfig/sshd
              drop=("/usr/lib/systemd/system/ssh.service", "/usr/lib/systemd/system/ssh.socket",
                    "/usr/lib/systemd/system/rescue-ssh.target", "/etc/default/ssh",
                    "/usr/share/openssh/sshd_config.md5sum"),
              requires=(f"openssh = {SAME}", "pam"),
              requires_pre=("/usr/bin/getent", "/usr/sbin/groupadd", "/usr/sbin/useradd"),
              requires_post=("systemd",),
              files=SSHD_FILES, dirs=("/usr/share/empty.sshd",),
              modes={"/usr/libexec/openssh/sshd-keygen": 0o755, "/etc/ssh/sshd_config": 0o600},
              scripts={"pre": sysuser("sshd", 74, "Privilege-separated SSH", "/usr/share/empty.sshd"),
                       "post": systemd_post("sshd.service", "sshd.socket"),
                       "preun": systemd_preun("sshd.service", "sshd.socket"),
                       "postun": systemd_postun_with_restart("sshd.service")}),
    # ---- python, rpm, dnf
    ElPackage("python3", "Python 3.11 interpreter",
              take=(Take("python3.11-minimal"), Take("python3.11"), Take("python3-minimal"), Take("python3")),
              requires=(f"python3-libs = {SAME}",)),
    ElPackage("python3-libs", "Python runtime libraries",
              take=(Take("libpython3.11-minimal"), Take("libpython3.11-stdlib"), Take("libpython3-stdlib"),
                    Take("libpython3.11")),
              # a stdlib demo script's #! (EL's brp-mangle-shebangs rewrites it)
              requires_exclude="^/usr/local/bin/python$"),
    ElPackage("rpm", "The RPM package management system",
              take=(Take("rpm", RPM_RUNTIME), Take("rpm2cpio"), Take("rpm-common")),
              requires=(f"rpm-libs = {SAME}", "popt"),
              files={RPM_MACROS_FILE: rpm_macros(9)},
              dirs=("/var/lib/rpm", "/var/lib/rpm-state")),
    *(ElPackage(f"rpm-plugin-{p.replace('_', '-')}", f"rpm's {p} plugin",
                take=(Take("rpm-common", (f"{MULTIARCH}/rpm-plugins/{p}.so",)
                           + (("/etc/dbus-1/system.d/org.rpm.conf",) if p == "dbus_announce" else ())),),
                requires=(f"rpm-libs = {SAME}",)) for p in RPM_PLUGINS),
    ElPackage("python3-rpm", "Python 3 bindings for apps which will manipulate RPM packages",
              take=(Take("python3-rpm"),), requires=(f"rpm-libs = {SAME}",)),
    ElPackage("python3-gpg", "gpgme bindings for Python 3", take=(Take("python3-gpg"),), requires=("gpgme",)),
    ElPackage("python3-libcomps", "Python 3 bindings for libcomps library", take=(Take("python3-libcomps"),),
              requires=("libcomps",)),
    ElPackage("python3-libdnf", "Python 3 bindings for the libdnf library", take=(Take("python3-libdnf"),),
              requires=(f"libdnf = {SAME}",)),
    ElPackage("python3-hawkey", "Python 3 bindings for the hawkey library", take=(Take("python3-hawkey"),),
              requires=(f"libdnf = {SAME}", f"python3-libdnf = {SAME}")),
    ElPackage("dnf-data", "Common data and configuration files for DNF", arch="noarch",
              take=(Take("dnf-data"),), drop=("/etc/libreport", "/etc/libreport/*"),
              dirs=("/var/lib/dnf", "/var/cache/dnf", "/var/log/dnf")),
    ElPackage("python3-dnf", "Python 3 interface to DNF", arch="noarch", take=(Take("python3-dnf"),),
              requires=(f"dnf-data = {SAME}", "python3-libdnf", "python3-hawkey", "python3-rpm", "python3-gpg",
                        "python3-libcomps", "libmodulemd", "python(abi) = 3.11")),
    ElPackage("dnf", "Package manager", arch="noarch", take=(Take("dnf"),), requires=(f"python3-dnf = {SAME}",)),
)

# Debian packages whose files are only partly used: the rest is dropped, on purpose.
PARTLY_USED = {
    "debianutils": "only `which` (EL's which package); run-parts, add-shell, ... are Debian's",
    "rpm": "EL's rpm keeps the runtime; rpmbuild, rpmsign and the build scripts (perl) would be rpm-build",
}


