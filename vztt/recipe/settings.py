"""The table of recipe settings: one list drives validation, merging,
`vztt show` and the generated reference (docs/recipes.md).

Each Setting names a key (dotted for nested tables), its type, its default,
how a child recipe combines it with its parent's value, and what it means.
Tables of records (repositories, files, hooks, smoke) have their own field
tables and are merged by their key field, so that a leaf recipe can override
one repository or add one smoke check without repeating the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Merge policies, applied parent first, then child.
REPLACE = "replace"   # the child's value wins
APPEND = "append"     # lists: parent's items, then the child's new ones
MERGE = "merge"       # string tables: union, the child's keys win
BY_KEY = "by-key"     # lists of records: records with the same key are merged field by field


@dataclass(frozen=True)
class Setting:
    key: str
    type: str                      # str, bool, int, list[str], str|list[str], dict[str,str], records
    doc: str
    default: Any = None
    merge: str = REPLACE
    choices: tuple[str, ...] = ()
    pattern: str = ""              # a regular expression the whole value must match (str settings)
    pattern_doc: str = ""          # the same in words, for errors and docs
    inherit: bool = True           # False: belongs to the file that sets it (name, abstract, extends)
    templated: bool = False        # jinja2-rendered with the recipe's variables
    record_key: str = ""           # for records: the field that identifies a record
    fields: tuple["Setting", ...] = field(default_factory=tuple)  # for records

    @property
    def toml_type(self) -> str:
        return {"records": "array of tables", "str|list[str]": "string or array of strings"}.get(self.type, self.type)


# What uname(2) can carry (__NEW_UTS_LEN is 64), restricted to what release strings are made of.
OSRELEASE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}"
OSRELEASE_WORDS = "1 to 64 letters, digits and . _ + ~ -, starting with a letter or digit"

# A repository's name is a dnf repo id and a file name in the image (/etc/yum.repos.d/<name>.repo).
REPOSITORY_NAME = r"[A-Za-z0-9][A-Za-z0-9_.:-]*"
REPOSITORY_NAME_WORDS = "letters, digits and _ . : -, starting with a letter or digit"

DISTROS = ("debian", "ubuntu", "centos-stream", "almalinux", "rockylinux")
ARCHES = ("x86_64", "aarch64")

REPOSITORY_FIELDS = (
    Setting("name", "str", "Identifies the repository; a child recipe overrides a parent's repository of the same name.",
            pattern=REPOSITORY_NAME, pattern_doc=REPOSITORY_NAME_WORDS),
    Setting("url", "str", "Base URL of the archive (dnf: the repository's baseurl, the directory holding repodata/). "
            "Name mirrors through variables ($DEBIAN_MIRROR), never a host.", templated=True),
    Setting("image_url", "str", "The URL the template ships for this repository, which containers made from it use "
            "(apt: the image's /etc/apt/sources.list; dnf: /etc/yum.repos.d/<name>.repo when the release package "
            "ships no repo file); default: `url`, the URL the build used. Give it a mirror variable of its own "
            "with the build's as fallback, `${DEBIAN_MIRROR_PUBLIC:-$DEBIAN_MIRROR}`, so that a build from an "
            "internal or file:// mirror ships the public one (a file:// URL is never shipped).", templated=True),
    Setting("suite", "str", "apt suite (distribution) to use, e.g. `{{ release }}-updates`. apt only.", templated=True),
    Setting("components", "list[str]", "Archive components. apt only.", default=["main"]),
    Setting("keyring", "str", "OpenPGP keyring that signs the repository (dnf: the armored public key, "
            "RPM-GPG-KEY-*): a file in recipes/keys/ or an absolute path."),
    Setting("enabled", "bool", "Set to false in a child recipe to drop a parent's repository.", default=True),
    Setting("image_sources", "bool", "Write this repository into the image's apt sources, so apt works in the container.", default=True),
    Setting("repo_gpgcheck", "bool", "dnf: verify repodata/repomd.xml against its detached signature (repomd.xml.asc) "
            "with the keyring. Packages are always signature-checked.", default=True),
)

FILE_FIELDS = (
    Setting("path", "str", "Absolute destination inside the image; must stay inside it."),
    Setting("content", "str", "Literal content."),
    Setting("template", "str", "jinja2 template text, rendered with the recipe's variables."),
    Setting("source", "str", "File next to the recipe, inside the recipes directory once symlinks are followed; "
            "copied byte for byte, or rendered with jinja2 when its name ends in .j2 (UTF-8 text then)."),
    Setting("mode", "str", "Octal permission bits.", default="0644"),
    Setting("uid", "int", "Owner uid.", default=0),
    Setting("gid", "int", "Owner gid.", default=0),
)

HOOK_FIELDS = (
    Setting("name", "str", "Identifies the hook; a child recipe overrides a parent's hook of the same name."),
    Setting("where", "str", "`image`: run chrooted into the image; `host`: run on the host with $VZTT_ROOT set to the image root "
            "(`convention` says how; `phase`, when).",
            default="image", choices=("image", "host")),
    Setting("run", "str", "Inline shell script.", templated=True),
    Setting("script", "str", "Script file next to the recipe (instead of `run`), inside the recipes directory "
            "once symlinks are followed; UTF-8 text."),
    Setting("phase", "str", "When the hook runs: `before-packages` (host hooks only: the image is still empty, as "
            "vztt's pre-cache), `after-base` (the base system is installed: apt's Essential stage, or a layer's base; "
            "as vztt's mid-pre-install and mid-post-install), `after-packages` (every package installed, after `files`).",
            default="after-packages", choices=("before-packages", "after-base", "after-packages")),
    Setting("convention", "str", "How the script is called: `sh`: `/bin/sh -e -c SCRIPT` (host hooks get $VZTT_ROOT); "
            "`ez`: as Virtuozzo's vztt called template scripts: an image hook is copied into the image as "
            "`/vzttXXXXXX/script` and run with `bash`, a host hook is run as a program with the arguments VE_ROOT CTID; "
            "both with the recipe's environment.", default="sh", choices=("sh", "ez")),
)

SMOKE_FIELDS = (
    Setting("name", "str", "Identifies the check in reports."),
    Setting("command", "str", "Shell command run inside the booted template.", templated=True),
    Setting("exit_status", "int", "Expected exit status.", default=0),
    Setting("output", "str", "Regular expression the output (stdout and stderr) must match: searched, not anchored; "
            "`^` and `$` match at each line.", templated=True),
)

SETTINGS: tuple[Setting, ...] = (
    Setting("extends", "str", "Parent recipe (its file name without .toml).", inherit=False),
    Setting("abstract", "bool", "A base recipe: not listed, not buildable.", default=False, inherit=False),
    Setting("name", "str", "Template name; defaults to the file name and must equal it.", inherit=False),
    Setting("base", "str", "A layered template: built on the promoted, boot-tested build of this template (its archive, "
            "verified by sha256), adding this recipe's own packages, files and hooks; its lock holds only what the layer "
            "adds or changes. Settings are inherited from the base's recipe as with `extends` (when `extends` is not set); "
            "the boot test runs the base's smoke checks and the layer's."),
    Setting("app_templates", "list[str]", "Layers: the Virtuozzo application templates this layer stands for; they name "
            "its ploop cache as `vzpkg create appcache` names one (`<os>_app_<md5 of the sorted names>`) and get a "
            "`templates/<app>/timestamp`. Default: the layer's name after its base's `<distro>-<version>-<arch>-`.",
            default=[], inherit=False),
    Setting("distro", "str", "Distribution; selects the package backend.", choices=DISTROS),
    Setting("release", "str", "Release as the distro's tools name it (apt codename, dnf releasever)."),
    Setting("version", "str", "Release version (12, 22.04, 9)."),
    Setting("arch", "str", "Architecture, in vztt's naming.", default="x86_64", choices=ARCHES),
    Setting("summary", "str", "One line for `vztt list`.", default="", templated=True),
    Setting("hostname", "str", "Hostname of booted test containers.", default="localhost"),
    Setting("osrelease", "str", "Kernel release that `uname -r` reports inside booted templates, for old "
            "distributions whose package scripts check the kernel version (e.g. `2.6.32`). Applied through "
            "kernel.virt_osrelease, vztt's kernel patch: in the VM runtime (`vztt test --vm`) always; in the "
            "container runtime only on a host kernel that has it (otherwise noted and skipped).",
            pattern=OSRELEASE_PATTERN, pattern_doc=OSRELEASE_WORDS),
    Setting("cpu_level", "str", "x86-64 microarchitecture level the template's programs are built for: boot "
            "tests refuse a host CPU without it (containers, KVM) and give a TCG VM a model with it. EL 9 is built "
            "for x86-64-v2, EL 10 for x86-64-v3 (AVX2, FMA, BMI2, MOVBE: Intel Haswell, AMD Zen and later).",
            default="x86-64", choices=("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")),
    Setting("variables", "dict[str,str]", "Extra variables for templates.", default={}, merge=MERGE),
    Setting("merged_usr", "bool", "Create the merged-/usr symlinks before unpacking (debootstrap's way) and pick usr-is-merged over usrmerge.", default=True),
    Setting("packages.priority", "str", "apt: the priority set installed besides Essential packages (`required` is mmdebstrap's minbase).",
            default="required", choices=("essential", "required", "important")),
    Setting("packages.base", "list[str]", "dnf: the base package set (names, provides, `@group` ids); a child recipe "
            "replaces it whole. (apt: unused; `packages.priority` picks the base.)", default=[]),
    Setting("packages.include", "list[str]", "Packages to install on top of the base set.", default=[], merge=APPEND),
    Setting("packages.exclude", "list[str]", "Packages that must not be installed (a dependency on one is an error).", default=[], merge=APPEND),
    Setting("dnf.install_weak_deps", "bool", "dnf: resolve weak dependencies (Recommends, Supplements) too.",
            default=False),
    Setting("dnf.nodocs", "bool", "dnf: install with `tsflags=nodocs` (files marked as documentation left out).",
            default=True),
    Setting("repositories", "records", "Package repositories, merged by name.", default=[], merge=BY_KEY,
            record_key="name", fields=REPOSITORY_FIELDS),
    Setting("files", "records", "Files written into the image after install, merged by path.", default=[], merge=BY_KEY,
            record_key="path", fields=FILE_FIELDS),
    Setting("environment", "dict[str,str]", "Environment for package scripts and hooks.", default={}, merge=MERGE),
    Setting("hooks", "records", "Scripts run in order within their `phase`, merged by name.", default=[], merge=BY_KEY,
            record_key="name", fields=HOOK_FIELDS),
    Setting("smoke", "records", "Checks run in the booted template, merged by name.", default=[], merge=BY_KEY,
            record_key="name", fields=SMOKE_FIELDS),
    Setting("boot.timeout", "int", "Boot test: seconds for the booted template to reach running (or degraded).",
            default=60),
    Setting("boot.allowed_failed", "list[str]", "Boot test: units allowed to fail at boot (shell patterns, "
            "e.g. `systemd-remount-fs.service`); any other failed unit fails the test.", default=[], merge=APPEND),
    Setting("boot.allowed_failed_emulated", "list[str]", "Boot test: units also allowed to fail when the template's "
            "init runs under qemu-user (another architecture than the host's, in the container runtime; not in the "
            "VM, which emulates a whole machine): failures that are the emulator's, not the template's. Say why "
            "beside each.", default=[], merge=APPEND),
    Setting("boot.network", "bool", "Boot test: give the booted template a network link (a veth pair, or virtio-net in "
            "the VM) to a namespace of the test's own and run the network checks (address, ping from inside, ssh "
            "from the host side with a throwaway key). Needs sshd and ping in the template.", default=True),
    Setting("boot.ip", "list[str]", "Boot test: the template's addresses, ADDR/PREFIX, IPv4 or IPv6, written into its "
            "own network files as `vztt create --ip` writes them (`vztt test --ip` replaces them).",
            default=["192.0.2.2/24"]),
    Setting("boot.gateway", "list[str]", "Boot test: the default route(s), one per IP version, inside a subnet of "
            "`boot.ip`; the host side of the link takes this address (`vztt test --gateway`).",
            default=["192.0.2.1"]),
    Setting("boot.nameserver", "list[str]", "Boot test: DNS servers written into the template (resolv.conf or its "
            "network files; nothing is looked up).", default=[]),
    Setting("boot.search_domain", "list[str]", "Boot test: DNS search domains written into the template.", default=[]),
    Setting("boot.interface", "str", "Boot test: the template's interface, as its network files name it.",
            default="eth0"),
    Setting("image.size", "str", "Size of the sparse build image (K, M, G suffixes).", default="4G"),
    Setting("format", "str|list[str]", "Archive format(s) `vztt build` makes: `plain` (rootfs .tar.lz4), `ploop` "
            "(Virtuozzo 7 `.plain.ploopv2.tar.lz4`), `lxc` (rootfs.tar.xz + meta.tar.xz), `incus` (incus.tar.xz + "
            "rootfs.squashfs), `oci` (OCI layout tar), `nspawn` (systemd's .tar.xz), or `all`; a list "
            "(`[\"plain\", \"lxc\"]`) or a comma-separated string makes several from one build.",
            default="plain", choices=("plain", "ploop", "lxc", "incus", "oci", "nspawn", "all")),
    Setting("compression.level", "int", "lxc, incus, oci, nspawn formats: 0 (fastest) to 9 (smallest). "
            "xz preset for the .tar.xz files, gzip level for the OCI layer (at least 1), squashfs "
            "compressor xz from 6 up, zstd (3 x level) below. The output is reproducible at every level.",
            default=6),
    Setting("disk.size", "str", "ploop caches: size of the virtual disk (vztt's DISKSPACE); the ext4 inside is "
            "shrunk to the content plus headroom and grows when a container is created.", default="10G"),
    Setting("disk.ext4_features", "str", "ploop caches: `safe` leaves out ext4 features old Virtuozzo 7 kernels "
            "cannot mount (metadata_csum, 64bit); `modern` keeps e2fsprogs' defaults.",
            default="safe", choices=("safe", "modern")),
)

BY_NAME: dict[str, Setting] = {s.key: s for s in SETTINGS}
# Top-level tables that group dotted settings ("packages" holds packages.include, ...).
GROUPS: frozenset[str] = frozenset(s.key.split(".")[0] for s in SETTINGS if "." in s.key)


def reference_markdown() -> str:
    """The recipe reference, generated from the table (docs/recipes.md)."""
    out = [
        "# Recipe settings",
        "",
        "Generated from `vztt/recipe/settings.py` by `vztt settings --markdown`; do not edit by hand.",
        "",
        "| key | type | default | merge | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]

    def row(s: Setting, prefix: str = "") -> str:
        default = "" if s.default in (None, [], {}) else f"`{s.default!r}`"
        extra = ""
        if s.choices:
            extra += " One of: " + ", ".join(f"`{c}`" for c in s.choices) + "."
        if s.pattern_doc:
            extra += f" {s.pattern_doc[0].upper()}{s.pattern_doc[1:]}."
        if s.templated:
            extra += " jinja2-templated."
        if not s.inherit:
            extra += " Not inherited."
        merge = s.merge if not prefix else ""
        return f"| `{prefix}{s.key}` | {s.toml_type} | {default} | {merge} | {s.doc}{extra} |"

    for s in SETTINGS:
        out.append(row(s))
        for f in s.fields:
            out.append(row(f, prefix=f"{s.key}[]."))
    out += [
        "",
        "Template variables (jinja2, in `files`, templated keys and `.j2` sources): `name`, `distro`, `release`, "
        "`version`, `arch`, `deb_arch`, `hostname`, `summary`, `cpu_level`, and everything in `variables`. "
        "Templates render in "
        "jinja2's sandbox with these variables only (no globals such as `range` or `cycler`); `{% include %}`, "
        "`{% import %}` and `{% extends %}` are refused.",
        "",
        "Package names (`packages.include`, `exclude`, `base`) follow the distro's rules: Debian policy's "
        "`[a-z0-9][a-z0-9+.-]+` (and `name:arch`) for apt; for dnf, names, provides (`name(...)`, with a "
        "version), `@group` ids and absolute file paths. Mirror variables in URLs: `$NAME`, `${NAME}`, and "
        "`${NAME:-FALLBACK}` (NAME's value if set, else FALLBACK, which may hold `$OTHER`).",
        "",
    ]
    return "\n".join(out)
