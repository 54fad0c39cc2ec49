#!/usr/bin/env bash
# Cross-builds wsbridge.exe for 64-bit Windows (x86_64-pc-windows-gnu) on Linux, installing the
# Rust target and Debian's MinGW-w64 gcc first if they are missing:
#
#   scripts/cross-windows.sh [--release] [--wine] [--target-dir DIR] [--example NAME]...
#
# The .exe lands in DIR/x86_64-pc-windows-gnu/{debug,release}/wsbridge.exe (DIR: the cargo
# target dir, ./target unless CARGO_TARGET_DIR says otherwise). It runs on Windows 10 and later,
# Windows Server 2016 and later, with nothing to install beside it.
# --wine also builds scripts/windows/bcryptprimitives.c beside it, for running it here under
# Wine 8 (see that file), and installs Wine if missing; never ship that DLL with the .exe.
# --example NAME also builds examples/NAME.rs (DIR/x86_64-pc-windows-gnu/PROFILE/examples/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=x86_64-pc-windows-gnu
profile=debug
wine=0
target_dir=${CARGO_TARGET_DIR:-target}
examples=()
while (($#)); do
    case $1 in
        --release) profile=release ;;
        --wine) wine=1 ;;
        --target-dir)
            target_dir=${2:?--target-dir needs a directory}
            shift
            ;;
        --example)
            examples+=(--example "${2:?--example needs a name}")
            shift
            ;;
        *)
            echo "usage: scripts/cross-windows.sh [--release] [--wine] [--target-dir DIR] [--example NAME]..." >&2
            exit 64
            ;;
    esac
    shift
done

if ((wine)); then
    scripts/windows/install-tools.sh --wine
else
    scripts/windows/install-tools.sh
fi
args=(build --target "$target" --bin wsbridge "${examples[@]}" --target-dir "$target_dir")
[[ $profile == release ]] && args+=(--release)
cargo "${args[@]}"
out=$target_dir/$target/$profile
if ((wine)); then
    scripts/windows/wine-prng.sh "$out" >/dev/null
    ((${#examples[@]})) && scripts/windows/wine-prng.sh "$out/examples" >/dev/null
fi
echo "$out/wsbridge.exe"
