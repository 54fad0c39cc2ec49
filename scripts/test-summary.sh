#!/usr/bin/env bash
# One line over every test target of a `cargo test ... -- --show-output` log:
#
#   scripts/test-summary.sh LOG      ->   N passed, N failed, N skipped
#
# Sums the `test result:` line each target ends on (the last one alone, an example's `0 passed`,
# says nothing about the rest). A test that cannot run here prints `TEST skipped: REASON` and
# then passes (the convention in tests/common/mod.rs): such tests count as skipped, not passed,
# as do tests marked #[ignore]. A line printed twice (tests/browser.rs writes it to stdout and
# stderr) counts once. scripts/test.sh ends with this line.
set -euo pipefail

log=${1:?usage: scripts/test-summary.sh LOG}
skipped_lines=$({ grep -E '^[A-Za-z0-9_:]+ skipped: ' "$log" || true; } | sort -u | wc -l)
awk -v skipped_lines="$skipped_lines" '
    /^test result: / {
        for (i = 1; i < NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
            if ($(i + 1) ~ /^ignored/) ignored += $i
        }
    }
    END { printf "%d passed, %d failed, %d skipped\n", passed - skipped_lines, failed, ignored + skipped_lines }
' "$log"
