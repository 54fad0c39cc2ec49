#!/usr/bin/env python3
"""Agent mode with a fleet: one wsbridge server and N agents (examples/fleet.rs, all in one
process) dialling it over loopback. Measures what an operator sizes a server by:

- how long N agents take to connect from nothing, and the server's CPU for it;
- the server's resident memory per connected agent (each with its control link and its pool
  of idle data links), and its CPU while the fleet is idle (pings both ways);
- sessions through one agent of the fleet (loadgen `sessions`: open, echo, close);
- a restart: SIGTERM (the drain tells every agent), a new server on the same port, and how
  long until every agent is back. With --drain-delay, the drain first asks the agents to move
  and answers their tries 503 for the delay (no other instance to go to): the server's CPU over
  the delay says what a fleet that moves costs an instance that drains.

    cargo build --profile profiling && cargo build --profile profiling --example fleet
    python3 bench/fleet.py --agents 1000

Uses bench/run.py's load generator and harness (`python3 bench/run.py --smoke` builds it).
Agents and their secret hash come from a fleet file (`[[agents]] source`), as a fleet would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

FLEET = run.ROOT / "target" / "profiling" / "examples" / "fleet"
SECRET = "fleet-bench-secret-0123456789abcdef"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    f = run._stat_fields(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK") if f else 0.0


class Lines:
    """The fleet's JSON lines, each with the time it was read."""

    def __init__(self, stream):
        self.seen: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.seen.append((time.monotonic(), ev))

    def wait_connected(self, n: int, since: float, timeout: float) -> float:
        """The time at which `n` agents were first reported connected after `since`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                for at, ev in self.seen:
                    if at >= since and ev.get("connected") == n:
                        return at
            time.sleep(0.02)
        with self.lock:
            last = self.seen[-1][1] if self.seen else None
        raise SystemExit(f"fleet: {n} agents not connected within {timeout} s (last: {last})")


def start_server(binary: str, config: Path, port: int, log) -> subprocess.Popen:
    p = run.spawn([binary, "--config", str(config)], stderr=log)
    run.wait_listening(port, p)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(run.ROOT / "target" / "profiling" / "wsbridge"))
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--pool", type=int, default=4, help="the endpoint's pool of idle data links per agent")
    ap.add_argument("--tls", action="store_true", help="the agents dial wss:// (a self-signed certificate)")
    ap.add_argument("--drain-delay", type=float, default=0.0,
                    help="the server's drain_delay in seconds (0: off, agents told at once)")
    ap.add_argument("--balancer-check", default="30",
                    help="each agent's balancer_check in seconds, or off (what the idle CPU includes)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wsbridge-fleet-"))
    procs = []
    try:
        backend, bport = run.start_backend("echo")
        procs.append(backend)
        digest = hashlib.sha256(SECRET.encode()).hexdigest()
        (work / "fleet").write_text("".join(f"shop-{i}: {digest}\n" for i in range(a.agents)))
        (work / "agent.secret").write_text(SECRET + "\n")
        port = run.free_port()
        tls, scheme, ca = "", "ws", []
        if a.tls:
            subprocess.run([str(run.LOADGEN), "gencert", "--dir", str(work)], check=True, capture_output=True, timeout=60)
            tls = f'[listen.tls]\ncert = "{work / "cert.pem"}"\nkey = "{work / "key.pem"}"\n'
            scheme, ca = "wss", ["--ca-file", str(work / "cert.pem")]
        (work / "server.toml").write_text(
            f'[[listen]]\naddr = "127.0.0.1:{port}"\n{tls}\n'
            f'[limits]\nmax_connections = {max(10_000, a.agents * 6)}\n\n'
            + (f'[timeouts]\ndrain_delay = "{int(a.drain_delay * 1000)}ms"\n\n' if a.drain_delay else '') +
            f'[[agent_endpoint]]\npath = "/agent"\npool = {a.pool}\n\n'
            f'[[agents]]\nsource = "{work / "fleet"}"\n\n'
            f'[[route]]\npath = "/agents/{{agent}}/{{service}}"\n'
            f'target = {{ agent = "{{agent}}", service = "{{service}}" }}\n')
        log = open(work / "server.log", "wb")
        server = start_server(a.binary, work / "server.toml", port, log)
        procs.append(server)
        rss0 = rss_kib(server.pid)
        cpu0 = cpu_s(server.pid)
        started = time.monotonic()
        fleet = run.spawn(
            [str(FLEET), "--server", f"{scheme}://localhost:{port}/agent", "--agents", str(a.agents),
             "--secret-file", str(work / "agent.secret"), "--service", f"app=127.0.0.1:{bport}", *ca,
             "--balancer-check", a.balancer_check],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(work / "fleet.log", "wb"))
        procs.append(fleet)
        lines = Lines(fleet.stdout)
        all_in = lines.wait_connected(a.agents, started, 120)
        connect_s = all_in - started
        connect_cpu = cpu_s(server.pid) - cpu0
        # The pools fill just after each agent's connected state: let them settle.
        time.sleep(2)
        rss1 = rss_kib(server.pid)
        cpu1 = cpu_s(server.pid)
        time.sleep(a.idle_seconds)
        idle_cpu = (cpu_s(server.pid) - cpu1) / a.idle_seconds
        res = subprocess.run([str(run.LOADGEN), "sessions", "--url", f"{scheme}://localhost:{port}/agents/shop-{a.agents // 2}/app",
                              "--concurrency", "20", "--msg-size", "64", "--seconds", "3",
                              *(["--ca", str(work / "cert.pem")] if a.tls else [])],
                             capture_output=True, text=True, timeout=60)
        sessions = run.loadgen_result(res.stdout)
        # A restart: the drain tells every agent; a new server on the same port.
        cpu2 = cpu_s(server.pid)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        if a.drain_delay:
            # The drain delay's CPU: the agents' tries to move, answered 503 (read before exit).
            time.sleep(a.drain_delay * 0.95)
            drain_cpu = cpu_s(server.pid) - cpu2
            drain_span = time.monotonic() - signalled
        server.wait(timeout=60 + a.drain_delay)
        drained = time.monotonic()
        server = start_server(a.binary, work / "server.toml", port, log)
        procs.append(server)
        restarted = time.monotonic()
        back = lines.wait_connected(a.agents, restarted, 120)
        print(json.dumps({
            "agents": a.agents,
            "pool": a.pool,
            "tls": a.tls,
            "connect_all_s": round(connect_s, 3),
            "connect_server_cpu_s": round(connect_cpu, 3),
            "server_rss_kib_before": rss0,
            "server_rss_kib_connected": rss1,
            "server_kib_per_agent": round((rss1 - rss0) / a.agents, 2),
            "balancer_check": a.balancer_check,
            "server_idle_cpu_percent": round(idle_cpu * 100, 2),
            "sessions_through_one_agent_per_s": sessions.get("rate"),
            "session_p50_us": sessions.get("p50_us"),
            **({"drain_delay_s": a.drain_delay,
                "server_cpu_percent_while_draining": round(drain_cpu / drain_span * 100, 2)} if a.drain_delay else {}),
            "restart_gap_s": round(restarted - drained, 3),
            "all_back_after_restart_s": round(back - restarted, 3),
        }, indent=1))
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if p.stdin:
                    try:
                        p.stdin.close()
                    except OSError:
                        pass
                run.stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
