"""Shared pieces for bench sections: pinned servers, h2load runs, /proc readings, percentiles, tables.

Method (see shared notes, "Physical ceiling"): server pinned with `taskset -c 0`, h2load with `taskset -c 1`;
p50/p99 from h2load's --log-file (third column, µs); server CPU from /proc/PID/stat utime+stime over
warm-up + run divided by the calls made in that time (rate × (duration + warm-up)); peak RSS is VmHWM.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_CPU = os.environ.get("BENCH_SERVER_CPU", "0")
CLIENT_CPU = os.environ.get("BENCH_CLIENT_CPU", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PinnedServer:
    """A server process pinned to SERVER_CPU (taskset execs, so the PID is the server's)."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, cwd: Path | None = None):
        self.name, self.port = name, port
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU] + argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd)
        wait_port(port, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def hwm_mib(self) -> float:
        return status_kib(self.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


@dataclass
class LoadResult:
    server: str
    shape: str
    rps: float
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    non2xx_in_log: int
    logged: int
    p50_ms: float
    p99_ms: float
    cpu_us_per_call: float
    raw: str = field(repr=False, default="")

    @property
    def clean(self) -> bool:
        return (self.failed == 0 and self.errored == 0 and self.timeout == 0 and self.done > 0
                and self.status_2xx == self.done and self.non2xx_in_log == 0 and self.logged > 0)


def percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return float(sorted_vals[k])


def _int(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else -1


def run_h2load(server: PinnedServer, url: str, body: Path, conns: int, streams: int, duration: int, warmup: int,
               workdir: Path, headers: list[str], shape: str) -> LoadResult:
    log = workdir / f"h2load-{server.name}-{shape}.log"
    args = ["taskset", "-c", CLIENT_CPU, "h2load", "-D", str(duration), f"--warm-up-time={warmup}", "-t", "1",
            "-c", str(conns), "-m", str(streams), "-d", str(body), f"--log-file={log}"]
    for h in headers:
        args += ["-H", h]
    args.append(url)
    cpu0 = server.cpu()
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + warmup + 60)
    cpu1 = server.cpu()
    text = out.stdout + out.stderr
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    rps = float(m.group(1)) if m else 0.0
    durations, non2xx = [], 0
    if log.exists():
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                if parts[1] != "200":
                    non2xx += 1
                durations.append(int(parts[2]))
        log.unlink()
    durations.sort()
    calls = rps * (duration + warmup)
    return LoadResult(
        server=server.name, shape=shape, rps=rps,
        done=_int(r"requests: \d+ total, \d+ started, (\d+) done", text),
        succeeded=_int(r"(\d+) succeeded", text), failed=_int(r"(\d+) failed", text),
        errored=_int(r"(\d+) errored", text), timeout=_int(r"(\d+) timeout", text),
        status_2xx=_int(r"status codes: (\d+) 2xx", text), non2xx_in_log=non2xx, logged=len(durations),
        p50_ms=percentile(durations, 0.50) / 1000, p99_ms=percentile(durations, 0.99) / 1000,
        cpu_us_per_call=(cpu1 - cpu0) * 1e6 / calls if calls else float("nan"), raw=text)


def median_result(results: list[LoadResult]) -> LoadResult:
    """The run with the median req/s (its latencies and CPU are reported with it)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else ordered[len(ordered) // 2]


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
