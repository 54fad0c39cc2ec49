#!/usr/bin/env python3
"""Interleaved A/B of wsbridge binaries in agent mode, beside forward mode: the rate, p50, and
the user+system CPU per operation of each process (forward: the bridge; agent mode: the server
and the agent apart), for the echo-50 and sessions rows.

    cargo build --profile profiling            # and the other binary, in its own target dir
    python3 bench/agent_ab.py --rounds 4 \\
        before=/path/to/old/wsbridge after=target/profiling/wsbridge
    python3 bench/agent_ab.py --agent-tls ...    # the agent's links over wss://

Each round runs every variant in turn (starting one further along each round, so the shared
machine's drift falls on all alike), each with fresh processes: an echo backend (bench/loadgen),
a forward-mode bridge, and a server with one agent dialled in over loopback (plain ws://, as
bench/run.py's wsbridge-agent row). The medians over rounds are printed last. Uses the load
generator bench/run.py builds (run `python3 bench/run.py --smoke` first on a new machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the harness: ports, process bookkeeping, agent readiness)

ROWS = {
    "echo-50": ["echo", "--sessions", "50", "--msg-size", "64"],
    "sessions": ["sessions", "--concurrency", "50", "--msg-size", "64"],
}


def cpu_ticks(pid: int) -> int:
    f = run._stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else 0


def one(binary: str, rows: list[str], seconds: float, agent_tls: bool) -> dict:
    """Fresh backend, forward bridge, server and agent; each row once on each mode. With
    `agent_tls` the agent's links are wss:// (the server's listener takes both; the load
    generator stays on ws://)."""
    work = Path(tempfile.mkdtemp(prefix="wsbridge-agent-ab-"))
    procs = []
    try:
        backend, bport = run.start_backend("echo")
        procs.append(backend)
        server_port, forward_port = run.free_port(), run.free_port()
        while forward_port == server_port:
            forward_port = run.free_port()
        tls, scheme, ca = "", "ws", []
        if agent_tls:
            subprocess.run([str(run.LOADGEN), "gencert", "--dir", str(work)], check=True,
                           capture_output=True, timeout=60)
            tls = f'[listen.tls]\ncert = "{work / "cert.pem"}"\nkey = "{work / "key.pem"}"\n'
            scheme, ca = "wss", ["--ca-file", str(work / "cert.pem")]
        run.write_agent_server(work, server_port, tls)
        log = open(work / "log", "wb")
        server = run.spawn([binary, "--config", str(work / "server.toml")], stderr=log)
        procs.append(server)
        run.wait_listening(server_port, server)
        agent = run.spawn(run.agent_command(binary, work, server_port, bport, scheme, ca), stderr=log)
        procs.append(agent)
        run.session_ready(server_port)
        forward = run.spawn([binary, "--admin", "127.0.0.1:0", str(forward_port), f"127.0.0.1:{bport}"], stderr=log)
        procs.append(forward)
        run.wait_listening(forward_port, forward)
        hz = os.sysconf("SC_CLK_TCK")
        out = {}
        for row in rows:
            for mode, port, watched in (("forward", forward_port, {"bridge": forward}),
                                        ("agent", server_port, {"server": server, "agent": agent})):
                before = {k: cpu_ticks(p.pid) for k, p in watched.items()}
                args = ROWS[row]
                res = subprocess.run([str(run.LOADGEN), args[0], "--url", f"ws://127.0.0.1:{port}/",
                                      *args[1:], "--seconds", str(seconds)],
                                     capture_output=True, text=True, timeout=seconds + 60)
                after = {k: cpu_ticks(p.pid) for k, p in watched.items()}
                result = run.loadgen_result(res.stdout)
                n = result.get("round_trips") or result.get("sessions") or 0
                rec = {"rate": result.get("rate", 0.0), "p50_us": result.get("p50_us", 0.0)}
                for k in watched:
                    rec[f"{k}_cpu_us"] = (after[k] - before[k]) * 1e6 / hz / max(n, 1)
                out[f"{row} {mode}"] = rec
        return out
    finally:
        for p in reversed(procs):
            run.stop(p)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=PATH of a wsbridge binary")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", default="sessions,echo-50")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--agent-tls", action="store_true", help="the agent dials wss:// (its links are TLS)")
    a = ap.parse_args()
    variants = [v.split("=", 1) for v in a.variants]
    rows = a.rows.split(",")
    if any(r not in ROWS for r in rows) or any(len(v) != 2 for v in variants):
        ap.error(f"rows are {', '.join(ROWS)}; variants NAME=PATH")
    results: dict = {}
    for rnd in range(a.rounds):
        for i in range(len(variants)):
            name, path = variants[(rnd + i) % len(variants)]
            got = one(path, rows, a.seconds, a.agent_tls)
            for case, rec in got.items():
                results.setdefault((name, case), []).append(rec)
                cpu = " ".join(f"{k[:-7]} {v:.1f}" for k, v in rec.items() if k.endswith("_cpu_us"))
                print(f"round {rnd + 1} {name:10} {case:17} {rec['rate']:10,.0f}/s p50 {rec['p50_us']:9,.0f} µs"
                      f"  CPU µs/op: {cpu}", flush=True)
    print("\nmedians over rounds:")
    for (name, case), recs in results.items():
        med = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
        cpu = " ".join(f"{k[:-7]} {v:.1f}" for k, v in med.items() if k.endswith("_cpu_us"))
        print(f"  {name:10} {case:17} {med['rate']:10,.0f}/s p50 {med['p50_us']:9,.0f} µs  CPU µs/op: {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
