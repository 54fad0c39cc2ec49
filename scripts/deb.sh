#!/usr/bin/env bash
# The Debian package, with cargo-deb (`cargo install cargo-deb --locked`):
#
#   scripts/deb.sh [--profile PROFILE] [CARGO-DEB OPTIONS...]
#
# Builds the binary (the release profile unless --profile says otherwise; scripts/deb-test.sh
# packages the dev build the tests have just made), generates what cargo-deb can only take as
# files from it (the manual page `wsbridge man` and the bash, zsh and fish completions
# `wsbridge completions SHELL`) into target/deb-assets/, and runs `cargo deb --no-build` with the
# metadata in Cargo.toml ([package.metadata.deb]). Prints the path of the .deb last.
#
# The systemd units come from examples/wsbridge.service, examples/wsbridge.socket and
# examples/agent/wsbridge-agent.service: without them this stops with an error rather than build
# a package without its units.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    printf 'scripts/deb.sh: %s\n' "$*" >&2
    exit 1
}

profile=release
if [[ ${1:-} == --profile ]]; then
    [[ -n ${2:-} ]] || die "--profile needs a profile name"
    profile=$2
    shift 2
fi

command -v cargo-deb >/dev/null || die "cargo-deb not found: cargo install cargo-deb --locked"
for unit in examples/wsbridge.service examples/wsbridge.socket examples/agent/wsbridge-agent.service; do
    [[ -f $unit ]] || die "$unit is missing: the package installs it (see [package.metadata.deb] in Cargo.toml)"
done

target_dir=${CARGO_TARGET_DIR:-target}
case $profile in
    dev | test) out_dir=debug ;;
    bench) out_dir=release ;;
    *) out_dir=$profile ;;
esac
if [[ $profile == dev ]]; then
    # The test package: the binary `cargo test` just built. Built with the test targets, so that
    # the dev-dependencies' features (tokio's "full") stay unified and nothing is compiled again.
    cargo build --profile dev --bin wsbridge --tests --locked
else
    cargo build --profile "$profile" --bin wsbridge --locked
fi
bin=$target_dir/$out_dir/wsbridge
[[ -x $bin ]] || die "$bin was not built"

# cargo-deb reads these paths relative to the package root (Cargo.toml's assets).
assets=target/deb-assets
mkdir -p "$assets"
"$bin" man | gzip -9n >"$assets/wsbridge.1.gz"
"$bin" completions bash >"$assets/wsbridge.bash"
"$bin" completions zsh >"$assets/_wsbridge"
"$bin" completions fish >"$assets/wsbridge.fish"

# cargo-deb prints the .deb's path as its last line.
cargo deb --no-build --locked --profile "$profile" "$@"
