#!/bin/sh
# Idempotent: lets this x86_64 host run aarch64 programs, for building and booting arm64
# templates (vztt checks the same before a foreign build or boot). Debian's qemu-user-static
# ships the entry; binfmt_misc is not mounted on a fresh machine and installing the package
# registers nothing there. The entry must carry the F (fix binary) flag: the kernel then opens
# the interpreter at registration, and nothing of the emulator is needed inside a chroot,
# an image or a container. Never `systemd-binfmt` without arguments here: it first clears
# every entry on the host, other people's too. Run again after a reboot.
set -eu
BINFMT=/proc/sys/fs/binfmt_misc
ENTRY=qemu-aarch64
mountpoint -q "$BINFMT" || mount -t binfmt_misc binfmt_misc "$BINFMT"
[ "$(cat "$BINFMT/status")" = enabled ] || echo 1 > "$BINFMT/status"
# An entry of that name without F (made by hand, an old package): update-binfmts would keep it.
if [ -e "$BINFMT/$ENTRY" ] && ! grep -q '^flags: .*F' "$BINFMT/$ENTRY"; then
    echo -1 > "$BINFMT/$ENTRY"
fi
if [ -e "$BINFMT/$ENTRY" ]; then
    grep -qx enabled "$BINFMT/$ENTRY" || echo 1 > "$BINFMT/$ENTRY"
else
    update-binfmts --enable "$ENTRY"
fi
grep -q '^flags: .*F' "$BINFMT/$ENTRY" || { echo "binfmt-setup: $BINFMT/$ENTRY has no F flag" >&2; exit 1; }
