#!/usr/bin/env python3
"""A/B of two wsbridge binaries, forward and agent mode, on bench.py's rows, interleaved:

    python3 binary_ab.py ROWS ROUNDS BASE_BINARY NEW_BINARY
    python3 binary_ab.py bulk-up,bulk-down,echo-50 4 /tmp/wsbridge-before target/profiling/wsbridge
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import run  # noqa: E402

BASE, NEW = sys.argv[3], sys.argv[4]
def with_bin(path, start):
    def go(*a):
        bench.WSBRIDGE = path
        return start(*a)
    return go
setups = [("fwd-base", with_bin(BASE, bench.start_forward)), ("fwd-new", with_bin(NEW, bench.start_forward)),
          ("agent-base", with_bin(BASE, bench.start_agent_mode)), ("agent-new", with_bin(NEW, bench.start_agent_mode))]
rows = sys.argv[1].split(",")
rounds = int(sys.argv[2])
res = {}
try:
    for rnd in range(rounds):
        for row in rows:
            for i in range(len(setups)):
                name, setup = setups[(rnd + i) % len(setups)]
                rec = bench.one(setup, row)
                res.setdefault(row, {}).setdefault(name, []).append(rec)
                print(f"round {rnd+1} {row:9} {name:10} {bench.fmt(rec, row)}", flush=True)
            r = res[row]
            print(f"round {rnd+1} {row:9} new/base: fwd {r['fwd-new'][-1]['value']/r['fwd-base'][-1]['value']:.3f}"
                  f" agent {r['agent-new'][-1]['value']/r['agent-base'][-1]['value']:.3f}", flush=True)
    print("\nmedians:")
    for row in rows:
        for name, _ in setups:
            recs = res[row][name]
            med = {k: statistics.median(x[k] for x in recs) for k in recs[0] if k != "error" and recs[0][k] is not None}
            print(f"  {row:9} {name:10} {bench.fmt(med, row)}")
        for m in ("fwd", "agent"):
            rs = [t["value"]/b["value"] for t, b in zip(res[row][f"{m}-new"], res[row][f"{m}-base"])]
            print(f"  {row:9} {m} new/base median {statistics.median(rs):.3f} per round " + ", ".join(f"{x:.3f}" for x in rs))
finally:
    run.stop_all()
