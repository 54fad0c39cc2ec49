#!/usr/bin/env python3
"""Per-stream backpressure isolation through h2relay.

    python3 iso.py [--seconds 12] [-- extra h2relay args]

The app (a Python TCP server here) never reads its FIRST connection (the stalled session) and
echoes every later one. Session A: `loadgen throughput --dir up` pushes 64 KiB messages as fast as
it can into the stalled session. Once A is stalled, session B: `loadgen echo --sessions 1` runs
through the same h2 connection. Every 0.5 s: VmRSS of the h2relay server and agent, and how many
bytes the app's stalled connection has in its kernel receive queue (it reads none).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import run  # noqa: E402

H2RELAY = str(Path(__file__).resolve().parent / "target" / "release" / "h2relay")
LOADGEN = str(run.LOADGEN)


def rss_kib(pid: int) -> int:
    return run._status_kib(pid, "VmRSS")


def app_server(ls: socket.socket, accepted: list, stop: threading.Event):
    def echo(c):
        try:
            while (d := c.recv(65536)):
                c.sendall(d)
        except OSError:
            pass
        c.close()
    while not stop.is_set():
        try:
            c, _ = ls.accept()
        except OSError:
            return
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted.append(c)
        if len(accepted) > 1:  # the first one is never read
            threading.Thread(target=echo, args=(c,), daemon=True).start()


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    seconds = 12.0
    if "--seconds" in argv:
        seconds = float(argv[argv.index("--seconds") + 1])
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    aport = ls.getsockname()[1]
    accepted: list = []
    stop = threading.Event()
    threading.Thread(target=app_server, args=(ls, accepted, stop), daemon=True).start()
    port, lport = run.free_port(), run.free_port()
    procs = []
    try:
        server = run.spawn([H2RELAY, "server", "--listen", f"127.0.0.1:{port}",
                            "--agent-listen", f"127.0.0.1:{lport}", *extra])
        procs.append(server)
        run.wait_listening(lport, server)
        agent = run.spawn([H2RELAY, "agent", "--server", f"127.0.0.1:{lport}",
                           "--app", f"127.0.0.1:{aport}", *extra])
        procs.append(agent)
        time.sleep(0.3)
        base = {"server": rss_kib(server.pid), "agent": rss_kib(agent.pid)}
        print(f"baseline RSS KiB: {base}")
        a = run.spawn([LOADGEN, "throughput", "--url", f"ws://127.0.0.1:{port}/", "--dir", "up",
                       "--seconds", str(seconds), "--warmup", "0"], stdout=subprocess.PIPE)
        procs.append(a)
        while not accepted:
            time.sleep(0.01)
        stalled = accepted[0]
        t0 = time.monotonic()
        b = None
        samples = []
        while a.poll() is None and time.monotonic() - t0 < seconds + 5:
            t = time.monotonic() - t0
            if b is None and t > 3:
                b = run.spawn([LOADGEN, "echo", "--url", f"ws://127.0.0.1:{port}/", "--sessions", "1",
                               "--seconds", "4", "--warmup", "0"], stdout=subprocess.PIPE)
                procs.append(b)
                print(f"t={t:4.1f}s session B (echo, 1 session) started")
            # bytes queued, unread, in the stalled app socket's receive queue
            import fcntl, termios, struct  # noqa: E401
            queued = struct.unpack("i", fcntl.ioctl(stalled.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
            s = {"t": round(t, 1), "server_rss_kib": rss_kib(server.pid), "agent_rss_kib": rss_kib(agent.pid),
                 "app_unread_kib": queued // 1024}
            samples.append(s)
            print(s, flush=True)
            time.sleep(0.5)
        for name, p in (("A (stalled, throughput up)", a), ("B (echo)", b)):
            if p is None:
                continue
            try:
                out, _ = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                run.stop(p)
                out = p.stdout.read() if p.stdout else ""
            res = [json.loads(l) for l in (out or "").splitlines() if l.startswith("{") and '"result"' in l]
            print(f"session {name}: {res[-1] if res else 'no result'}")
        print(f"peak RSS KiB: server {max(s['server_rss_kib'] for s in samples)}, "
              f"agent {max(s['agent_rss_kib'] for s in samples)} (baseline {base})")
        return 0
    finally:
        stop.set()
        for p in reversed(procs):
            run.stop(p)
        ls.close()
        for c in accepted:
            c.close()


if __name__ == "__main__":
    sys.exit(main())
