#!/usr/bin/env bash
# Installs Debian packages with apt-get, as root or through `sudo -n` (never waiting for a
# password nobody will type: CI has no stdin), non-interactively and quietly:
#
#   scripts/apt-install.sh PACKAGE...
#
# The callers (scripts/test.sh, scripts/windows/install-tools.sh) decide what is missing.
set -euo pipefail

die() {
    printf 'scripts/apt-install.sh: %s\n' "$*" >&2
    exit 1
}

(($#)) || exit 0
if ((EUID == 0)); then
    as_root=(env DEBIAN_FRONTEND=noninteractive)
elif command -v sudo >/dev/null; then
    as_root=(sudo -n env DEBIAN_FRONTEND=noninteractive)
else
    die "not root and no sudo: install these Debian packages first: $*"
fi
command -v apt-get >/dev/null || die "no apt-get here: install these packages first: $*"
"${as_root[@]}" apt-get update -qq </dev/null
"${as_root[@]}" apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "$@" </dev/null
