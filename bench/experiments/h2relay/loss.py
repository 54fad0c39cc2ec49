#!/usr/bin/env python3
"""Run by loss.sh inside the server's namespace. Per round, per loss level, per setup (orders
rotating): fresh processes, `loadgen echo` (N sessions x 64 B) through the server, whose link to
the agent crosses the lossy veth. Setups: wsbridge agent mode (one TCP data link per session)
and h2relay with default settings (all sessions on one HTTP/2 connection)."""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
H2DIR = HERE
sys.path.insert(0, str(H2DIR.parents[1]))
import run  # noqa: E402

WSBRIDGE = os.environ.get("WSBRIDGE", str(HERE / "wsbridge"))
H2RELAY = str(HERE / "target" / "release" / "h2relay")
SRV_IP, VETH_A = "10.77.0.1", "h2mix_va"
NS_A = "h2mix_a"
BEST = "--frame-size 1048576 --stream-window 4194304 --conn-window 67108864 --coalesce 524288 --read-buf 262144"


def in_a(cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NS_A, *cmd]


def set_loss(p: float) -> None:
    subprocess.run(in_a(["iptables", "-F"]), check=True)
    if p > 0:
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            subprocess.run(in_a(["iptables", "-A", chain, flag, VETH_A, "-m", "statistic", "--mode",
                                 "random", "--probability", str(p), "-j", "DROP"]), check=True)


def dropped() -> int:
    out = subprocess.run(in_a(["iptables", "-L", "-v", "-x", "-n"]), capture_output=True, text=True).stdout
    return sum(int(l.split()[0]) for l in out.splitlines() if "DROP" in l and l.split()[0].isdigit())


def snmp_tcp(key: str) -> int:
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index(key)])


def start_backend(log):
    p = run.spawn(in_a([str(run.LOADGEN), "backend", "echo"]), stdout=subprocess.PIPE, stderr=log)
    lines = run.Lines(p.stdout)
    return p, int(lines.q.get(timeout=20).strip())


def start_wsb_agent(work: Path, bport: int, log):
    port = run.free_port()
    run.write_agent_server(work, port)
    cfg = (work / "server.toml").read_text().replace(f'addr = "127.0.0.1:{port}"', f'addr = "0.0.0.0:{port}"')
    (work / "server.toml").write_text(cfg)
    server = run.spawn([WSBRIDGE, "--config", str(work / "server.toml")], stderr=log)
    run.wait_listening(port, server)
    cmd = run.agent_command(WSBRIDGE, work, port, bport)
    cmd[cmd.index("--server") + 1] = f"ws://{SRV_IP}:{port}/agent"
    agent = run.spawn(in_a(cmd), stderr=log)
    run.session_ready(port, timeout=60)
    return port, {"server": server, "agent": agent}


def make_h2(extra: list[str]):
    def start(work: Path, bport: int, log):
        port, aport = run.free_port(), run.free_port()
        while aport == port:
            aport = run.free_port()
        server = run.spawn([H2RELAY, "server", "--listen", f"127.0.0.1:{port}",
                            "--agent-listen", f"{SRV_IP}:{aport}", *extra], stderr=log)
        run.wait_listening(aport, server)
        agent = run.spawn(in_a([H2RELAY, "agent", "--server", f"{SRV_IP}:{aport}",
                                "--app", f"127.0.0.1:{bport}", *extra]), stderr=log)
        run.session_ready(port, timeout=60)
        return port, {"server": server, "agent": agent}
    return start


def one(setup, loss: float, sessions: int, seconds: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="h2loss-"))
    log = open(work / "log", "wb")
    procs = []
    try:
        set_loss(loss)
        be, bport = start_backend(log)
        procs.append(be)
        port, watched = setup(work, bport, log)
        procs.extend(watched.values())
        edge = {}

        def at(ev):
            edge[ev] = (dropped(), snmp_tcp("RetransSegs"), snmp_tcp("OutSegs"))
        got = run.run_loadgen(["echo", "--url", f"ws://127.0.0.1:{port}/", "--sessions", str(sessions),
                               "--msg-size", "64", "--seconds", str(seconds)], [], seconds + 120, at)
        res = got.get("result") or {}
        rec = {"rate": res.get("rate", 0.0), "p50": res.get("p50_us"), "p99": res.get("p99_us"),
               "p999": res.get("p999_us"), "max": res.get("max_us"), "error": got.get("error")}
        if "start" in edge and "end" in edge:
            rec["drops"], rec["retrans_srv"], rec["outsegs_srv"] = (
                e - s for s, e in zip(edge["start"], edge["end"]))
        for k, p in watched.items():
            if p.poll() is not None:
                rec["error"] = (rec["error"] or "") + f" {k} exited {p.returncode}"
        return rec
    finally:
        for p in reversed(procs):
            run.stop(p)
        set_loss(0)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def fmt(r: dict) -> str:
    def f(x):
        return f"{x:9,.0f}" if x is not None else "        -"
    s = (f"rate {r['rate']:8,.0f}/s  p50 {f(r['p50'])}  p99 {f(r['p99'])}  p99.9 {f(r['p999'])}"
         f"  max {f(r.get('max'))} µs")
    if r.get("drops") is not None:
        s += f"  drops {r['drops']:,} srv-retrans {r['retrans_srv']:,}/{r['outsegs_srv']:,} segs"
    if r.get("error"):
        s += f"  ERROR {r['error']}"
    return s


def main() -> int:
    global NS_A
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns-agent", default=NS_A)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--losses", default="0,0.01,0.03")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--setups", default="wsb-agent,h2-64k")
    ap.add_argument("--json")
    a = ap.parse_args()
    NS_A = a.ns_agent
    allsetups = {"wsb-agent": start_wsb_agent, "h2-64k": make_h2([]), "h2-best": make_h2(shlex.split(BEST))}
    setups = [(n, allsetups[n]) for n in a.setups.split(",")]
    losses = [float(x) for x in a.losses.split(",")]
    print(f"# loss.py: {a.sessions} echo sessions x 64 B, {a.seconds} s windows, random drop p on "
          f"{VETH_A} in and out (server<->agent link only)", flush=True)
    res: dict = {}
    for rnd in range(a.rounds):
        for j in range(len(losses)):
            loss = losses[(rnd + j) % len(losses)]
            for i in range(len(setups)):
                name, setup = setups[(rnd + i) % len(setups)]
                r = one(setup, loss, a.sessions, a.seconds)
                res.setdefault(loss, {}).setdefault(name, []).append(r)
                print(f"round {rnd + 1} loss {loss * 100:4.1f}% {name:9} {fmt(r)}", flush=True)
    print("\nmedians over rounds (per-round values in brackets):")
    for loss in losses:
        for name, _ in setups:
            rs = res[loss][name]
            med = {k: statistics.median([r[k] for r in rs if r.get(k) is not None] or [0])
                   for k in ("rate", "p50", "p99", "p999", "max")}
            print(f"  loss {loss * 100:4.1f}% {name:9} {fmt(med)}   [p99: "
                  + ", ".join(f"{r['p99']:,.0f}" for r in rs if r['p99'] is not None) + "; p99.9: "
                  + ", ".join(f"{r['p999']:,.0f}" for r in rs if r['p999'] is not None) + "; rate: "
                  + ", ".join(f"{r['rate']:,.0f}" for r in rs) + "]")
    if a.json:
        Path(a.json).write_text(json.dumps({str(k): v for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        run.stop_all()
