"""The fixture distribution's generated files: what EL's setup, filesystem,
release, rootfiles, pam and openssh-server ship and Debian's packages do not,
and the scriptlets EL's spec files expand to (tests/rpmdist.py builds the
packages; rpmdist_table.py says which package gets what).
"""

from __future__ import annotations

import textwrap

from rpmrepo import SOURCE_DATE_EPOCH

SUITE = "bookworm"                 # the Debian release whose binaries we repackage
ARCH = "x86_64"
DEB_ARCH = "amd64"
DIST_TAG = "el9"
MULTIARCH = "/usr/lib/x86_64-linux-gnu"
# `Requires: x = SAME`: the same epoch, version and release as the package declaring it
SAME = "%{?epoch:%{epoch}:}%{version}-%{release}"

Content = str | tuple[str, str]     # file text, or ("symlink", target)



FILESYSTEM_DIRS = {
    "/boot": 0o555, "/dev": 0o755, "/etc": 0o755, "/etc/opt": 0o755, "/etc/pki": 0o755, "/etc/skel": 0o755,
    "/etc/sysconfig": 0o755, "/etc/xdg": 0o755, "/home": 0o755, "/media": 0o755, "/mnt": 0o755, "/opt": 0o755,
    "/proc": 0o555, "/root": 0o550, "/run": 0o755, "/srv": 0o755, "/sys": 0o555, "/tmp": 0o1777, "/usr": 0o755,
    "/usr/bin": 0o755, "/usr/lib": 0o555, "/usr/lib/modules": 0o755, "/usr/lib64": 0o555,
    MULTIARCH: 0o755, "/usr/libexec": 0o755, "/usr/local": 0o755, "/usr/local/bin": 0o755,
    "/usr/local/etc": 0o755, "/usr/local/include": 0o755, "/usr/local/lib": 0o755, "/usr/local/lib64": 0o755,
    "/usr/local/libexec": 0o755, "/usr/local/sbin": 0o755, "/usr/local/share": 0o755, "/usr/local/src": 0o755,
    "/usr/sbin": 0o755, "/usr/share": 0o755, "/usr/share/doc": 0o755, "/usr/share/info": 0o755,
    "/usr/share/licenses": 0o755, "/usr/share/man": 0o755, "/usr/share/misc": 0o755, "/usr/src": 0o755,
    "/var": 0o755, "/var/adm": 0o755, "/var/cache": 0o755, "/var/db": 0o755, "/var/empty": 0o755,
    "/var/games": 0o755, "/var/lib": 0o755, "/var/lib/misc": 0o755, "/var/local": 0o755, "/var/log": 0o755,
    "/var/opt": 0o755, "/var/preserve": 0o755, "/var/spool": 0o755, "/var/spool/mail": 0o775, "/var/tmp": 0o1777,
}
FILESYSTEM_LINKS = {
    "/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/lib64": "usr/lib64", "/usr/tmp": "../var/tmp",
    "/var/lock": "../run/lock", "/var/run": "../run", "/var/mail": "spool/mail",
}
# filesystem's directories that are not root:root
FILESYSTEM_OWNERS = {"/var/spool/mail": ("root", "mail")}

# EL9's setup: the same names and ids
PASSWD = """\
root:x:0:0:root:/root:/bin/bash
bin:x:1:1:bin:/bin:/sbin/nologin
daemon:x:2:2:daemon:/sbin:/sbin/nologin
adm:x:3:4:adm:/var/adm:/sbin/nologin
lp:x:4:7:lp:/var/spool/lpd:/sbin/nologin
sync:x:5:0:sync:/sbin:/bin/sync
shutdown:x:6:0:shutdown:/sbin:/sbin/shutdown
halt:x:7:0:halt:/sbin:/sbin/halt
mail:x:8:12:mail:/var/spool/mail:/sbin/nologin
operator:x:11:0:operator:/root:/sbin/nologin
games:x:12:100:games:/usr/games:/sbin/nologin
ftp:x:14:50:FTP User:/var/ftp:/sbin/nologin
nobody:x:65534:65534:Kernel Overflow User:/:/sbin/nologin
"""
GROUP = """\
root:x:0:
bin:x:1:
daemon:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mem:x:8:
kmem:x:9:
wheel:x:10:
cdrom:x:11:
mail:x:12:
man:x:15:
dialout:x:18:
floppy:x:19:
games:x:20:
tape:x:33:
video:x:39:
ftp:x:50:
lock:x:54:
audio:x:63:
users:x:100:
nobody:x:65534:
"""


def shadow_files(passwd: str, group: str) -> tuple[str, str]:
    users = [line.split(":")[0] for line in passwd.splitlines()]
    groups = [line.split(":")[0] for line in group.splitlines()]
    day = SOURCE_DATE_EPOCH // 86400
    return ("".join(f"{u}:{'*' if u != 'root' else '!!'}:{day}:0:99999:7:::\n" for u in users),
            "".join(f"{g}:::\n" for g in groups))


SHADOW, GSHADOW = shadow_files(PASSWD, GROUP)
USERS = {line.split(":")[0] for line in PASSWD.splitlines()}
GROUPS = {line.split(":")[0] for line in GROUP.splitlines()}

SETUP_FILES: dict[str, Content] = {
    "/etc/passwd": PASSWD, "/etc/group": GROUP, "/etc/shadow": SHADOW, "/etc/gshadow": GSHADOW,
    "/etc/hosts": "127.0.0.1   localhost localhost.localdomain localhost4 localhost4.localdomain4\n"
                  "::1         localhost localhost.localdomain localhost6 localhost6.localdomain6\n",
    "/etc/shells": "/bin/sh\n/bin/bash\n/usr/bin/sh\n/usr/bin/bash\n",
    "/etc/host.conf": "multi on\n",
    "/etc/environment": "", "/etc/fstab": "", "/etc/motd": "", "/etc/subuid": "", "/etc/subgid": "",
    "/etc/printcap": "# printcap: see printcap(5)\n", "/etc/exports": "",
    "/etc/networks": "default 0.0.0.0\nloopback 127.0.0.0\nlink-local 169.254.0.0\n",
    "/etc/filesystems": "ext4\next3\next2\nnodev proc\nnodev devpts\niso9660\nvfat\nhfs\nhfsplus\n*\n",
    "/etc/profile": textwrap.dedent("""\
        # /etc/profile: system-wide environment and startup programs for login shells (EL's, shortened).
        pathmunge () {
            case ":${PATH}:" in
                *:"$1":*) ;;
                *) if [ "$2" = "after" ] ; then PATH=$PATH:$1; else PATH=$1:$PATH; fi ;;
            esac
        }
        if [ "$EUID" = "0" ] || [ "$(id -u)" = "0" ]; then
            pathmunge /usr/sbin
            pathmunge /usr/local/sbin
        else
            pathmunge /usr/local/sbin after
            pathmunge /usr/sbin after
        fi
        HOSTNAME=$(/usr/bin/hostname 2>/dev/null)
        HISTSIZE=1000
        export PATH USER LOGNAME MAIL HOSTNAME HISTSIZE
        for i in /etc/profile.d/*.sh; do
            if [ -r "$i" ]; then . "$i" >/dev/null; fi
        done
        unset i
        unset -f pathmunge
        if [ -n "${BASH_VERSION-}" ] && [ -f /etc/bashrc ]; then . /etc/bashrc; fi
        """),
    "/etc/bashrc": textwrap.dedent("""\
        # /etc/bashrc: system-wide functions and aliases (EL's, shortened).
        if [ -z "$BASHRCSOURCED" ]; then
          BASHRCSOURCED="Y"
          if [ "$PS1" ]; then
            [ "$PS1" = "\\\\s-\\\\v\\\\\\$ " ] && PS1="[\\u@\\h \\W]\\\\$ "
            shopt -s checkwinsize
          fi
          umask 022
        fi
        """),
}

def release_files(major: int) -> dict[str, Content]:
    """The release package's files for EL `major` (9: the fixture's own flavour; 10: the el10 variant)."""
    return {
        "/usr/lib/os-release": textwrap.dedent(f"""\
            NAME="vztt EL{major} fixture"
            VERSION="{major}"
            ID="vztt-fixture"
            ID_LIKE="rhel centos fedora"
            VERSION_ID="{major}"
            PLATFORM_ID="platform:el{major}"
            PRETTY_NAME="vztt EL{major} fixture {major} (Debian 12 binaries repackaged)"
            ANSI_COLOR="0;31"
            CPE_NAME="cpe:/o:vztt:fixture:{major}"
            """),
        "/etc/os-release": ("symlink", "../usr/lib/os-release"),
        "/etc/vztt-fixture-release": f"vztt EL{major} fixture release {major}\n",
        "/etc/redhat-release": ("symlink", "vztt-fixture-release"),
        "/etc/system-release": ("symlink", "vztt-fixture-release"),
        "/etc/system-release-cpe": f"cpe:/o:vztt:fixture:{major}\n",
        "/etc/issue": "\\S\nKernel \\r on an \\m\n\n",
        "/etc/issue.net": "\\S\nKernel \\r on an \\m\n",
        # EL's presets: what `systemctl preset` enables; the rest is disabled (99-default-disable).
        # Debian's systemd preset enables networkd, resolved, timesyncd: EL does not use them.
        "/usr/lib/systemd/system-preset/90-default.preset": textwrap.dedent(f"""\
            # vztt EL{major} fixture: the units enabled at installation (EL's 90-default.preset, for this package set)
            enable sshd.service
            enable dbus-broker.service
            enable getty@.service
            enable remote-fs.target
            enable NetworkManager.service
            enable NetworkManager-dispatcher.service
            enable NetworkManager-wait-online.service
            disable systemd-networkd.service
            disable systemd-networkd-wait-online.service
            disable systemd-network-generator.service
            disable systemd-resolved.service
            disable systemd-timesyncd.service
            disable systemd-homed.service
            disable systemd-userdbd.socket
            disable systemd-boot-update.service
            disable systemd-pstore.service
            """),
        "/usr/lib/systemd/system-preset/99-default-disable.preset": "disable *\n",
    }


# EL's NetworkManager.conf (the compiled-in plugins are EL's keyfile,ifcfg-rh; Debian's build
# has no ifcfg-rh and its default ifupdown plugin is left out: keyfile alone, said here)
NM_CONF = textwrap.dedent("""\
    # Configuration file for NetworkManager.
    # See "man 5 NetworkManager.conf" for details.
    #
    # Configuration snippets go in /etc/NetworkManager/conf.d/.

    [main]
    plugins=keyfile

    [logging]
    # When debugging NetworkManager, enabling debug logging is of great help.
    #level=DEBUG
    #domains=ALL
    """)


ROOTFILES: dict[str, Content] = {
    "/root/.bash_logout": "# ~/.bash_logout\n",
    "/root/.bash_profile": textwrap.dedent("""\
        # .bash_profile
        if [ -f ~/.bashrc ]; then
        \t. ~/.bashrc
        fi
        """),
    "/root/.bashrc": textwrap.dedent("""\
        # .bashrc
        alias rm='rm -i'
        alias cp='cp -i'
        alias mv='mv -i'
        if [ -f /etc/bashrc ]; then
        \t. /etc/bashrc
        fi
        """),
    "/root/.cshrc": "# .cshrc\nalias rm 'rm -i'\nalias cp 'cp -i'\nalias mv 'mv -i'\nset prompt=\\[`id -nu`@`hostname -s`\\]\\#\\ \n",
    "/root/.tcshrc": "# .tcshrc\nalias rm 'rm -i'\nalias cp 'cp -i'\nalias mv 'mv -i'\nset prompt=\\[%n@%m\\ %c\\]%#\\ \n",
}

# EL's authselect "minimal" profile, and Debian's common-* (which Debian's
# service files @include) as includes of it.
_SYSTEM_AUTH = textwrap.dedent("""\
    auth        required      pam_env.so
    auth        required      pam_faildelay.so delay=2000000
    auth        sufficient    pam_unix.so nullok
    auth        required      pam_deny.so

    account     required      pam_unix.so

    password    sufficient    pam_unix.so yescrypt shadow nullok
    password    required      pam_deny.so

    session     optional      pam_keyinit.so revoke
    session     required      pam_limits.so
    -session    optional      pam_systemd.so
    session     required      pam_unix.so
    """)
PAM_FILES: dict[str, Content] = {
    "/etc/pam.d/system-auth": _SYSTEM_AUTH,
    "/etc/pam.d/password-auth": _SYSTEM_AUTH,
    "/etc/pam.d/postlogin": "session     optional      pam_lastlog.so silent noupdate showfailed\n",
    "/etc/pam.d/common-auth": "auth        include       system-auth\n",
    "/etc/pam.d/common-account": "account     include       system-auth\n",
    "/etc/pam.d/common-password": "password    include       system-auth\n",
    "/etc/pam.d/common-session": "session     include       system-auth\n",
    "/etc/pam.d/common-session-noninteractive": "session     include       system-auth\n",
}

# EL9's openssh-server units and key generator, with what Debian's sshd needs
# besides: its privilege separation directory is /run/sshd.
SSHD_FILES: dict[str, Content] = {
    "/etc/ssh/sshd_config": "",      # filled from Debian's /usr/share/openssh/sshd_config at build time
    "/etc/sysconfig/sshd": "# Options for sshd (EL): OPTIONS=\"\"\n",
    "/usr/lib/systemd/system/sshd.service": textwrap.dedent("""\
        [Unit]
        Description=OpenSSH server daemon
        Documentation=man:sshd(8) man:sshd_config(5)
        After=network.target sshd-keygen.target
        Wants=sshd-keygen.target

        [Service]
        Type=notify
        EnvironmentFile=-/etc/sysconfig/sshd
        ExecStart=/usr/sbin/sshd -D $OPTIONS
        ExecReload=/bin/kill -HUP $MAINPID
        KillMode=process
        Restart=on-failure
        RestartSec=42s
        RuntimeDirectory=sshd
        RuntimeDirectoryMode=0755
        RuntimeDirectoryPreserve=yes

        [Install]
        WantedBy=multi-user.target
        """),
    "/usr/lib/systemd/system/sshd@.service": textwrap.dedent("""\
        [Unit]
        Description=OpenSSH per-connection server daemon
        Documentation=man:sshd(8) man:sshd_config(5)
        Wants=sshd-keygen.target
        After=sshd-keygen.target

        [Service]
        EnvironmentFile=-/etc/sysconfig/sshd
        ExecStart=-/usr/sbin/sshd -i $OPTIONS
        StandardInput=socket
        RuntimeDirectory=sshd
        RuntimeDirectoryMode=0755
        RuntimeDirectoryPreserve=yes
        """),
    "/usr/lib/systemd/system/sshd.socket": textwrap.dedent("""\
        [Unit]
        Description=OpenSSH Server Socket
        Documentation=man:sshd(8) man:sshd_config(5)
        Conflicts=sshd.service

        [Socket]
        ListenStream=22
        Accept=yes

        [Install]
        WantedBy=sockets.target
        """),
    "/usr/lib/systemd/system/sshd-keygen@.service": textwrap.dedent("""\
        [Unit]
        Description=OpenSSH %i Server Key Generation
        ConditionFileNotEmpty=|!/etc/ssh/ssh_host_%i_key

        [Service]
        Type=oneshot
        EnvironmentFile=-/etc/sysconfig/sshd
        ExecStart=/usr/libexec/openssh/sshd-keygen %i

        [Install]
        WantedBy=sshd-keygen.target
        """),
    "/usr/lib/systemd/system/sshd-keygen.target": textwrap.dedent("""\
        [Unit]
        Wants=sshd-keygen@rsa.service
        Wants=sshd-keygen@ecdsa.service
        Wants=sshd-keygen@ed25519.service
        PartOf=sshd.service
        """),
    "/usr/libexec/openssh/sshd-keygen": textwrap.dedent("""\
        #!/bin/bash
        # Create the host keys for the OpenSSH server (EL9's sshd-keygen).
        KEYTYPE=$1
        case $KEYTYPE in
        \t"rsa"|"ecdsa"|"ed25519") ;;
        \t*) exit 12 ;;
        esac
        KEY=/etc/ssh/ssh_host_${KEYTYPE}_key
        KEYGEN=/usr/bin/ssh-keygen
        if [[ ! -x $KEYGEN ]]; then
        \texit 13
        fi
        rm -f $KEY{,.pub}
        if ! $KEYGEN -q -t $KEYTYPE -f $KEY -C '' -N '' >&/dev/null; then
        \texit 1
        fi
        /usr/bin/chmod 600 $KEY
        /usr/bin/chmod 644 $KEY.pub
        exit 0
        """),
}

# %systemd_post / %systemd_preun / %systemd_postun_with_restart as EL's systemd-rpm-macros expand them
def systemd_post(*units: str) -> str:
    return (f'if [ $1 -eq 1 ] && [ -x /usr/bin/systemctl ]; then\n'
            f'    # Initial installation\n'
            f'    /usr/bin/systemctl --no-reload preset {" ".join(units)} >/dev/null 2>&1 || :\nfi\n')


def systemd_preun(*units: str) -> str:
    return (f'if [ $1 -eq 0 ] && [ -x /usr/bin/systemctl ]; then\n'
            f'    # Package removal, not upgrade\n'
            f'    /usr/bin/systemctl --no-reload disable --now {" ".join(units)} >/dev/null 2>&1 || :\nfi\n')


def systemd_postun_with_restart(*units: str) -> str:
    return (f'if [ $1 -ge 1 ] && [ -x /usr/bin/systemctl ]; then\n'
            f'    # Package upgrade, not uninstall\n'
            f'    /usr/bin/systemctl try-restart {" ".join(units)} >/dev/null 2>&1 || :\nfi\n')


def sysuser(name: str, uid: int, comment: str, home: str) -> str:
    """EL's guarded creation of a system group and user (as in openssh.spec, dbus.spec)."""
    return (f'getent group {name} >/dev/null || groupadd -g {uid} -r {name} || :\n'
            f'getent passwd {name} >/dev/null || \\\n'
            f'  useradd -c "{comment}" -u {uid} -g {name} -s /sbin/nologin -r -d {home} {name} 2> /dev/null || :\n')


# systemd's own groups, created before its files land (EL's systemd %pre)
SYSTEMD_PRE = "".join(f"getent group {g} >/dev/null 2>&1 || groupadd -r{f' -g {gid}' if gid else ''} {g} >/dev/null 2>&1 || :\n"
                      for g, gid in (("utmp", 22), ("input", 0), ("kvm", 36), ("render", 0), ("sgx", 0),
                                     ("systemd-journal", 190)))
# First installation: machine-id, users and tmpfiles as EL's systemd %post does; preset-all
# waits for %posttrans, when every package's units and the release's presets are in.
SYSTEMD_POST = textwrap.dedent("""\
    if [ $1 -eq 1 ]; then
        systemd-machine-id-setup >/dev/null 2>&1 || :
        systemd-sysusers >/dev/null 2>&1 || :
        systemd-tmpfiles --create >/dev/null 2>&1 || :
        mkdir -p /var/lib/rpm-state
        touch /var/lib/rpm-state/systemd-preset-all
    fi
    """)
SYSTEMD_POSTTRANS = textwrap.dedent("""\
    if [ -e /var/lib/rpm-state/systemd-preset-all ]; then
        rm -f /var/lib/rpm-state/systemd-preset-all
        systemctl preset-all >/dev/null 2>&1 || :
        systemctl --global preset-all >/dev/null 2>&1 || :
    fi
    """)
# systemd's upstream basic.conf as EL builds it (Debian's is base-passwd's list: www-data, _apt, ...)
SYSUSERS_BASIC = textwrap.dedent("""\
    u root    0     "Super User" /root /bin/bash
    u nobody  65534 "Kernel Overflow User" -
    g adm     -     -            -
    g wheel   -     -            -
    g utmp    -     -            -
    g audio   -     -            -
    g cdrom   -     -            -
    g dialout -     -            -
    g disk    -     -            -
    g input   -     -            -
    g kmem    -     -            -
    g kvm     -     -            -
    g lp      -     -            -
    g render  -     -            -
    g sgx     -     -            -
    g tape    -     -            -
    g tty     5     -            -
    g video   -     -            -
    g users   100   -            -
    """)

# Where rpm keeps its database: EL 9 in /var/lib/rpm, EL 10 in /usr/lib/sysimage/rpm (with
# /var/lib/rpm a symlink to it, owned by the rpm package). Debian's rpm defaults to ~/.rpmdb.
RPM_DBPATH = {9: "/var/lib/rpm", 10: "/usr/lib/sysimage/rpm"}


def rpm_macros(major: int) -> str:
    return f"# EL {major} keeps rpm's database in {RPM_DBPATH[major]}.\n%_dbpath {RPM_DBPATH[major]}\n"

