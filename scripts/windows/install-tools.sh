#!/usr/bin/env bash
# Installs what cross-building wsbridge for Windows needs, only what is missing (a second run
# installs nothing and prints one line):
#
#   scripts/windows/install-tools.sh          # rustup target x86_64-pc-windows-gnu, MinGW-w64 gcc
#   scripts/windows/install-tools.sh --wine   # and Wine, to run the .exe here (the Wine tests)
#
# Debian packages go in with apt-get as root or through sudo -n; the Rust target with rustup.
set -euo pipefail

target=x86_64-pc-windows-gnu
die() {
    printf 'scripts/windows/install-tools.sh: %s\n' "$*" >&2
    exit 1
}

missing=()
command -v x86_64-w64-mingw32-gcc >/dev/null || missing+=(gcc-mingw-w64-x86-64)
if [[ ${1:-} == --wine ]]; then
    # wine64 runs 64-bit .exe files; wine is the `wine` command in front of it.
    command -v wine >/dev/null || missing+=(wine wine64)
fi
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    "$(dirname "${BASH_SOURCE[0]}")/../apt-install.sh" "${missing[@]}" >/dev/null
fi

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    command -v rustup >/dev/null || die "rustup not found: install the Rust target $target another way"
    echo "installing: rust target $target"
    rustup --quiet target add "$target"
fi
echo "windows cross-build tools: present ($target, $(x86_64-w64-mingw32-gcc -dumpversion | head -1) mingw gcc$(command -v wine >/dev/null && printf ', %s' "$(wine --version 2>/dev/null)"))"
