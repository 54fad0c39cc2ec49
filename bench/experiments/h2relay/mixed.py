#!/usr/bin/env python3
"""Mixed traffic: small-message echo sessions beside one bulk session, same server+agent pair.

    python3 mixed.py --rounds 3 [--seconds 5] [--sessions 10] [--conds none,up,down]

Setups: wsbridge forward, wsbridge agent mode (per-session TCP data links), h2relay h2-64k
(defaults) and h2-best (bulk-tuned). Conditions: echo alone ("none"), echo while one session
runs `loadgen throughput --dir up` ("up") or `--dir down` ("down"). The app is ./mixapp: every
connection echoes except the bulk one (sink for up, source for down), chosen by a trigger file
touched just before the bulk session starts. "up-paced"/"down-paced": the app paces the bulk
session to 1 MiB per 10 ms (~105 MB/s) so that it does not saturate the 2 CPUs. Fresh processes per case; the setup order rotates
each round, conditions interleaved inside each setup's turn.
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
H2DIR = HERE
sys.path.insert(0, str(H2DIR.parents[1]))
sys.path.insert(0, str(H2DIR))
import run  # noqa: E402
import bench  # noqa: E402  (h2relay's bench.py: start_forward, start_agent_mode, make_h2)

bench.WSBRIDGE = os.environ.get("WSBRIDGE", str(HERE / "wsbridge"))
bench.H2RELAY = str(HERE / "target" / "release" / "h2relay")
MIXAPP = str(HERE / "target" / "mixapp")  # rustc -O --edition 2021 mixapp.rs -o target/mixapp
BEST = "--frame-size 1048576 --stream-window 4194304 --conn-window 67108864 --coalesce 524288 --read-buf 262144"


def one(setup, cond: str, seconds: float, sessions: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="h2mix-"))
    log = open(work / "log", "wb")
    procs = []
    trigger = work / "bulk_next"
    try:
        kind = {"down": "source", "up": "sink", "none": "sink", "up-paced": "sink-paced",
                "down-paced": "source-paced"}[cond]
        app = run.spawn([MIXAPP, kind, str(trigger)],
                        stdout=subprocess.PIPE, stderr=log)
        procs.append(app)
        lines = run.Lines(app.stdout)
        aport = int(lines.q.get(timeout=10).strip())
        port, watched = setup(work, aport, log)
        procs.extend(watched.values())
        url = f"ws://127.0.0.1:{port}/"
        bulk = None
        if cond != "none":
            trigger.touch()
            bulk = run.spawn([str(run.LOADGEN), "throughput", "--url", url, "--dir", cond.split("-")[0],
                              "--msg-size", "65536", "--seconds", str(seconds + 2.5), "--warmup", "0.5"],
                             stdout=subprocess.PIPE, stderr=log)
            procs.append(bulk)
            line = lines.q.get(timeout=10)
            assert line and line.strip() == "bulk", line
            time.sleep(1.0)
        got = run.run_loadgen(["echo", "--url", url, "--sessions", str(sessions), "--msg-size", "64",
                               "--seconds", str(seconds)], [], seconds + 60, lambda ev: None)
        res = got.get("result") or {}
        rec = {"rate": res.get("rate", 0.0), "p50": res.get("p50_us"), "p99": res.get("p99_us"),
               "p999": res.get("p999_us"), "max": res.get("max_us"), "bulk_mbs": None,
               "error": got.get("error")}
        if bulk is not None:
            still = bulk.poll() is None
            try:
                out, _ = bulk.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                out = ""
            r = [json.loads(l) for l in (out or "").splitlines() if l.startswith("{") and '"result"' in l]
            rec["bulk_mbs"] = r[-1].get("mb_per_s") if r else None
            if not still:
                rec["error"] = (rec["error"] or "") + " bulk ended before echo did"
        for k, p in watched.items():
            if p.poll() is not None:
                rec["error"] = (rec["error"] or "") + f" {k} exited {p.returncode}"
        return rec
    finally:
        for p in reversed(procs):
            run.stop(p)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def fmt(r: dict) -> str:
    def f(x):
        return f"{x:8,.0f}" if x is not None else "       -"
    s = f"rate {r['rate']:9,.0f}/s  p50 {f(r['p50'])}  p99 {f(r['p99'])}  p99.9 {f(r['p999'])} µs"
    if r.get("bulk_mbs") is not None:
        s += f"  bulk {r['bulk_mbs']:7,.0f} MB/s"
    if r.get("error"):
        s += f"  ERROR {r['error']}"
    return s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--conds", default="none,up,down,up-paced,down-paced")
    ap.add_argument("--setups", default="forward,wsb-agent,h2-64k,h2-best")
    ap.add_argument("--json")
    ap.add_argument("--binary", action="append", default=[],
                    help="NAME=PATH: also forward mode (fwd-NAME) and agent mode (agent-NAME) of that wsbridge")
    a = ap.parse_args()

    def with_binary(path, start):
        def go(*args):
            bench.WSBRIDGE = path
            return start(*args)
        return go

    default = bench.WSBRIDGE
    allsetups = {"forward": with_binary(default, bench.start_forward),
                 "wsb-agent": with_binary(default, bench.start_agent_mode),
                 "h2-64k": bench.make_h2([]), "h2-best": bench.make_h2(shlex.split(BEST))}
    for spec in a.binary:
        name, path = spec.split("=", 1)
        allsetups[f"fwd-{name}"] = with_binary(path, bench.start_forward)
        allsetups[f"agent-{name}"] = with_binary(path, bench.start_agent_mode)
    setups = [(n, allsetups[n]) for n in a.setups.split(",")]
    conds = a.conds.split(",")
    print(f"# mixed.py: {a.sessions} echo sessions x 64 B, {a.seconds} s windows; bulk = 1 session "
          f"of 64 KiB messages; h2-best = {BEST}; wsbridge {bench.WSBRIDGE}", flush=True)
    res: dict = {}
    for rnd in range(a.rounds):
        for i in range(len(setups)):
            name, setup = setups[(rnd + i) % len(setups)]
            for j in range(len(conds)):
                cond = conds[(rnd + j) % len(conds)]
                r = one(setup, cond, a.seconds, a.sessions)
                res.setdefault(cond, {}).setdefault(name, []).append(r)
                print(f"round {rnd + 1} {name:9} bulk={cond:10} {fmt(r)}", flush=True)
    print("\nmedians over rounds (per-round values in brackets):")
    for cond in conds:
        for name, _ in setups:
            rs = res[cond][name]
            med = {k: statistics.median([r[k] for r in rs if r[k] is not None] or [0])
                   for k in ("rate", "p50", "p99", "p999", "max")}
            med["bulk_mbs"] = statistics.median([r["bulk_mbs"] for r in rs if r["bulk_mbs"]]) \
                if any(r["bulk_mbs"] for r in rs) else None
            print(f"  bulk={cond:10} {name:9} {fmt(med)}   [p99.9: "
                  + ", ".join(f"{r['p999']:,.0f}" for r in rs) + "; rate: "
                  + ", ".join(f"{r['rate']:,.0f}" for r in rs) + "]")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        run.stop_all()
