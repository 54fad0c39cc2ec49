#!/usr/bin/env python3
"""Interleaved A/B of bridge command lines on one load: rate, latency, and the bridge's user and
system CPU and involuntary context switches per operation.

    python3 bench/ab.py --row echo-50 --rounds 6 \\
        'one=target/release/wsbridge --threads 1 {listen} {target}' \\
        'two=target/release/wsbridge --threads 2 {listen} {target}'

Each variant is NAME=COMMAND; in COMMAND, {listen} and {target} stand for 127.0.0.1:PORT of the
bridge and of the backend, and {cert} / {key} for a generated self-signed certificate (a variant
that uses {cert} is spoken to over wss://). Rows: echo-50 and echo-1 (64-byte round trips with 50
or 1 sessions) and sessions (open, one echo, close; 50 at a time), as in bench/run.py. The
variants run in turn within each round, so the shared machine's drift falls on all of them; the
medians over rounds are printed last. Uses the load generator bench/run.py builds (run its
--smoke first on a new machine).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the harness: process bookkeeping, port waits, loadgen's JSON lines)

ROWS = {
    "echo-50": ["echo", "--sessions", "50", "--msg-size", "64"],
    "echo-1": ["echo", "--sessions", "1", "--msg-size", "64"],
    "sessions": ["sessions", "--concurrency", "50", "--msg-size", "64"],
}
KEYS = ("rate", "p50_us", "p99_us", "cpu_us", "user_us", "sys_us", "invol_cs")


def user_sys_ticks(pid: int) -> tuple[int, int]:
    f = run._stat_fields(pid)
    return (int(f[11]), int(f[12])) if f else (0, 0)


def involuntary_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(cmd: str, row: str, seconds: float, backend_port: int, cert_dir: Path) -> dict:
    port = run.free_port()
    argv = shlex.split(cmd.format(listen=f"127.0.0.1:{port}", target=f"127.0.0.1:{backend_port}",
                                  cert=cert_dir / "cert.pem", key=cert_dir / "key.pem"))
    bridge = run.spawn(argv, stderr=subprocess.DEVNULL)
    try:
        run.wait_listening(port, bridge)
        if "{cert}" in cmd:
            url = ["--url", f"wss://127.0.0.1:{port}/", "--ca", str(cert_dir / "cert.pem")]
        else:
            url = ["--url", f"ws://127.0.0.1:{port}/"]
        client = run.spawn([str(run.LOADGEN), *ROWS[row], *url, "--seconds", str(seconds),
                            "--warmup", "0.5"], stdout=subprocess.PIPE)
        lines = run.Lines(client.stdout)
        deadline = time.monotonic() + seconds + 60
        at, result = {}, None
        try:
            while (msg := lines.next_json(deadline)) is not None:
                if msg.get("event") in ("start", "end"):
                    at[msg["event"]] = (user_sys_ticks(bridge.pid), involuntary_switches(bridge.pid))
                if msg.get("type") in ("result", "error"):
                    result = msg
        finally:
            run.stop(client)
        if not result or result.get("type") == "error" or result.get("errors"):
            raise RuntimeError(f"{cmd}: {result}")
        ops = result.get("round_trips") or result["sessions"]
        (u0, s0), cs0 = at["start"]
        (u1, s1), cs1 = at["end"]
        per_op = 1e6 / run.CLK_TCK / ops
        return {"rate": result["rate"], "p50_us": result["p50_us"], "p99_us": result["p99_us"],
                "user_us": (u1 - u0) * per_op, "sys_us": (s1 - s0) * per_op,
                "cpu_us": (u1 - u0 + s1 - s0) * per_op, "invol_cs": (cs1 - cs0) / ops}
    finally:
        run.stop(bridge)


def num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", choices=sorted(ROWS), default="echo-50")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("variants", nargs="+", metavar="NAME=COMMAND")
    cfg = ap.parse_args()
    variants = []
    for v in cfg.variants:
        name, sep, cmd = v.partition("=")
        if not sep or not cmd.strip():
            ap.error(f"{v!r}: expected NAME=COMMAND")
        variants.append((name, cmd))
    if not run.LOADGEN.exists():
        sys.exit(f"{run.LOADGEN} missing: run `python3 bench/run.py --smoke` first")
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    try:
        with tempfile.TemporaryDirectory(prefix="wsbridge-ab-") as tmp:
            cert_dir = Path(tmp)
            run.run_cmd([str(run.LOADGEN), "gencert", "--dir", str(cert_dir)], quiet=True)
            backend, backend_port = run.start_backend("echo")
            for rnd in range(1, cfg.rounds + 1):
                for name, cmd in variants:
                    r = measure(cmd, cfg.row, cfg.seconds, backend_port, cert_dir)
                    results[name].append(r)
                    run.log(f"round {rnd} {name:>10}: " + ", ".join(f"{k} {num(r[k])}" for k in KEYS))
            run.stop(backend)
    finally:
        run.stop_all()
    print(f"\n{cfg.row}, medians over {cfg.rounds} rounds of {cfg.seconds} s:")
    print("| variant | " + " | ".join(KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for name, rs in results.items():
        print(f"| {name} | " + " | ".join(num(statistics.median(r[k] for r in rs)) for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
