#!/usr/bin/env python3
"""Profile wsbridge on the bulk rows (upload and download, one session).

    python3 bench/profile.py [--seconds 4]

Uses the binaries bench/run.py builds (run it, or its --smoke, first). perf's
hardware counters are not available in this VM (`perf stat -e instructions
true` says "not supported"), but the software cpu-clock event is, so the
bridge is sampled with `perf record -e cpu-clock` (user and kernel time).
Reports go to bench/tmp/profile/; a short summary is printed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the harness: process bookkeeping, port waits)


def top(report: str, n: int) -> list[str]:
    rows = [l for l in report.splitlines() if l.strip() and not l.startswith("#")]
    return rows[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    cfg = ap.parse_args()
    perf = shutil.which("perf")
    if not perf:
        sys.exit("perf not found (Debian: apt-get install linux-perf)")
    for exe in (run.LOADGEN, run.WSBRIDGE):
        if not exe.exists():
            sys.exit(f"{exe} missing: run `python3 bench/run.py --smoke` first")
    out = run.BENCH / "tmp" / "profile"
    out.mkdir(parents=True, exist_ok=True)
    try:
        for direction, kind in (("up", "sink"), ("down", "source")):
            backend, backend_port = run.start_backend(kind)
            port = run.free_port()
            data = out / f"perf-{direction}.data"
            log = open(out / f"wsbridge-{direction}.log", "w")
            bridge = run.spawn([perf, "record", "-q", "-e", "cpu-clock", "-F", "2999",
                                "-o", str(data), "--", str(run.WSBRIDGE), f"127.0.0.1:{port}",
                                f"127.0.0.1:{backend_port}"], stdout=log, stderr=log)
            run.wait_listening(port, bridge)
            res = subprocess.run([str(run.LOADGEN), "throughput", "--url",
                                  f"ws://127.0.0.1:{port}/", "--dir", direction,
                                  "--seconds", str(cfg.seconds)],
                                 capture_output=True, text=True, timeout=cfg.seconds + 60)
            result = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr
            run.stop(bridge, grace=20)
            run.stop(backend)
            flat = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--stdio",
                                   "-g", "none", "--percent-limit", "0.7",
                                   "--sort", "dso,symbol"],
                                  capture_output=True, text=True).stdout
            dso = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--stdio",
                                  "-g", "none", "--sort", "dso"],
                                 capture_output=True, text=True).stdout
            (out / f"report-{direction}.txt").write_text(flat)
            print(f"== bulk-{direction}: {result}")
            print("by DSO:\n  " + "\n  ".join(top(dso, 6)))
            print("top symbols:\n  " + "\n  ".join(top(flat, 15)))
    finally:
        run.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
