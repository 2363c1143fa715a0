#!/bin/sh
# Idempotent: adds Debian's bookworm-backports suite from the SAME mirror the host's
# apt already uses for bookworm (no host is named here), for Incus (incus-base and
# incus-extra exist for Debian 12 only there). Backports are NotAutomatic (pin 100):
# apt takes nothing from them unless a package exists only there or is asked for
# with -t bookworm-backports. Prints nothing when the source is there already.
set -eu
out=/etc/apt/sources.list.d/vztt-bookworm-backports.sources
[ -s "$out" ] && exit 0
grep -qs '^VERSION_CODENAME=bookworm$' /etc/os-release || { echo "add-backports: not Debian 12 (bookworm): skipped" >&2; exit 0; }
mirror=$( { awk '/^URIs:/{u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null;
            awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null; } | head -n1)
[ -n "$mirror" ] || { echo "add-backports: no bookworm source in the apt sources" >&2; exit 1; }
printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
  "$mirror" > "$out.tmp"
mv "$out.tmp" "$out"
echo "add-backports: $out ($mirror)"
