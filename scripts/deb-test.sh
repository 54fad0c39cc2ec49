#!/usr/bin/env bash
# The Debian package, built and tried on this machine:
#
#   scripts/deb-test.sh
#
# Builds the .deb (scripts/deb.sh, into target/deb-test/), installs it with dpkg, and checks what
# it installed: `/usr/bin/wsbridge --version` says the crate's version, `wsbridge check` accepts
# the packaged /etc/wsbridge/wsbridge.toml (a conffile), `man -w wsbridge` finds the manual
# page, the bash, zsh and fish completions and the systemd units are in place (the bash one
# loads); then `dpkg -r` removes the binary and keeps the conffile, and `dpkg -P` purges that.
# Ends with a cargo-style `test result:` line, so scripts/test-summary.sh counts it as one test.
#
# Packages the dev build by default (WSBRIDGE_DEB_PROFILE=release for the real thing): the
# tests have just built it, so this takes seconds where a release build with thin LTO takes
# minutes on two cores, and the package's contents and metadata are the same.
#
# Skipped (`TEST skipped: REASON`, then exit 0, the suite's convention) without dpkg, without
# root or `sudo -n`, without the systemd units in examples/, or when a wsbridge package is
# installed here already (it is not replaced).
# Needs cargo-deb (`cargo install cargo-deb --locked`; scripts/test.sh installs it) and
# examples/wsbridge.service, examples/wsbridge.socket and examples/agent/wsbridge-agent.service
# (scripts/deb.sh stops without them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=${WSBRIDGE_DEB_PROFILE:-dev}
passed() { echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out (scripts/deb-test.sh)"; }
skip() {
    echo "TEST skipped: scripts/deb-test.sh: $*" >&2
    passed
    exit 0
}
fail() {
    echo "scripts/deb-test.sh: FAILED: $*" >&2
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (scripts/deb-test.sh)"
    exit 1
}

command -v dpkg >/dev/null || skip "no dpkg here (not Debian)"
if ((EUID == 0)); then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    skip "installing a package needs root or sudo -n"
fi
for unit in examples/wsbridge.service examples/wsbridge.socket examples/agent/wsbridge-agent.service; do
    [[ -f $unit ]] || skip "$unit is missing (the package installs it; scripts/deb.sh refuses to build without it)"
done
if [[ $(dpkg-query -W -f='${Status}' wsbridge 2>/dev/null || true) == *installed* ]]; then
    skip "a wsbridge package is installed on this machine; not replacing it"
fi
# The test ends with a purge, which removes /etc/wsbridge/wsbridge.toml: never where someone
# keeps a configuration of their own.
if [[ -e /etc/wsbridge ]]; then
    skip "/etc/wsbridge exists and belongs to no wsbridge package: the purge at the end would remove a configuration that is not the test's"
fi

start=$SECONDS
out=target/deb-test
rm -rf "$out"
deb=$(scripts/deb.sh --profile "$profile" --fast -o "$out" | tail -1) || fail "scripts/deb.sh failed"
[[ -f $deb ]] || fail "scripts/deb.sh made no package (last line: $deb)"
built=$((SECONDS - start))

installed=0
cleanup() {
    if ((installed)); then
        "${as_root[@]}" dpkg -P wsbridge >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

"${as_root[@]}" dpkg -i "$deb" >/dev/null || fail "dpkg -i $deb"
installed=1

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
got=$(/usr/bin/wsbridge --version) || fail "/usr/bin/wsbridge --version"
[[ $got == "wsbridge $version"* ]] || fail "/usr/bin/wsbridge --version says '$got', not wsbridge $version"
/usr/bin/wsbridge check --config /etc/wsbridge/wsbridge.toml >/dev/null || fail "wsbridge check --config /etc/wsbridge/wsbridge.toml"
[[ $(dpkg-query -W -f='${Conffiles}' wsbridge) == *" /etc/wsbridge/wsbridge.toml "* ]] || fail "/etc/wsbridge/wsbridge.toml is not a conffile"
if command -v man >/dev/null; then
    page=$(man -w wsbridge) || fail "man -w wsbridge finds no manual page"
else
    page=/usr/share/man/man1/wsbridge.1.gz
fi
[[ $page == /usr/share/man/man1/wsbridge.1.gz && -f $page ]] || fail "the manual page is at '$page'"
for f in /usr/share/bash-completion/completions/wsbridge /usr/share/zsh/vendor-completions/_wsbridge \
    /usr/share/fish/vendor_completions.d/wsbridge.fish /usr/lib/systemd/system/wsbridge.service \
    /usr/lib/systemd/system/wsbridge.socket /usr/lib/systemd/system/wsbridge-agent.service \
    /usr/share/doc/wsbridge/examples/agent.toml /usr/share/doc/wsbridge/copyright; do
    [[ -s $f ]] || fail "$f is not installed"
done
bash -c 'source /usr/share/bash-completion/completions/wsbridge && complete -p wsbridge' >/dev/null ||
    fail "the bash completion does not load"

"${as_root[@]}" dpkg -r wsbridge >/dev/null || fail "dpkg -r wsbridge"
[[ ! -e /usr/bin/wsbridge ]] || fail "/usr/bin/wsbridge is still there after dpkg -r"
[[ -f /etc/wsbridge/wsbridge.toml ]] || fail "dpkg -r removed the conffile (only a purge should)"
"${as_root[@]}" dpkg -P wsbridge >/dev/null || fail "dpkg -P wsbridge"
installed=0
[[ ! -e /etc/wsbridge/wsbridge.toml ]] || fail "/etc/wsbridge/wsbridge.toml is still there after dpkg -P"

echo "scripts/deb-test.sh: $deb ($(stat -c %s "$deb") bytes, profile $profile): built in ${built} s, installed, checked and removed in $((SECONDS - start)) s"
passed
