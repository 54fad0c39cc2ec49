#!/usr/bin/env bash
# The release binaries, Linux and Windows, with their sizes and SHA-256 sums:
#
#   scripts/release.sh
#
# Builds `cargo build --release` (x86_64 Linux, glibc) and the same for x86_64-pc-windows-gnu
# (scripts/cross-windows.sh, which installs the Rust target and MinGW-w64 if they are missing),
# then prints one line per binary:
#
#   target/release/wsbridge                                             9876543 bytes  sha256 <64 hex digits>
#   target/x86_64-pc-windows-gnu/release/wsbridge.exe                  10987654 bytes  sha256 <64 hex digits>
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target_dir=${CARGO_TARGET_DIR:-target}
cargo build --release --bin wsbridge --target-dir "$target_dir"
exe=$(scripts/cross-windows.sh --release --target-dir "$target_dir" | tail -1)
echo
for bin in "$target_dir/release/wsbridge" "$exe"; do
    [[ -f $bin ]] || {
        echo "scripts/release.sh: $bin was not built" >&2
        exit 1
    }
    printf '%-66s %10d bytes  sha256 %s\n' "$bin" "$(stat -c %s "$bin")" "$(sha256sum "$bin" | cut -d' ' -f1)"
done
