#!/usr/bin/env python3
"""Interleaved A/B of bridge command lines on one load: rate, latency, and the bridge's user and
system CPU and involuntary context switches per operation.

    python3 bench/ab.py --row echo-50 --rounds 6 \\
        'one=target/profiling/wsbridge --threads 1 {listen} {target}' \\
        'two=target/profiling/wsbridge --threads 2 {listen} {target}'

Each variant is NAME=COMMAND. COMMAND is split like a shell line, then in each word {listen} and
{target} stand for 127.0.0.1:PORT of the bridge and of the backend, and {cert} / {key} for a
generated self-signed certificate; a variant that uses {cert} is spoken to over wss://. Rows:
echo-50 and echo-1 (64-byte round trips with 50 or 1 sessions), sessions (open, one echo,
close; 50 at a time), bulk-up and bulk-down (one session's throughput, 64 KiB messages, to a
backend that reads everything or sends without end), as in bench/run.py. The variants run in turn within each round, starting
one further along each round, so the shared machine's drift falls on all of them alike; CPU and
context switches are summed over the bridge's process tree. The medians over rounds are printed
last, and every round goes to bench/results/ab-<time>.json. Uses the load generator that
bench/run.py builds (run its --smoke first on a new machine).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import statistics
import string
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
    "bulk-up": ["throughput", "--dir", "up", "--msg-size", "65536"],
    "bulk-down": ["throughput", "--dir", "down", "--msg-size", "65536"],
}
# The backend each row needs (`loadgen backend KIND`).
BACKENDS = {"bulk-up": "sink", "bulk-down": "source"}
KEYS = ("rate", "p50_us", "p99_us", "cpu_us", "user_us", "sys_us", "invol_cs")
PLACEHOLDERS = {"listen", "target", "cert", "key"}


def user_sys_ticks(root: int) -> tuple[int, int]:
    """utime and stime, each with reaped children's, over the process and its descendants."""
    user = system = 0
    for pid in run.tree(root):
        f = run._stat_fields(pid)
        if f:
            user += int(f[11]) + int(f[13])
            system += int(f[12]) + int(f[14])
    return user, system


def involuntary_switches(root: int) -> int:
    total = 0
    for pid in run.tree(root):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("nonvoluntary_ctxt_switches"):
                        total += int(line.split()[1])
            except OSError:
                pass
    return total


def placeholders(cmd: str) -> set[str]:
    names = set()
    for word in shlex.split(cmd):
        names.update(f for _, f, _, _ in string.Formatter().parse(word) if f is not None)
    return names


def measure(cmd: str, row: str, seconds: float, backend_port: int, cert_dir: Path) -> dict:
    port = run.free_port()
    subs = {"listen": f"127.0.0.1:{port}", "target": f"127.0.0.1:{backend_port}",
            "cert": str(cert_dir / "cert.pem"), "key": str(cert_dir / "key.pem")}
    argv = [word.format(**subs) for word in shlex.split(cmd)]
    with tempfile.TemporaryFile(mode="w+") as log:
        bridge = run.spawn(argv, stderr=log)
        try:
            run.wait_listening(port, bridge)
            if "cert" in placeholders(cmd):
                url = ["--url", f"wss://127.0.0.1:{port}/", "--ca", subs["cert"]]
            else:
                url = ["--url", f"ws://127.0.0.1:{port}/"]
            at = {}

            def at_edge(ev: str) -> None:
                at[ev] = (user_sys_ticks(bridge.pid), involuntary_switches(bridge.pid))

            out = run.run_loadgen([*ROWS[row], *url, "--seconds", str(seconds), "--warmup", "0.5"],
                                  [], seconds + 60.5, at_edge)
            if bridge.poll() is not None:
                raise RuntimeError(f"the bridge exited (code {bridge.returncode}) during the run")
        except Exception as e:
            log.seek(0)
            tail = log.read()[-400:].strip()
            raise RuntimeError(f"{e}" + (f"; bridge stderr: {tail}" if tail else "")) from None
        finally:
            run.stop(bridge)
    if "error" in out:
        raise RuntimeError(f"loadgen: {out['error']}")
    result = out["result"]
    if ROWS[row][0] == "throughput":
        # An operation is a megabyte (10^6 bytes): rate in MB/s, CPU µs per MB; no latencies.
        mb = result["bytes"] / 1e6
        (u0, s0), cs0 = at["start"]
        (u1, s1), cs1 = at["end"]
        per_mb = 1e6 / run.CLK_TCK / mb
        return {"rate": result["mb_per_s"], "p50_us": 0.0, "p99_us": 0.0,
                "user_us": (u1 - u0) * per_mb, "sys_us": (s1 - s0) * per_mb,
                "cpu_us": (u1 - u0 + s1 - s0) * per_mb, "invol_cs": (cs1 - cs0) / mb}
    ops = result["round_trips" if ROWS[row][0] == "echo" else "sessions"]
    if not ops or "start" not in at or "end" not in at:
        raise RuntimeError(f"nothing measured: {ops} operations, window edges {sorted(at)}")
    (u0, s0), cs0 = at["start"]
    (u1, s1), cs1 = at["end"]
    per_op = 1e6 / run.CLK_TCK / ops
    return {"rate": result["rate"], "p50_us": result["p50_us"], "p99_us": result["p99_us"],
            "user_us": (u1 - u0) * per_op, "sys_us": (s1 - s0) * per_op,
            "cpu_us": (u1 - u0 + s1 - s0) * per_op, "invol_cs": (cs1 - cs0) / ops}


def num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", choices=sorted(ROWS), default="echo-50")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("variants", nargs="+", metavar="NAME=COMMAND")
    cfg = ap.parse_args(argv)
    if cfg.rounds < 1 or cfg.seconds <= 0:
        ap.error("--rounds must be at least 1 and --seconds positive")
    cfg.pairs = []
    for v in cfg.variants:
        name, sep, cmd = v.partition("=")
        if not sep or not re.fullmatch(r"[\w.-]+", name) or not cmd.strip():
            ap.error(f"{v!r}: expected NAME=COMMAND, NAME of letters, digits, '.', '_' or '-'")
        if name in (n for n, _ in cfg.pairs):
            ap.error(f"variant name {name!r} given twice")
        try:
            unknown = placeholders(cmd) - PLACEHOLDERS
        except ValueError as e:
            ap.error(f"{name}: {e} (a literal brace is written {{{{ or }}}})")
        if unknown:
            ap.error(f"{name}: unknown placeholder(s) {sorted(unknown)}; known: {sorted(PLACEHOLDERS)}")
        if not {"listen", "target"} <= placeholders(cmd):
            ap.error(f"{name}: the command must use {{listen}} and {{target}}")
        cfg.pairs.append((name, cmd))
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, run._on_signal)
    signal.signal(signal.SIGINT, run._on_signal)
    if not run.LOADGEN.exists():
        sys.exit(f"{run.LOADGEN} missing: run `python3 bench/run.py --smoke` first")
    started = time.strftime("%Y-%m-%dT%H%M%S", time.gmtime())
    results: dict[str, list[dict]] = {name: [] for name, _ in cfg.pairs}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="wsbridge-ab-") as tmp:
        cert_dir = Path(tmp)
        if run.run_cmd([str(run.LOADGEN), "gencert", "--dir", str(cert_dir)], quiet=True, check=False):
            sys.exit("loadgen gencert failed")
        backend, backend_port = run.start_backend(BACKENDS.get(cfg.row, "echo"))
        n = len(cfg.pairs)
        for rnd in range(1, cfg.rounds + 1):
            # A different variant goes first each round: no variant always follows the same one.
            shift = (rnd - 1) % n
            for name, cmd in cfg.pairs[shift:] + cfg.pairs[:shift]:
                try:
                    r = measure(cmd, cfg.row, cfg.seconds, backend_port, cert_dir)
                except RuntimeError as e:
                    failures.append(f"round {rnd} {name}: {e}")
                    run.log(f"round {rnd} {name:>10}: FAILED: {e}")
                    continue
                results[name].append(dict(r, round=rnd))
                run.log(f"round {rnd} {name:>10}: " + ", ".join(f"{k} {num(r[k])}" for k in KEYS))
        run.stop(backend)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    raw = run.RESULTS / f"ab-{started}.json"
    with raw.open("x") as f:  # never over an earlier run's file
        f.write(json.dumps({"started_utc": started, "command": shlex.join(["python3", "bench/ab.py", *sys.argv[1:]]),
                                "row": cfg.row, "seconds": cfg.seconds, "rounds": cfg.rounds,
                                "variants": dict(cfg.pairs), "machine": run.machine_info(),
                                "results": results, "failures": failures}, indent=1) + "\n")
    print(f"\n{cfg.row}, medians over rounds of {cfg.seconds} s (raw: {raw.relative_to(run.ROOT)}):")
    print("| variant | rounds | " + " | ".join(KEYS) + " |")
    print("|---|---:|" + "---:|" * len(KEYS))
    for name, rs in results.items():
        cells = [num(statistics.median(r[k] for r in rs)) if rs else "" for k in KEYS]
        print(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        run.stop_all()
