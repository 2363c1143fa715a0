# The two commands (README): `make demo` and `make test`, on a fresh Debian 12
# machine as root. Everything they need is installed here, idempotently.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
VZTT := $(VENV)/bin/vztt
STAMP := $(VENV)/.deps-stamp

# arm64 templates on an x86_64 host: qemu-user-static (Debian's qemu-aarch64 binfmt entry, with
# the fix-binary flag) and binfmt-support run the target's programs during the build and the
# container boot test; qemu-system-arm boots the VM test; gcc-aarch64-linux-gnu cross-compiles
# the arm64 container kernel. `make binfmt` (.ci/binfmt-setup.sh) registers the emulator.
ARM64_PACKAGES := qemu-user-static binfmt-support qemu-system-arm gcc-aarch64-linux-gnu

# Debian packages: the tools we drive and the Python libraries we import
# (from Debian, because dnf's bindings exist only for Debian's python3).
# openssh-client: the boot test's network check logs in to the booted template
# with ssh (and makes its throwaway key with ssh-keygen); python3-yaml: the tests
# read the netplan files vztt writes; faketime: the reproducibility test builds again
# five years later (tests/test_hosts.py, tests/reprokit.py); python3-seccomp: the
# container runtime's system call filter (libseccomp builds it); libc6-dev's static
# libc (build-essential): tests/escape.c, the escape attempts, is linked static.
APT_PACKAGES := \
	python3 python3-venv python3-pip python3-setuptools python3-wheel \
	python3-click python3-jinja2 python3-lz4 python3-requests python3-debian python3-apt python3-dnf \
	python3-pytest python3-seccomp \
	apt apt-utils dpkg dpkg-dev gpg gpg-agent gpgv debian-archive-keyring \
	e2fsprogs util-linux mount tar lz4 xz-utils zstd iproute2 git \
	mmdebstrap \
	rpm createrepo-c busybox-static \
	ploop qemu-utils fdisk gdisk \
	build-essential bc bison flex libelf-dev libssl-dev cpio kmod patch qemu-system-x86 \
	nginx curl \
	squashfs-tools openssh-client python3-yaml python3-xmltodict python3-attr rsync chromium fonts-dejavu-core \
	faketime \
	$(ARM64_PACKAGES)

# The other container hosts, whose own programs the tests run against our formats and mirror
# (lxc-create/-start/-attach, systemd-pull/-nspawn, podman/skopeo, incus), and what they need.
HOST_PACKAGES := lxc wget podman skopeo runc uidmap systemd-container openssl
# Incus exists for Debian 12 only in bookworm-backports (.ci/add-backports.sh adds that suite
# from the host's own Debian mirror). Never install lxd beside it: both claim root's subuid range.
BACKPORTS_PACKAGES := incus-base incus-extra

DEMO ?= debian-12-x86_64-minimal

.PHONY: all setup binfmt demo test test-fast bench docs ci clean-cache

all: setup

# apt-get update first (a fresh machine has stale or no lists); install only what is missing.
$(STAMP): Makefile pyproject.toml
	@missing=$$(dpkg-query -W -f='$${Package} $${db:Status-Abbrev}\n' $(APT_PACKAGES) 2>/dev/null | awk '$$2 != "ii" {print $$1}'; \
	  for p in $(APT_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing// /}" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)

# Foreign architectures (arm64 on x86_64): mount binfmt_misc and enable Debian's qemu-aarch64
# entry with the F flag. Idempotent and cheap; needed again after a reboot.
binfmt: setup
	@.ci/binfmt-setup.sh

demo: setup
	$(VZTT) build $(DEMO)
	@echo
	@$(VZTT) list

# For the tests only, from PyPI (not packaged in Debian 12): the workflow linter
# (check-jsonschema) and the reference SBOM validators (spdx-tools,
# cyclonedx-python-lib), pinned with their dependencies in tests/requirements-sbom.txt.
TEST_STAMP := $(VENV)/.test-deps-stamp
$(TEST_STAMP): $(STAMP) tests/requirements-sbom.txt
	$(PY) -m pip install -q 'check-jsonschema>=0.27' -r tests/requirements-sbom.txt
	@touch $@

# gitlab-ci-local runs .gitlab-ci.yml in the tests: 4.73.0 with its whole dependency tree
# pinned by tests/tools/package-lock.json (npm ci). It needs Node.js >= 20.19, which Debian 12's
# nodejs (18) is not: the machine's own Node.js is used, and checked here.
NODE_TOOLS := tests/tools
GCL := $(NODE_TOOLS)/node_modules/.bin/gitlab-ci-local
$(GCL): $(NODE_TOOLS)/package.json $(NODE_TOOLS)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null \
	  || { echo "the tests need Node.js >= 20.19 and npm (for gitlab-ci-local); install them first"; exit 1; }
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)' \
	  || { echo "gitlab-ci-local 4.73.0 needs Node.js >= 20.19 (this machine has $$(node --version))"; exit 1; }
	npm ci --prefix $(NODE_TOOLS) --no-audit --no-fund
	@touch $@

# The hosts' packages, installed with a policy-rc.d that keeps their services (lxc-net, lxcfs,
# incus) from starting: the tests start what they need, privately, and stop it.
HOSTS_STAMP := $(VENV)/.hosts-stamp
$(HOSTS_STAMP): Makefile .ci/add-backports.sh
	@.ci/add-backports.sh
	@missing=$$(for p in $(HOST_PACKAGES) $(BACKPORTS_PACKAGES); do \
	  [ "$$(dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null)" = "ii " ] || echo $$p; done); \
	if [ -n "$${missing// /}" ]; then \
	  echo "installing: "$$missing; guard=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	    chmod 755 /usr/sbin/policy-rc.d; guard=1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  rc=$$?; [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi
	@touch $@

# -rs: every skip's reason at the end; --durations=30: where the run's time goes (budget: 45 min); VZTT_STRICT_SKIPS=1: a skip for anything but an optional
# resource (tests/strictskips.py: the real Ubuntu archive, the host's CPU or kernel) fails the run.
test: setup binfmt $(TEST_STAMP) $(HOSTS_STAMP) $(GCL)
	VZTT_STRICT_SKIPS=1 $(PY) -m pytest -q -rs --durations=30 -p no:cacheprovider tests

# Without the real builds from Debian's mirror.
test-fast: setup binfmt $(TEST_STAMP) $(GCL)
	$(PY) -m pytest -q -p no:cacheprovider -m "not network" tests

bench: setup binfmt
	$(PY) tests/bench.py

docs: setup
	$(VZTT) settings --markdown > docs/recipes.md

# .github/workflows/nightly.yml and .gitlab-ci.yml, from the one description in vztt/ci/jobs.py.
ci: setup
	$(PY) -m vztt.ci

clean-cache:
	rm -rf cache/*.tar.lz4 cache/*.json cache/locks cache/state cache/logs cache/.work
