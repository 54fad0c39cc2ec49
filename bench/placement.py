#!/usr/bin/env python3
"""echo-50 (or a bulk row) in forward and agent mode side by side, with what the rate alone does
not show: the CPU and context switches of each process per round trip (per MB for bulk), and
how much of the machine stayed idle during the run; optionally with each process pinned to a
CPU.

    cargo build --profile profiling
    python3 bench/placement.py --rounds 3                              # the scheduler's placement
    python3 bench/placement.py --rounds 3 --pin S0,A1,B0,L1,F0          # pinned
    python3 bench/placement.py --rounds 3 --row bulk-up                 # echo-50, bulk-up, bulk-down

--pin takes LETTER+CPU pairs: S the agent-mode server, A the agent, B the echo backend, L the
load generator, F the forward-mode bridge (the same B and L serve both modes). Each round runs
forward mode, then agent mode, against the same processes (bench/run.py's harness; run
`python3 bench/run.py --smoke` first on a new machine). Diagnostic only: bench/run.py is the
benchmark.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the harness: ports, process bookkeeping, agent readiness)

# row: (backend kind, load generator arguments, result field, unit of the per-unit figures)
ROWS = {
    "echo-50": ("echo", ["echo", "--sessions", "50", "--msg-size", "64"], "round_trips", "round trip"),
    "bulk-up": ("sink", ["throughput", "--dir", "up", "--msg-size", "65536"], "mb", "MB"),
    "bulk-down": ("source", ["throughput", "--dir", "down", "--msg-size", "65536"], "mb", "MB"),
}


def cpu_ticks(pid: int) -> int:
    f = run._stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else 0


def switches(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return sum(int(n) for n in re.findall(r"(?m)^(?:non)?voluntary_ctxt_switches:\s+(\d+)$", text))


def idle_and_total() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)


def pin_all(pid: int, cpu: int) -> None:
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(run.ROOT / "target" / "profiling" / "wsbridge"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pin", default="", help="e.g. S0,A1,B0,L1,F0")
    ap.add_argument("--row", default="echo-50", choices=sorted(ROWS))
    a = ap.parse_args()
    kind, load, count_field, unit = ROWS[a.row]
    work = Path(tempfile.mkdtemp(prefix="wsbridge-placement-"))
    procs = []
    try:
        backend, bport = run.start_backend(kind)
        procs.append(backend)
        server_port, forward_port = run.free_port(), run.free_port()
        while forward_port == server_port:
            forward_port = run.free_port()
        run.write_agent_server(work, server_port, "")
        log = open(work / "log", "wb")
        server = run.spawn([a.binary, "--config", str(work / "server.toml")], stderr=log)
        procs.append(server)
        run.wait_listening(server_port, server)
        agent = run.spawn(run.agent_command(a.binary, work, server_port, bport, "ws", []), stderr=log)
        procs.append(agent)
        run.session_ready(server_port)
        forward = run.spawn([a.binary, str(forward_port), f"127.0.0.1:{bport}"], stderr=log)
        procs.append(forward)
        run.wait_listening(forward_port, forward)
        loadgen_cpu = None
        by_letter = {"S": server, "A": agent, "B": backend, "F": forward}
        for item in filter(None, a.pin.split(",")):
            letter, cpu = item[0], int(item[1:])
            if letter == "L":
                loadgen_cpu = cpu
            else:
                pin_all(by_letter[letter].pid, cpu)
        hz = os.sysconf("SC_CLK_TCK")
        for rnd in range(a.rounds):
            for mode, port, watched in (("forward", forward_port, {"bridge": forward}),
                                        ("agent", server_port, {"server": server, "agent": agent})):
                watched = dict(watched, backend=backend)
                ticks0 = {k: cpu_ticks(p.pid) for k, p in watched.items()}
                cs0 = {k: switches(p.pid) for k, p in watched.items()}
                idle0, total0 = idle_and_total()
                pin = ["taskset", "-c", str(loadgen_cpu)] if loadgen_cpu is not None else []
                out = subprocess.run([*pin, str(run.LOADGEN), load[0], "--url", f"ws://127.0.0.1:{port}/",
                                      *load[1:], "--seconds", str(a.seconds)],
                                     capture_output=True, text=True, timeout=a.seconds + 60).stdout
                idle1, total1 = idle_and_total()
                result = run.loadgen_result(out)
                if count_field == "mb":
                    n = max(result.get("mb_per_s", 0) * result.get("seconds", a.seconds), 1e-9)
                    rate = f"{result.get('mb_per_s', 0):9,.0f} MB/s"
                else:
                    n = max(result.get(count_field) or 0, 1)
                    rate = f"{result.get('rate', 0):9,.0f}/s p50 {result.get('p50_us', 0):7,.0f} µs"
                per = " ".join(
                    f"{k} {(cpu_ticks(p.pid) - ticks0[k]) * 1e6 / hz / n:.1f} µs {(switches(p.pid) - cs0[k]) / n:.2f} cs"
                    for k, p in watched.items())
                idle = (idle1 - idle0) / max(total1 - total0, 1)
                print(f"round {rnd + 1} {mode:8} {rate}  idle {idle * 100:4.1f} %  per {unit}: {per}", flush=True)
        return 0
    finally:
        for p in reversed(procs):
            run.stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
