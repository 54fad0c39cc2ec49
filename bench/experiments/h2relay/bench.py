#!/usr/bin/env python3
"""Interleaved comparison: wsbridge forward mode, wsbridge agent mode, and the h2relay prototype
(server + agent multiplexing all sessions over one HTTP/2 connection).

    python3 bench.py --rounds 3 [--rows echo-50,bulk-up,bulk-down,sessions] \
        [--h2 h2=""] [--h2 'h2-f16k=--frame-size 16384'] [--json out.json]

Per round, per row, every setup runs in turn (the setup order rotates each round), each with
fresh processes: the backend (loadgen backend echo|sink|source) and the relay process(es).
CPU per op = (utime+stime) of each relay process between loadgen's "start" and "end" events
(the measured window) / ops (round trips, sessions, or MB for bulk rows).
Uses bench/run.py as a module for process bookkeeping and the agent server's config, as
bench/agent_ab.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import run  # noqa: E402

# The wsbridge under test: a copy, so that rebuilds during a run do not change it (see README).
WSBRIDGE = os.environ.get("WSBRIDGE", str(HERE / "wsbridge"))
H2RELAY = str(HERE / "target" / "release" / "h2relay")
LOADGEN = str(run.LOADGEN)

ROWS = {
    # name: (backend, loadgen args, seconds, ops key, metric)
    "echo-50": ("echo", ["echo", "--sessions", "50", "--msg-size", "64"], 5, "round_trips", "rate"),
    "bulk-up": ("sink", ["throughput", "--dir", "up", "--msg-size", "65536"], 4, "bytes", "mb_per_s"),
    "bulk-down": ("source", ["throughput", "--dir", "down", "--msg-size", "65536"], 4, "bytes", "mb_per_s"),
    "sessions": ("echo", ["sessions", "--concurrency", "50", "--msg-size", "64"], 5, "sessions", "rate"),
}

HZ = os.sysconf("SC_CLK_TCK")


def ticks(pid: int) -> int:
    f = run._stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else 0


def start_forward(work: Path, bport: int, log):
    port = run.free_port()
    p = run.spawn([WSBRIDGE, "--admin", "127.0.0.1:0", str(port), f"127.0.0.1:{bport}"], stderr=log)
    run.wait_listening(port, p)
    return port, {"bridge": p}


def start_agent_mode(work: Path, bport: int, log):
    port = run.free_port()
    run.write_agent_server(work, port)
    server = run.spawn([WSBRIDGE, "--config", str(work / "server.toml")], stderr=log)
    run.wait_listening(port, server)
    agent = run.spawn(run.agent_command(WSBRIDGE, work, port, bport), stderr=log)
    run.session_ready(port)
    return port, {"server": server, "agent": agent}


def make_h2(extra: list[str]):
    # Tokens KEY=VALUE (e.g. MALLOC_TRIM_THRESHOLD_=...) go to the environment, the rest to argv.
    env = dict(os.environ)
    env.update(t.split("=", 1) for t in extra if "=" in t and not t.startswith("-"))
    extra = [t for t in extra if not ("=" in t and not t.startswith("-"))]

    def start(work: Path, bport: int, log):
        port, aport = run.free_port(), run.free_port()
        while aport == port:
            aport = run.free_port()
        server = run.spawn([H2RELAY, "server", "--listen", f"127.0.0.1:{port}",
                            "--agent-listen", f"127.0.0.1:{aport}", *extra], stderr=log, env=env)
        run.wait_listening(aport, server)
        agent = run.spawn([H2RELAY, "agent", "--server", f"127.0.0.1:{aport}",
                           "--app", f"127.0.0.1:{bport}", *extra], stderr=log, env=env)
        run.session_ready(port)
        return port, {"server": server, "agent": agent}
    return start


def one(setup, row: str) -> dict:
    backend_kind, args, seconds, ops_key, metric = ROWS[row]
    work = Path(tempfile.mkdtemp(prefix="h2exp-"))
    log = open(work / "log", "wb")
    procs = []
    try:
        be, bport = run.start_backend(backend_kind, stderr=log)
        procs.append(be)
        port, watched = setup(work, bport, log)
        procs.extend(watched.values())
        cpu = {}

        def edge(ev: str):
            cpu[ev] = {k: ticks(p.pid) for k, p in watched.items()}

        got = run.run_loadgen([args[0], "--url", f"ws://127.0.0.1:{port}/", *args[1:],
                               "--seconds", str(seconds)], [], seconds + 60, edge)
        res = got.get("result") or {}
        ops = res.get(ops_key) or 0
        if ops_key == "bytes":
            ops = ops / 1e6  # per MB
        rec = {"value": res.get(metric, 0.0), "p50_us": res.get("p50_us"), "p99_us": res.get("p99_us"),
               "error": got.get("error")}
        if "start" in cpu and "end" in cpu:
            for k in watched:
                rec[f"cpu_{k}"] = (cpu["end"][k] - cpu["start"][k]) * 1e6 / HZ / max(ops, 1e-9)
        for k, p in watched.items():
            if p.poll() is not None:
                rec["error"] = (rec["error"] or "") + f" {k} exited {p.returncode}"
        return rec
    finally:
        for p in reversed(procs):
            run.stop(p)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def fmt(rec: dict, row: str) -> str:
    unit = "MB/s" if ROWS[row][4] == "mb_per_s" else "/s"
    s = f"{rec['value']:10,.1f} {unit:4}"
    if rec.get("p50_us") is not None:
        s += f" p50 {rec['p50_us']:7,.0f} p99 {rec['p99_us']:7,.0f} µs"
    cpu = " ".join(f"{k[4:]} {v:.2f}" for k, v in rec.items() if k.startswith("cpu_"))
    per = "µs/MB" if ROWS[row][4] == "mb_per_s" else "µs/op"
    s += f"  CPU {per}: {cpu}"
    if rec.get("error"):
        s += f"  ERROR {rec['error']}"
    return s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="echo-50,bulk-up,bulk-down,sessions")
    ap.add_argument("--h2", action="append", default=[], help='NAME=ARGS for an h2relay variant')
    ap.add_argument("--no-wsbridge-agent", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    setups = [("forward", start_forward)]
    if not a.no_wsbridge_agent:
        setups.append(("wsb-agent", start_agent_mode))
    for spec in a.h2 or ["h2relay="]:
        name, extra = spec.split("=", 1)
        setups.append((name, make_h2(shlex.split(extra))))
    rows = a.rows.split(",")
    results: dict = {}
    for rnd in range(a.rounds):
        for row in rows:
            for i in range(len(setups)):
                name, setup = setups[(rnd + i) % len(setups)]
                rec = one(setup, row)
                results.setdefault(row, {}).setdefault(name, []).append(rec)
                print(f"round {rnd + 1} {row:9} {name:10} {fmt(rec, row)}", flush=True)
            fwd = results[row]["forward"][-1]["value"] or float("nan")
            ratios = " ".join(f"{n}/fwd {results[row][n][-1]['value'] / fwd:.3f}"
                              for n, _ in setups if n != "forward")
            print(f"round {rnd + 1} {row:9} ratios: {ratios}", flush=True)
    print("\nmedians over rounds (ratio column = median of the per-round ratios):")
    for row in rows:
        per = results[row]
        for name, _ in setups:
            recs = per[name]
            med = {k: statistics.median(r[k] for r in recs) for k in recs[0]
                   if k != "error" and recs[0][k] is not None}
            line = f"  {row:9} {name:10} {fmt(med, row)}"
            if name != "forward":
                rs = [r["value"] / f["value"] for r, f in zip(recs, per["forward"]) if f["value"]]
                line += f"  ratio/fwd median {statistics.median(rs):.3f} (per round: " + \
                        ", ".join(f"{x:.3f}" for x in rs) + ")"
            print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        run.stop_all()
