"""EZ template trees for tests, laid out as Virtuozzo installs them or as an
OpenVZ `*-ez` source repository keeps them (`<tmpl>_<file>` and a spec).

Plain module, no pytest fixtures. The spec written here is our own, in the
shape of those repositories' specs: `%define`s for the template's name,
version, arch and package manager, and an %install that puts each
`<tmpl>_<file>` into config/os/default or config/app/<tmpl>/default with
`installfile $tmpl MODE $dir NAME`.
"""

from __future__ import annotations

import os
from pathlib import Path

SCRIPT_MODE = 0o755

# The OS template of the tests: Debian 12 with packages, repositories through
# $DEB_SERVER, an environment, and scripts for every phase vztt runs.
OS_FILES: dict[str, str] = {
    "packages": "# what the container needs to boot\nsystemd-sysv iproute2\n\nez-marker\n",
    "repositories": "# vztt writes `deb <line>`\n$DEB_SERVER/debian bookworm main\n",
    "package_manager": "dpkgx64\n",
    "distribution": "debian\n",
    "summary": "Debian 12 (EZ test template)\n",
    "description": "Debian 12 for vztt's tests\nimported from an EZ tree\n",
    "environment": "EZ_GREETING=hello from the EZ environment\nLANG=C.UTF-8\n",
    # host, before any package: arguments VE_ROOT CTID
    "pre-cache": '#!/bin/sh\nset -e\ntest -d "$1"\nmkdir -p "$1/etc"\n'
                 'printf "%s\\n" "$2" "$(test -e "$1/usr/bin/dpkg" && echo dpkg-present || echo empty-root)" '
                 '> "$1/etc/ez-pre-cache"\n',
    # inside, after apt's Essential stage: dpkg is there, systemd not yet
    "mid-pre-install": "#!/bin/bash\n{ test -x /usr/bin/dpkg && echo dpkg; test -e /lib/systemd/systemd "
                       "&& echo systemd || echo no-systemd; } > /etc/ez-mid-pre-install\n",
    # inside, after every package: the loopback check wants /etc/hosts, as vzctl would write it
    "post-install": '#!/bin/bash\nprintf "127.0.0.1 localhost\\n::1 localhost\\n" > /etc/hosts\n'
                    'echo "$EZ_GREETING" > /etc/ez-post-install\n',
    "ct2vm": "#!/bin/sh\nexit 0\n",
    "upgradable_versions": "",
}
APP_FILES: dict[str, dict[str, str]] = {
    "hello": {
        "packages": "ez-hello\n",
        "post-install": '#!/bin/bash\necho "APP_CACHE=$APP_CACHE $(cat /usr/share/ez-hello/VERSION)" '
                        '> /etc/ez-hello-post-install\n',
    },
    "tools": {
        "packages": "less\n",
        "pre-install-hn": "#!/bin/sh\nvzctl set \"$VEID\" --features bridge:on\n",
    },
}
SCRIPTS = {"pre-cache", "post-cache", "mid-pre-install", "mid-post-install", "post-install", "pre-install",
           "pre-install-hn", "post-install-hn", "ct2vm"}


def _put(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(path, SCRIPT_MODE if path.name.split("_")[-1] in SCRIPTS or path.name in SCRIPTS else 0o644)
    return path


def installed_tree(root: Path, os_files: dict[str, str] | None = None,
                   apps: dict[str, dict[str, str]] | None = None,
                   osname: str = "debian", osver: str = "12", arch: str = "x86_64") -> Path:
    """root/vz/template/<os>/<ver>/<arch>/config, as Virtuozzo installs an EZ template; returns config/."""
    config = root / "vz" / "template" / osname / osver / arch / "config"
    for name, text in (OS_FILES if os_files is None else os_files).items():
        _put(config / "os" / "default" / name, text)
    for app, files in (APP_FILES if apps is None else apps).items():
        for name, text in files.items():
            _put(config / "app" / app / "default" / name, text)
    return config


SPEC = """\
# An EZ template set for vztt's tests, in the shape of OpenVZ's *-ez specs.
%define templatename {osname}
%define templatever {osver}
%define templatearch {arch}
%define fullname Debian %templatever
%define fulltemplatearch (x86_64)
%define templatedir /vz/template/%templatename/%templatever/%templatearch/config
%define package_manager dpkgx64

Summary: %fullname %fulltemplatearch Template set
Name: %templatename-%templatever-%templatearch-ez
Version: 1.0
Release: 1%{{?dist}}

%install
installfile() {{
\tinstall -m $2 %_sourcedir/${{1}}_$4 $3/$4
}}
for tmpl in os {apps}; do
\tif [ $tmpl = "os" ]; then
\t\techo "%fullname %fulltemplatearch Virtuozzo Template" > $dir/summary
\t\techo "%package_manager" > $dir/package_manager
\t\ttouch $dir/upgradable_versions
\t\tinstallfile $tmpl 0644 $dir environment
\t\tinstallfile $tmpl 0644 $dir distribution
\t\tinstallfile $tmpl 0755 $dir pre-cache
\t\tinstallfile $tmpl 0755 $dir mid-pre-install
\t\tinstallfile $tmpl 0755 $dir ct2vm
\telse
\t\techo "$tmpl for %fullname %fulltemplatearch Virtuozzo Template" > $dir/summary
\tfi
\tinstallfile $tmpl 0644 $dir repositories
\tinstallfile $tmpl 0644 $dir packages
\tinstallfile $tmpl 0755 $dir pre-install-hn
\tinstallfile $tmpl 0755 $dir post-install
\techo "%release" > $dir/release
done

%files -f files.lst
"""


def source_tree(root: Path, osname: str = "debian", osver: str = "12", arch: str = "x86_64") -> Path:
    """The same templates as an OpenVZ *-ez repository: <tmpl>_<file> and a spec (scripts not executable:
    in such a repository the spec gives the modes)."""
    root.mkdir(parents=True, exist_ok=True)
    skip = {"summary", "package_manager", "upgradable_versions", "description"}
    for name, text in OS_FILES.items():
        if name not in skip:
            (root / f"os_{name}").write_text(text)
    for app, files in APP_FILES.items():
        for name, text in files.items():
            (root / f"{app}_{name}").write_text(text)
    (root / "os_notes").write_text("a file the spec does not install\n")
    (root / f"{osname}-{osver}-{arch}-ez.spec").write_text(
        SPEC.format(osname=osname, osver=osver, arch=arch, apps=" ".join(APP_FILES)))
    return root
