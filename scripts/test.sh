#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or an old one: installs what is missing, then
# checks formatting and lints and runs every test target.
#
#   scripts/test.sh
#
# Installs (only when missing, so a second run installs nothing):
#   - Debian packages chromium (the browser tests' browser, /usr/bin/chromium), novnc and
#     tigervnc-standalone-server (the noVNC browser tests serve Debian's noVNC from
#     /usr/share/novnc and connect it to a real VNC server, its Xvnc), openssl (the wss://
#     browser test makes its self-signed certificate with it), socat, curl, util-linux's unshare
#     (a test process's own resolv.conf or hosts file, as root), haproxy (the real load
#     balancer in front, for the PROXY protocol and several-instance tests), redis-server (the
#     real Redis the Redis token tests start on loopback ports of their own), and nginx (only
#     `nginx -t` on examples/nginx.conf: about 2 MB; WSBRIDGE_SKIP_NGINX=1 leaves it out, and the
#     check then says it is skipped), with apt-get as root or through sudo;
#   - tests/browser/node_modules (playwright-core, pinned by tests/browser/package-lock.json),
#     with `npm ci`, again whenever package.json or package-lock.json changed. No browser is ever
#     downloaded: the browser test drives Debian's Chromium;
#   - for the Windows build (scripts/windows/install-tools.sh): the Rust target
#     x86_64-pc-windows-gnu (rustup), Debian's gcc-mingw-w64-x86-64, wine and wine64;
#   - cargo-deb, pinned (`cargo install cargo-deb --locked --version …`: a few minutes, once),
#     for the Debian package test.
# Then: cargo fmt --check, cargo clippy -D warnings (for Linux and for Windows), the load
# generator's smoke run, the Windows cross-build (which the Wine tests in
# tests/integration/windows.rs run; built here so that it does not compete with timing tests),
# cargo test --all-targets, and the Debian package built from the dev build the tests made,
# installed, checked and removed (scripts/deb-test.sh: under a minute; it needs root or sudo -n,
# and says it is skipped without), ending on one line over every test target:
#   N passed, N failed, N skipped
# (skipped: #[ignore]d, and tests that print `TEST skipped: REASON`, see tests/common/mod.rs).
#
# Needs: cargo with rustfmt and clippy, Node.js >= 20 with npm.
# WSBRIDGE_SKIP_BROWSER=1 skips the browser tests (and installing what only they need: chromium,
# novnc, tigervnc-standalone-server, the npm packages).
# WSBRIDGE_SKIP_NGINX=1 does not install nginx (its example's check then says it is skipped).
# WSBRIDGE_SKIP_WINDOWS=1 skips the Windows cross-build and its checks (the Wine tests then say
# they are skipped, unless a build and Wine are already there).
# WSBRIDGE_SKIP_DEB=1 skips the Debian package test (and installing cargo-deb).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'scripts/test.sh: %s\n' "$*" >&2
    exit 1
}

skip_browser=0
[[ ${WSBRIDGE_SKIP_BROWSER:-} == 1 ]] && skip_browser=1
skip_windows=0
[[ ${WSBRIDGE_SKIP_WINDOWS:-} == 1 ]] && skip_windows=1
skip_deb=0
[[ ${WSBRIDGE_SKIP_DEB:-} == 1 ]] && skip_deb=1
# The cargo-deb the package test was written against: later releases plan to refuse packaging a
# dev build, which scripts/deb-test.sh does to stay quick.
cargo_deb_version=3.8.0

section "tools"
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt not found: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy not found: rustup component add clippy"
cargo --version
if ((!skip_browser)); then
    command -v node >/dev/null || die "node not found: the browser test needs Node.js >= 20 with npm (or set WSBRIDGE_SKIP_BROWSER=1)"
    command -v npm >/dev/null || die "npm not found: the browser test needs Node.js >= 20 with npm (or set WSBRIDGE_SKIP_BROWSER=1)"
    node_major=$(node -p 'process.versions.node.split(".")[0]')
    ((node_major >= 20)) || die "node $(node --version) is too old: playwright-core needs Node.js >= 20"
    echo "node $(node --version), npm $(npm --version 2>/dev/null)"
fi

section "disk"
# A first run builds about 6 GiB into the target directory (the Linux and Windows debug builds
# and the test binaries; incremental compilation adds as much again); a full disk fails a build
# halfway with "No space left on device".
target_dir=${CARGO_TARGET_DIR:-target}
probe=$target_dir
until [[ -d $probe ]]; do probe=$(dirname -- "$probe"); done
free_gib=$(df -Pk -- "$probe" | awk 'NR == 2 { print int($4 / 1048576) }')
echo "${free_gib} GiB free where $target_dir is"
if ((free_gib < 8)); then
    printf 'scripts/test.sh: warning: only %s GiB free for %s; a first run needs about 6 GiB (8 with\n' "$free_gib" "$target_dir" >&2
    printf '  incremental compilation): free some, or set CARGO_TARGET_DIR to a roomier disk\n' >&2
fi

section "system packages"
missing=()
if ((!skip_browser)) && [[ ! -x /usr/bin/chromium ]]; then
    missing+=(chromium)
fi
# novnc, tigervnc-standalone-server: the noVNC browser tests (tests/browser.rs) serve noVNC's
# files from /usr/share/novnc and connect it to a real VNC server, Xvnc. Without recommends they
# are about 15 MB to download: novnc depends on websockify and its Python libraries, and on
# nodejs, so where Node.js did not come as a Debian package (nvm, a tarball) Debian's own lands
# in /usr/bin as well (the PATH decides which node runs).
if ((!skip_browser)); then
    [[ -f /usr/share/novnc/vnc.html ]] || missing+=(novnc)
    [[ -x /usr/bin/Xvnc ]] || command -v Xvnc >/dev/null || missing+=(tigervnc-standalone-server)
fi
# openssl: the TLS tests write PKCS#1 and SEC1 keys with it, and the browser test its certificate.
command -v openssl >/dev/null || missing+=(openssl)
command -v socat >/dev/null || missing+=(socat)
# curl: the HTTPS admin listener's test scrapes it as an operator would (OpenSSL's TLS, not ours);
# util-linux's unshare: the DNS and SNI tests give one process its own resolv.conf or hosts file;
# its script (bsdutils): a terminal for the binary.
command -v curl >/dev/null || missing+=(curl)
command -v unshare >/dev/null || missing+=(util-linux)
command -v script >/dev/null || missing+=(bsdutils)
# haproxy: the access-policy and balancer tests put the real HAProxy in front (PROXY protocol v2,
# health checks on /readyz, drain).
[[ -x /usr/sbin/haproxy ]] || command -v haproxy >/dev/null || missing+=(haproxy)
# prometheus (for its promtool): the admin test checks /metrics with `promtool check metrics`, as
# an operator's tools read it. Debian's package starts the server where a system lets packages
# start services (it then listens on port 9090); the test uses only promtool.
command -v promtool >/dev/null || missing+=(prometheus)
# redis-server: the Redis token tests start their own (tests/common/redis.rs), TLS included.
[[ -x /usr/bin/redis-server ]] || command -v redis-server >/dev/null || missing+=(redis-server)
# nginx: `nginx -t` on examples/nginx.conf. Debian's package starts the service where a system
# lets packages start services (it then listens on port 80): WSBRIDGE_SKIP_NGINX=1 to go without.
if [[ ${WSBRIDGE_SKIP_NGINX:-} != 1 ]]; then
    [[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null || missing+=(nginx)
fi
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    scripts/apt-install.sh "${missing[@]}"
else
    echo "all present"
fi
if ((!skip_browser)); then
    /usr/bin/chromium --version 2>/dev/null || die "/usr/bin/chromium does not run"
fi
openssl version || die "openssl does not run"

section "windows cross-build tools"
if ((skip_windows)); then
    echo "skipped (WSBRIDGE_SKIP_WINDOWS=1)"
else
    scripts/windows/install-tools.sh --wine
fi

section "cargo-deb (the Debian package test)"
if ((skip_deb)); then
    echo "skipped (WSBRIDGE_SKIP_DEB=1)"
elif cargo deb --version 2>/dev/null | grep -q "$cargo_deb_version"; then
    cargo deb --version
else
    echo "cargo install cargo-deb --locked --version $cargo_deb_version"
    cargo install cargo-deb --locked --version "$cargo_deb_version" --quiet
fi

section "tests/browser: npm packages"
if ((skip_browser)); then
    echo "skipped (WSBRIDGE_SKIP_BROWSER=1)"
else
    # node_modules is current when it was installed from exactly this package.json and lockfile.
    stamp_file=tests/browser/node_modules/.wsbridge-installed-from
    want=$(cat tests/browser/package.json tests/browser/package-lock.json | sha256sum | cut -d' ' -f1)
    have=$(cat "$stamp_file" 2>/dev/null || true)
    if [[ $want != "$have" || ! -f tests/browser/node_modules/playwright-core/package.json ]]; then
        echo "npm ci (node_modules missing or stale)"
        # playwright-core has no install script and downloads nothing; these make sure of it.
        (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --ignore-scripts --loglevel=error </dev/null)
        echo "$want" >"$stamp_file"
    else
        echo "up to date"
    fi
fi

section "cargo fmt --all -- --check"
cargo fmt --all -- --check

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

if ((!skip_windows)); then
    section "cargo clippy --target x86_64-pc-windows-gnu --all-targets -- -D warnings"
    cargo clippy --target x86_64-pc-windows-gnu --all-targets -- -D warnings

    section "windows cross-build for the Wine tests"
    # Into the directory tests/integration/windows.rs builds in (beside the test target dir, not
    # in it), with the DLL Wine 8 needs beside the .exe.
    scripts/cross-windows.sh --wine --target-dir "${CARGO_TARGET_DIR:-target}/windows" --example windows_service
fi

section "bench/loadgen smoke (the benchmark's load generator must not rot)"
# Built into the main target dir so it reuses the dependencies the tests compile anyway.
cargo run --quiet --manifest-path bench/loadgen/Cargo.toml --target-dir "${CARGO_TARGET_DIR:-target}" -- smoke

section "cargo build --examples (the integration tests run the embedding example)"
cargo build --examples --quiet

section "cargo test --all-targets"
# Every target runs (--no-fail-fast), and each test's output is shown (--show-output) so that
# the skip lines below can be counted; the summary line comes last whatever the outcome, and the
# script still exits with cargo's status.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --no-fail-fast -- --show-output 2>&1 | tee "$log" || status=$?

if ((!skip_deb)); then
    section "scripts/deb-test.sh (the Debian package, from the dev build the tests just made)"
    # After the tests: it installs into /usr, and the build it packages is theirs.
    scripts/deb-test.sh 2>&1 | tee -a "$log" || status=$?
fi
# One line over every target: N passed, N failed, N skipped (see scripts/test-summary.sh).
scripts/test-summary.sh "$log"
exit "$status"
