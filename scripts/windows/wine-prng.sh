#!/usr/bin/env bash
# Builds scripts/windows/bcryptprimitives.c (ProcessPrng for Wine 8, see the file) into
# OUT_DIR/bcryptprimitives.dll with MinGW-w64, if it is missing or older than its source:
#
#   scripts/windows/wine-prng.sh OUT_DIR
#
# Put the DLL beside a wsbridge.exe that runs under Wine; never beside one that ships.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: scripts/windows/wine-prng.sh OUT_DIR}
src=$here/bcryptprimitives.c
dll=$out/bcryptprimitives.dll
command -v x86_64-w64-mingw32-gcc >/dev/null || {
    echo "scripts/windows/wine-prng.sh: x86_64-w64-mingw32-gcc not found (Debian: apt-get install gcc-mingw-w64-x86-64)" >&2
    exit 1
}
mkdir -p "$out"
if [[ ! -f $dll || $src -nt $dll ]]; then
    x86_64-w64-mingw32-gcc -shared -O2 -Wall -Werror -o "$dll.tmp" "$src" -ladvapi32
    mv "$dll.tmp" "$dll"
fi
echo "$dll"
