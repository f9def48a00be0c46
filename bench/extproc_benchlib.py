"""Shared helpers for the ext_proc / Envoy / TTFB bench sections (bench/extproc, bench/envoy, bench/ttfb).

Processes come from demo/stack.py. The picker is the release build: $EPP_BINARY (bench/run exports it),
else .build/release/epp. Load runs with h2load pinned to CPU 1 (BENCH_CLIENT_CPU), the picker to CPU 0
(BENCH_SERVER_CPU). Every run is bounded (h2load -n / -D, socket timeouts).
"""
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "demo"))
sys.path.insert(0, str(REPO / "Tests" / "Integration" / "extproc"))
import stack  # noqa: E402

SERVER_CPU = os.environ.get("BENCH_SERVER_CPU", "0")
CLIENT_CPU = os.environ.get("BENCH_CLIENT_CPU", "1")
DURATION = int(os.environ.get("BENCH_DURATION", "8"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ENFORCE = os.environ.get("BENCH_ENFORCE_FLOOR") == "1"

if os.environ.get("EPP_BINARY") and not os.environ.get("EPP_RELEASE_BIN"):
    os.environ["EPP_RELEASE_BIN"] = os.environ["EPP_BINARY"]


def grpc_frame(msg):
    data = msg.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def parse_grpc_frames(data):
    out, i = [], 0
    while i + 5 <= len(data):
        n = struct.unpack(">I", data[i + 1:i + 5])[0]
        out.append(data[i + 5:i + 5 + n])
        i += 5 + n
    return out


def percentile(vals, q):
    if not vals:
        return float("nan")
    vals = sorted(vals)
    k = (len(vals) - 1) * q
    f = int(k)
    c = min(f + 1, len(vals) - 1)
    return vals[f] + (vals[c] - vals[f]) * (k - f)


class H2loadResult:
    def __init__(self, text, log_path, elapsed):
        self.text = text
        self.elapsed = elapsed
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                      text)
        self.total, self.started, self.done, self.ok, self.failed, self.errored = map(int, m.groups()) if m else (0,) * 6
        m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
        self.s2xx, _, self.s4xx, self.s5xx = map(int, m.groups()) if m else (0,) * 4
        m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
        self.rps = float(m.group(3)) if m else 0.0
        self.latencies_us = []
        if log_path and os.path.exists(log_path):
            with open(log_path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1].startswith("2"):
                        self.latencies_us.append(int(parts[2]))
            os.unlink(log_path)

    @property
    def clean(self):
        return self.total > 0 and self.ok == self.total and self.s2xx == self.total

    def p(self, q):
        return percentile(self.latencies_us, q) / 1000.0  # ms


def h2load(url, n=None, duration=None, warmup=None, clients=1, streams=1, data=None, headers=(), h1=False,
           rps=None, threads=1, cpu=CLIENT_CPU, log=True, timeout=300):
    log_path = f"/tmp/h2load-{os.getpid()}-{time.monotonic_ns()}.log" if log else None
    args = ["taskset", "-c", str(cpu), "h2load", url, "-c", str(clients), "-m", str(streams), "-t", str(threads)]
    if n is not None:
        args += ["-n", str(n)]
    if duration is not None:
        args += ["-D", str(duration)]
        if warmup:
            args += ["--warm-up-time", str(warmup)]
    if data:
        args += ["-d", str(data)]
    for h in headers:
        args += ["-H", h]
    if h1:
        args += ["--h1"]
    if rps:
        args += ["--rps", str(rps)]
    if log_path:
        args += ["--log-file", log_path]
    t0 = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return H2loadResult(out.stdout + out.stderr, log_path, time.monotonic() - t0)


def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def verdict(ok):
    return "PASS" if ok else "FAIL"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine_note():
    """One line on how busy the machine is: latency figures mean little when other work competes."""
    load1, _, _ = os.getloadavg()
    ncpu = os.cpu_count() or 1
    note = f"machine: {ncpu} CPUs, load average {load1:.1f}"
    if load1 > 0.5 * ncpu:
        note += " — BUSY: other processes compete for the pinned cores; throughput and latency are understated, CPU µs per request is the robust figure"
    return note


def wakeups(pid):
    """Voluntary context switches of all threads of pid: each is one sleep → wake-up of a thread."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def open_loop(port, body, headers, rate, duration=None, warmup=1.0, conns=16, cpu=CLIENT_CPU):
    """Runs bench/lib/open_loop_http.py pinned to the client CPU; returns its JSON summary (latencies in ms)."""
    import json
    args = ["taskset", "-c", str(cpu), sys.executable, str(BENCH / "lib" / "open_loop_http.py"), "--port", str(port),
            "--body", str(body), "--rate", str(rate), "--duration", str(duration or DURATION), "--warmup", str(warmup),
            "--conns", str(conns)]
    for h in headers:
        args += ["--header", h]
    out = subprocess.run(args, capture_output=True, text=True, timeout=(duration or DURATION) + warmup + 60)
    if out.returncode != 0:
        raise RuntimeError(f"open_loop_http failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)
