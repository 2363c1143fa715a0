"""The nightly, described once: its jobs, their steps, caches and artifacts,
and the settings it takes from the CI system.

`vztt/ci/github.py` renders it as `.github/workflow/nightly.yml` (a matrix
over the plan's templates); `vztt/ci/gitlab.py` as `.gitlab-ci.yml` (a plan
job and a trigger) plus the child pipeline the plan job generates at run
time (`vztt matrix --format gitlab`: one job per template). `make ci` writes
both files and tests/test_ci.py fails when a committed file differs from its
rendering: neither can drift from this description, nor from the other.

Commands use placeholders the renderers fill in: `{vztt}` (the vztt that
`make setup` installs), `{setup}` (`make setup`), `{template}` (the
template of a per-template job), `{layers}` (the layered templates that ride
in that job, after their base: `vztt matrix` groups them; empty for most) and `{setting:NAME}` or
`{setting:NAME|default}` (a setting's value, or the default when it is unset
or empty).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vztt import formats as formats_registry
from vztt.store.templates import SBOM_FILES

ALWAYS, ON_SUCCESS = "always", "on_success"


@dataclass(frozen=True)
class Setting:
    """A value the pipeline takes from the CI system (GitHub: vars/secrets; GitLab: CI/CD variables)."""

    name: str
    doc: str
    secret: bool = False            # GitHub: a secret; GitLab: a masked (or File) variable
    file: bool = False              # GitLab: a File variable (its value is a path)


@dataclass(frozen=True)
class Step:
    name: str
    run: str                        # shell; placeholders {vztt} {setup} {template}
    when: str = ON_SUCCESS          # always: also after an earlier step failed
    only: str = ""                  # a condition: "vm" (templates booted in a VM), "kernel-check",
                                    # "emulated" (a template whose arch the runner runs under emulation)
    each: bool = False              # run for the job's template and for each of its layers


@dataclass(frozen=True)
class Cache:
    """A directory kept between runs, under a key (GitHub actions/cache; GitLab cache:)."""

    name: str
    paths: tuple[str, ...]
    key: str                        # prefix; per template: + "-{template}"; kernel: + the kernel inputs' digest
    per_template: bool = False
    kernel: bool = False            # keyed by kernel/'s contents
    restore_only: bool = False      # read, never written (the kernel job writes it)
    save_on_failure: bool = False   # written even when the job fails (what was downloaded stays)


@dataclass(frozen=True)
class Artifact:
    """Files a job hands on (to the publish job, or to people: JUnit reports, logs)."""

    name: str
    paths: tuple[str, ...]
    when: str = ON_SUCCESS
    junit: tuple[str, ...] = ()     # the JUnit files among the paths (GitLab test reports)
    days: int | None = None


@dataclass(frozen=True)
class Job:
    name: str
    steps: tuple[Step, ...]
    needs: tuple[str, ...] = ()
    per_template: bool = False      # one job per template of the plan
    caches: tuple[Cache, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    takes: tuple[str, ...] = ()     # artifacts of the needed jobs it works on
    timeout_minutes: int | None = None
    after_failures: bool = False    # runs when a needed job failed (not when the run is cancelled)
    cache_dir: bool = True          # VZTT_CACHE is the checkout's cache/


MIRRORS = tuple(Setting(n, f"the mirror recipes name ${n} (vztt's url.map)")
                for n in ("DEBIAN_MIRROR", "UBUNTU_MIRROR", "CENTOS_MIRROR", "ALMALINUX_MIRROR", "ROCKY_MIRROR"))
PUBLISH_SETTINGS = (
    Setting("TEMPLATE_MIRROR", "where templates are published: a directory, or a WebDAV http(s):// URL"),
    Setting("TEMPLATE_MIRROR_URL", "where hosts read that mirror, for its index.html (default: TEMPLATE_MIRROR)"),
    Setting("SIGNING_KEY", "the armored OpenPGP secret key that signs index.json", secret=True, file=True),
    Setting("SIGNING_KEY_ID", "its fingerprint"),
    Setting("MIRROR_NETRC", "WebDAV credentials, a netrc file (or VZTT_PUBLISH_USER and VZTT_PUBLISH_PASSWORD)",
            secret=True, file=True),
)
SWITCHES = (
    Setting("KERNEL_CHECK", "false: skip `vztt kernel check` (the kernel is still built when kernel/ changed)"),
    Setting("VM_TEST_TEMPLATES", "templates booted in a VM as well, shell patterns (default: debian-* ubuntu-*)"),
    Setting("TEMPLATE_FORMATS", "the formats built and published, as --format takes them (default: all)"),
    Setting("ARM64_RUNNER", "runners for arm64 templates, labels comma-separated (GitHub runs-on, e.g. "
                            "self-hosted,linux,ARM64,vztt; GitLab tags, e.g. arm64); unset: under emulation on x86_64"),
)
# The architecture of the runners every job runs on, unless its template's architecture has
# runners of its own (`vztt matrix --runner ARCH=LABELS`, from ARM64_RUNNER).
RUNNER_ARCH = "x86_64"
# The setting naming each other architecture's runners, as the plan passes it to `vztt matrix`.
ARCH_RUNNER_SETTINGS = {"aarch64": "ARM64_RUNNER"}


@dataclass(frozen=True)
class Runners:
    """Where a template's job runs: on runners labelled for its architecture when there are
    some (`labels`: arch -> labels), else on the RUNNER_ARCH runners, under emulation when
    the architecture is another (qemu-user through binfmt_misc: the job runs `make binfmt`)."""

    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def of(self, arch: str) -> tuple[str, ...]:
        """The arch's own runners' labels; () for the default runners."""
        return self.labels.get(arch, ())

    def emulated(self, arch: str) -> bool:
        return arch != RUNNER_ARCH and not self.of(arch)

VM_PATTERNS = ("debian-*", "ubuntu-*")      # Debian's and Ubuntu's: the EL9 ones have not been booted in a VM yet


def template_files(template: str) -> tuple[str, ...]:
    """A build's files in the cache, as the publish job takes them: every format, the manifest, the SBOMs."""
    names = [n for f in formats_registry.names() for n in formats_registry.get(f).file_names(template)]
    return tuple(f"cache/{n}" for n in names + [f"{template}.manifest.json"]
                 + [f"{template}.{suffix}" for suffix in SBOM_FILES.values()])


KERNEL = Job(
    "kernel",
    timeout_minutes=60,
    caches=(Cache("built kernels and the source package, kept between runs", ("cache/kernel",), "vztt-kernel",
                  kernel=True),),
    steps=(
        Step("the series applies to Debian's current kernel source; the fragment survives olddefconfig",
             "apt-get update -q && {vztt} kernel check && {vztt} kernel check --arch aarch64", only="kernel-check"),
        Step("build both architectures' kernels (nothing to do unless the source, the series or a fragment "
             "changed; aarch64 is cross-compiled, for the arm64 templates' VM boot test)",
             "{vztt} kernel build && {vztt} kernel build --arch aarch64"),
        Step("kernel info", "{vztt} kernel info && {vztt} kernel info --arch aarch64"),
    ),
)

UPDATE = Job(
    "update",
    needs=("plan", "kernel"),
    per_template=True,
    timeout_minutes=60,
    caches=(
        Cache("package cache and apt/dnf state, shared between runs", ("cache/packages", "cache/state"),
              "vztt-packages", per_template=True, save_on_failure=True),
        Cache("the template cache (last template, its lock and history), kept between runs",
              ("cache/{template}.*", "cache/locks/{template}.lock.json", "cache/history/{template}"),
              "vztt-template", per_template=True),
        Cache("the kernel job's build, for the VM boot test", ("cache/kernel",), "vztt-kernel", kernel=True,
              restore_only=True),
    ),
    steps=(
        Step("an arm64 template on an x86_64 runner: register qemu-user for its programs (binfmt_misc)",
             "make binfmt", only="emulated"),
        Step("update (re-resolve; rebuild, boot-test and promote only if something changed)",
             "{vztt} update {template} {layers} --format {setting:TEMPLATE_FORMATS|all}"),
        Step("boot test report", "{vztt} test {template} --junit junit-{template}.xml", when=ALWAYS, each=True),
        Step("boot test in a VM with vztt's kernel (TCG where KVM does not run it)",
             "{vztt} test {template} --vm --junit junit-vm-{template}.xml", when=ALWAYS, only="vm", each=True),
    ),
    artifacts=(
        # The reports: JUnit, the logs, and a failed build's manifest (its boot test's report).
        Artifact("junit", ("junit-{template}.xml", "junit-vm-{template}.xml", "cache/logs/{template}.*",
                           "cache/{template}.manifest.json-failed"),
                 when=ALWAYS, junit=("junit-{template}.xml", "junit-vm-{template}.xml")),
        Artifact("template", template_files("{template}"), days=3),
    ),
)

PUBLISH = Job(
    "publish",
    needs=("update",),
    takes=("template",),
    after_failures=True,
    steps=(
        # The platforms hand over secrets differently: the renderers write this step.
        Step("signing key and mirror credentials", "", only="secrets"),
        Step("publish (only templates that passed their boot test; the index last)",
             '{vztt} publish --to "{setting:TEMPLATE_MIRROR}" --key "{setting:SIGNING_KEY_ID}" '
             '--url "{setting:TEMPLATE_MIRROR_URL}"'),
    ),
)

PLAN_COMMAND = "{vztt} matrix --format {ci}" + "".join(
    f' --runner "{arch}={{setting:{name}}}"' for arch, name in ARCH_RUNNER_SETTINGS.items())


def layer_path_sets(job: Job) -> dict[str, tuple[str, ...]]:
    """A per-template job's caches and artifacts whose paths name the template: a key for
    each (the GitHub matrix entry of a job with layers carries the layers' paths under it,
    `vztt matrix`), and those paths. The GitLab child pipeline names them all itself."""
    out: dict[str, tuple[str, ...]] = {}
    for what, name, paths in ([("cache", c.key, c.paths) for c in job.caches]
                              + [("artifact", a.name, a.paths) for a in job.artifacts]):
        named = tuple(p for p in paths if "{template}" in p)
        if named:
            out[layer_key(what, name)] = named
    return out


def layer_key(kind: str, name: str) -> str:
    """The matrix key of a cache's or artifact's paths for the layers of a job."""
    return f"{kind}_{name}".replace("-", "_")


def layer_paths(paths: tuple[str, ...], layers: list[str]) -> list[str]:
    """`paths` (placeholders) for each layer."""
    return [p.replace("{template}", t) for t in layers for p in paths]
JOBS = (KERNEL, UPDATE, PUBLISH)


@dataclass(frozen=True)
class Nightly:
    """The nightly as a whole: its schedule and what it takes from the CI system."""

    name: str = "nightly templates"
    cron: str = "17 2 * * *"
    settings: tuple[Setting, ...] = field(default=MIRRORS + PUBLISH_SETTINGS + SWITCHES)
    jobs: tuple[Job, ...] = JOBS


NIGHTLY = Nightly()
