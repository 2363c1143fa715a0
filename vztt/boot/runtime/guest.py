"""The VM's guest side: what vztt adds to the scratch copy of the tree (the
guest agent and its unit, the osrelease init wrapper, /etc/hostname) and the
ext4 disk made of it. The agent's protocol is in AGENT, the channel in vm.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import time
from pathlib import Path

from vztt.base.errors import RuntimeUnavailable
from vztt.base.proc import run
from vztt.base.inroot import write_in_root
from .host import EXEC_ENV

PORT_NAME = "org.vztt.agent"
AGENT_PATH = "/usr/lib/vztt/agent"
INIT_PATH = "/usr/lib/vztt/init"
UNIT_NAME = "vztt-agent.service"
# What the agent's commands run with: as a container's (host.EXEC_ENV), in the unit's syntax.
GUEST_ENV = " ".join(f"{key}={value}" for key, value in EXEC_ENV.items())

AGENT = r"""#!/bin/sh
# vztt's guest agent: written by vztt into a scratch disk, never part of a template.
# Runs the host's commands and answers over the virtio-serial port PORT_NAME:
#   host:  X <id> <timeout> <base64 arg>...   run argv for at most <timeout> seconds ("-": "")
#          P <id>                             power off
#   guest: H <protocol>                        ready
#          R <id> <exit status> <base64 of stdout and stderr>
#          P <id>                              powering off
port=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = PORT_NAME ] && port=/dev/${p##*/}
done
if [ -z "$port" ]; then
  echo "vztt-agent: no virtio-serial port PORT_NAME" >&2
  exit 1
fi
set -f   # requests are split into words below: no globbing
out=/run/vztt-agent.out
exec 3<>"$port"
echo "H 1" >&3
while IFS= read -r line <&3; do
  set -- $line
  [ $# -ge 2 ] || continue
  op=$1 id=$2
  shift 2
  case $op in
  X)
    t=$1
    shift
    n=$#
    while [ "$n" -gt 0 ]; do
      a=.
      [ "$1" = - ] || a=$(printf %s "$1" | base64 -d; echo .)
      shift
      set -- "$@" "${a%.}"
      n=$((n - 1))
    done
    timeout -k 5 "$t" "$@" >"$out" 2>&1 </dev/null
    status=$?
    { printf 'R %s %s ' "$id" "$status"; base64 -w0 "$out"; echo; } >&3
    ;;
  P)
    echo "P $id" >&3
    systemctl --no-block poweroff
    ;;
  esac
done
""".replace("PORT_NAME", PORT_NAME)

UNIT = f"""[Unit]
Description=vztt guest agent: the boot test's commands, over virtio-serial

[Service]
Type=simple
ExecStart={AGENT_PATH}
Environment={GUEST_ENV}
StandardOutput=journal+console
StandardError=journal+console
"""

INIT = """#!/bin/sh
# vztt: run the booted system in a UTS namespace of its own whose release is the
# recipe's osrelease (kernel.virt_osrelease: the initial namespace keeps the real one).
mount -t proc proc /proc
exec unshare --uts /bin/sh -c '
if ! echo "$1" > /proc/sys/kernel/virt_osrelease; then
  echo "vztt-init: cannot set kernel.virt_osrelease to $1" >&2
fi
umount /proc
exec /sbin/init
' vztt-init RELEASE
"""


def prepare_tree(tree: Path, hostname: str, osrelease: str | None) -> None:
    """Write the guest's additions into `tree` (a scratch copy: it is changed)."""
    write_in_root(tree, "/etc/hostname", (hostname + "\n").encode())
    write_in_root(tree, AGENT_PATH, AGENT.encode(), 0o755)
    write_in_root(tree, f"/etc/systemd/system/{UNIT_NAME}", UNIT.encode())
    if osrelease:
        write_in_root(tree, INIT_PATH, INIT.replace("RELEASE", shlex.quote(osrelease)).encode(), 0o755)


def make_disk(tree: Path, disk: Path) -> float:
    """ext4 from the tree with mkfs.ext4 -d: room for the content twice over,
    sparse; inode tables written now rather than by the guest. Returns the seconds it took."""
    started = time.monotonic()
    size_mb = max(1024, math.ceil(tree_bytes(tree) * 2 / 2**20) + 512)
    run(["mkfs.ext4", "-q", "-F", "-L", "vztt-root", "-d", tree, "-E", "lazy_itable_init=0,lazy_journal_init=0",
         disk, f"{size_mb}M"], what=f"mkfs.ext4 -d {tree}", error=RuntimeUnavailable, timeout=600)
    return time.monotonic() - started


def tree_bytes(tree: Path) -> int:
    total = 0
    for parent, dirs, files in os.walk(tree):
        for name in files + dirs:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512 + 256
    return total
