"""bench grpc: unary grpc.health.v1.Health/Check throughput/latency, epp (h2c, release) against nghttpd serving a
small static file at the same path, both pinned to one core, h2load on the other, same run, two shapes.

Before the load each server is checked once (epp: grpcio Check → SERVING with status OK, and nghttp sees
`grpc-status: 0`); during the load every h2load request must be HTTP 200 with zero failures/errors; after the
load epp is checked again. Any verification failure exits 1. The floor (epp ≥ 0.6 × nghttpd at 10×100) is
printed; it fails the command only with BENCH_ENFORCE_FLOOR=1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from benchlib import (PinnedServer, fmt_int, free_port, median, median_result, run_h2load,  # noqa: E402
                      table)

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DURATION = int(os.environ.get("BENCH_DURATION", "8"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "2"))
FLOOR = 0.6
SHAPES = [("10x100", 10, 100), ("1x1", 1, 1)]
PATH = "/grpc.health.v1.Health/Check"
HEADERS = ["content-type: application/grpc", "te: trailers"]
# HealthCheckRequest{service: ""} is the empty message: a 5-byte gRPC frame
REQUEST_FRAME = b"\x00\x00\x00\x00\x00"
# HealthCheckResponse{status: SERVING}: what nghttpd serves as its static file, so both answer the same bytes
SERVING_FRAME = b"\x00\x00\x00\x00\x02\x08\x01"


def fail(msg: str) -> None:
    print(f"bench grpc: VERIFICATION FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def verify_epp(port: int, body: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = health_pb2_grpc.HealthStub(ch).Check.with_call(health_pb2.HealthCheckRequest(service=""), timeout=5)
        resp, rpc = call
        if rpc.code() != grpc.StatusCode.OK or resp.status != health_pb2.HealthCheckResponse.SERVING:
            fail(f"grpcio Check: {rpc.code()} {resp}")
    out = subprocess.run(["nghttp", "-v", "-t", "10", "-d", str(body)] + sum((["-H", h] for h in HEADERS), []) +
                         [f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not re.search(r"grpc-status: 0\b", out.stdout):
        fail(f"nghttp did not see grpc-status: 0 (exit {out.returncode})\n{out.stdout[-2000:]}")


def verify_nghttpd(port: int, body: Path) -> None:
    out = subprocess.run(["nghttp", "-t", "10", "-d", str(body)] + sum((["-H", h] for h in HEADERS), []) +
                         [f"http://127.0.0.1:{port}{PATH}"], capture_output=True, timeout=30)
    if out.returncode != 0 or out.stdout != SERVING_FRAME:
        fail(f"nghttpd static file: exit {out.returncode}, body {out.stdout[:50]!r}")


def main() -> int:
    epp_bin = os.environ.get("EPP_BINARY")
    if not epp_bin or not os.access(epp_bin, os.X_OK):
        fail(f"EPP_BINARY not set or not executable ({epp_bin}); run via bench/run")
    work = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    body = work / "check.bin"
    body.write_bytes(REQUEST_FRAME)
    htdocs = work / "htdocs"
    (htdocs / PATH.strip("/").rsplit("/", 1)[0]).mkdir(parents=True)
    (htdocs / PATH.strip("/")).write_bytes(SERVING_FRAME)

    ep, hp, mp, np_ = free_port(), free_port(), free_port(), free_port()
    epp = PinnedServer("epp", [epp_bin, "--secure-serving=false", "--bind-address", "127.0.0.1",
                               "--grpc-port", str(ep), "--grpc-health-port", str(hp), "--metrics-port", str(mp),
                               "--log-level", "warning", "--drain-timeout", "1",
                               "--endpoints", "127.0.0.2:8000"], ep, work / "epp.log")
    ngd = PinnedServer("nghttpd", ["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", str(htdocs), str(np_)], np_,
                       work / "nghttpd.log")
    servers = {"epp": epp, "nghttpd": ngd}
    results: dict[tuple[str, str], list] = {}
    t_start = time.monotonic()
    try:
        verify_epp(ep, body)
        verify_nghttpd(np_, body)
        print(f"# epp {epp_bin} (pid {epp.pid}) and nghttpd (pid {ngd.pid}) on cpu {os.environ.get('BENCH_SERVER_CPU', '0')},"
              f" h2load on cpu {os.environ.get('BENCH_CLIENT_CPU', '1')}; {ROUNDS} rounds x {DURATION}s"
              f" (+{WARMUP}s warm-up); request: Check(service=\"\") 5-byte frame", flush=True)
        load1 = os.getloadavg()[0]
        if load1 > 1.0:
            print(f"# WARNING: load average {load1:.1f} before the run: other processes share the cores, "
                  f"figures will be low and noisy", flush=True)
        for rnd in range(ROUNDS):
            for shape, c, m in SHAPES:
                for name, srv in servers.items():
                    r = run_h2load(srv, f"http://127.0.0.1:{srv.port}{PATH}", body, c, m, DURATION, WARMUP, work,
                                   HEADERS, shape)
                    results.setdefault((name, shape), []).append(r)
                    print(f"  round {rnd + 1} {shape:>6} {name:>7}: {fmt_int(r.rps):>9} req/s  p50 {r.p50_ms:.2f} ms"
                          f"  p99 {r.p99_ms:.2f} ms  cpu {r.cpu_us_per_call:.1f} us/call"
                          f"{'' if r.clean else '  <-- NOT CLEAN'}", flush=True)
                    if not r.clean:
                        fail(f"{name} {shape}: done={r.done} succeeded={r.succeeded} failed={r.failed} "
                             f"errored={r.errored} timeout={r.timeout} 2xx={r.status_2xx} "
                             f"non-200 in log={r.non2xx_in_log}\n{r.raw[-1500:]}")
                    if srv.proc.poll() is not None:
                        fail(f"{name} exited during the load ({srv.proc.returncode})")
        verify_epp(ep, body)
        hwm = {name: srv.hwm_mib() for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()

    rows = []
    cpu = {k: median([r.cpu_us_per_call for r in v]) for k, v in results.items()}
    for shape, _, _ in SHAPES:
        for name in servers:
            rs = results[(name, shape)]
            med = median_result(rs)
            rows.append([shape, name, fmt_int(med.rps), " / ".join(fmt_int(r.rps) for r in rs),
                         f"{med.p50_ms:.2f}", f"{med.p99_ms:.2f}", f"{cpu[(name, shape)]:.1f}",
                         fmt_int(1e6 / cpu[(name, shape)]) if cpu[(name, shape)] > 0 else "-",
                         f"{hwm[name]:.1f}"])
        e, n = median_result(results[("epp", shape)]), median_result(results[("nghttpd", shape)])
        ce, cn = cpu[("epp", shape)], cpu[("nghttpd", shape)]
        rows.append([shape, "epp/nghttpd", f"{e.rps / n.rps:.2f}x", "", f"{e.p50_ms / n.p50_ms:.2f}x",
                     f"{e.p99_ms / n.p99_ms:.2f}x", f"{ce / cn:.2f}x", f"{cn / ce:.2f}x",
                     f"{hwm['epp'] / hwm['nghttpd']:.2f}x"])
    print()
    print(table(["shape", "server", "req/s (median)", "runs", "p50 ms", "p99 ms", "server CPU us/call",
                 "1-core ceiling req/s (1/CPU)", "peak RSS MiB"], rows))
    ratio = median_result(results[("epp", "10x100")]).rps / median_result(results[("nghttpd", "10x100")]).rps
    ok = ratio >= FLOOR
    cpu_ratio = cpu[("nghttpd", "10x100")] / cpu[("epp", "10x100")]
    print(f"\nfloor: epp >= {FLOOR} x nghttpd req/s at 10x100: {'PASS' if ok else 'BELOW FLOOR'} ({ratio:.2f}x; "
          f"by server CPU per call {cpu_ratio:.2f}x, the steadier figure on a shared machine)")
    print(f"all h2load runs: HTTP 200 only, 0 failed/errored; grpc-status 0 checked before and after the load; "
          f"{time.monotonic() - t_start:.0f}s")
    if not ok and os.environ.get("BENCH_ENFORCE_FLOOR") == "1":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
