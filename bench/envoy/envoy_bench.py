#!/usr/bin/env python3
"""Bench (b): through Envoy 1.40 — Envoy→backend directly vs Envoy→EPP→backend.

Backend: a separate Envoy with a `direct_response` listener (a static OpenAI-style JSON body), so the
backend is never the bottleneck. Gateway Envoy (concurrency 1): listener G with the ext_proc filter
(FULL_DUPLEX_STREAMED, all phases, as in GIE) and listener D without it; both route through the same
ORIGINAL_DST cluster (D's clients name the backend in x-gateway-destination-endpoint, G's picker does).
Picker: release build pinned to CPU 0 (BENCH_SERVER_CPU); h2load (HTTP/1.1 keep-alive) on CPU 1.

Moderate rate: an open-loop generator (bench/lib/open_loop_http.py) sends requests evenly spaced at
BENCH_ENVOY_RATE/s and times each from write to last byte; h2load --rps is not used there, as it releases
requests on a coarse timer and its latencies spread over ~0-10 ms whatever the server does. Saturation:
h2load closed loop. Reports throughput, p50/p90/p99, added p50/p99 of the EPP path, EPP CPU µs and
wake-ups per request, the EPP path at a few other rates (BENCH_ENVOY_SWEEP), and, as references for this
machine: a third path through the same gateway config to null_extproc.c, a C ext_proc server that does
only what Envoy needs to go on (what it costs is the floor any server has here); the gateway Envoy's own
CPU per request on each path (what its ext_proc filter costs Envoy); the CPU per isolated request of
nghttpd and of the EPP's health Check at the same rate.
Floors (moderate rate): EPP CPU ≤ 20 µs/request, added p50 ≤ 0.5 ms, added p99 ≤ 2 ms.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import extproc_benchlib as bl  # noqa: E402
from extproc_benchlib import stack  # noqa: E402

RATE = int(os.environ.get("BENCH_ENVOY_RATE", "500"))          # requests/s, moderate
CONNS = int(os.environ.get("BENCH_ENVOY_CONNS", "16"))   # open-loop connection pool
SAT_CONNS = int(os.environ.get("BENCH_ENVOY_SAT_CONNS", "32"))
SWEEP_RATES = [int(x) for x in os.environ.get("BENCH_ENVOY_SWEEP", "250,1000").split(",") if x]
FLOOR_CPU_US, FLOOR_P50_MS, FLOOR_P99_MS = 20.0, 0.5, 2.0


def build_null_extproc():
    """Compiles null_extproc.c (cc or the Swift toolchain's clang, against the system libnghttp2)."""
    out = Path(tempfile.mkdtemp(prefix="bench-null-extproc-")) / "null_extproc"
    src = Path(__file__).resolve().parent / "null_extproc.c"
    compiler = shutil.which("cc") or shutil.which("clang") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("bench (b) needs a C compiler for null_extproc.c")
    subprocess.run([compiler, "-O2", "-o", str(out), str(src), "-lnghttp2"], check=True)
    return out


def moderate_row(load, path, runs, p50, p90, p99, us, wk, gwus):
    clean = all(r["clean"] for r in runs)
    late = max(r["late_ms"] for r in runs)
    return [load, path, f"{bl.median([r['rps'] for r in runs]):,.0f}", f"{p50:.3f}", f"{p90:.3f}", f"{p99:.3f}",
            "-" if us is None else f"{us:.1f}", "-" if wk is None else f"{wk:.1f}", f"{gwus:.0f}",
            ("yes" if clean else "NO") + (f" (sender late ≤{late:.1f} ms)" if late > 2 else "")]


def main():
    st = stack.Stack()
    try:
        backend_port = stack.free_port()
        backend = st.envoy(backend_port=backend_port, concurrency=1, access_log=False, name="backend-envoy")
        backend_addr = f"127.0.0.1:{backend_port}"
        epp = st.epp([backend_addr], config_dir=stack.DEMO / "config", configuration="release", cpu=bl.SERVER_CPU,
                     log_level="warning")
        gw_port, direct_port = stack.free_port(), stack.free_port()
        gw = st.envoy(epp_port=epp.grpc_port, port=gw_port, direct_port=direct_port, concurrency=1,
                      access_log=False, name="gateway-envoy")
        body = Path(tempfile.mkdtemp(prefix="bench-envoy-")) / "req.json"
        body.write_bytes(json.dumps({"model": "opt-stable", "prompt": "Say hello to the benchmark.",
                                     "max_tokens": 5}).encode())
        hdrs = ["content-type: application/json", f"x-gateway-destination-endpoint: {backend_addr}"]
        # The floor reference: the same gateway config in front of null_extproc.c, a C ext_proc server that
        # does only what Envoy needs to go on, pinned to the picker's core.
        null_port, null_gw_port = stack.free_port(), stack.free_port()
        null = st.add(stack.Proc("null-extproc", [build_null_extproc(), null_port, backend_addr], st.logdir,
                                 cpu=bl.SERVER_CPU))
        stack.wait_tcp("127.0.0.1", null_port, proc=null)
        null_gw = st.envoy(epp_port=null_port, port=null_gw_port, direct_port=stack.free_port(), concurrency=1,
                           access_log=False, name="gateway-envoy-null")
        paths = {"direct": (direct_port, None, gw), "via EPP": (gw_port, epp, gw),
                 "via null ext_proc": (null_gw_port, null, null_gw)}

        # Sanity: every path answers 200 and the EPP path restores the alias.
        import http.client
        for port, expect in ((direct_port, "facebook/opt-125m"), (gw_port, "opt-stable"),
                             (null_gw_port, "facebook/opt-125m")):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("POST", "/v1/completions", body.read_bytes(), dict(h.split(": ", 1) for h in hdrs))
            r = c.getresponse()
            got = json.loads(r.read())
            assert r.status == 200 and got["model"] == expect, (port, r.status, got)
            c.close()

        def isolated_reference():
            """CPU and wake-ups per request when every request arrives on its own wake-up, at RATE on the
            picker's core: nghttpd (C) serving a 7-byte file and the EPP answering a gRPC health Check.
            On a VM this per-wake-up cost (scheduler, loopback TCP, idle exit) dominates at moderate rates."""
            work = Path(tempfile.mkdtemp(prefix="bench-envoy-ref-"))
            (work / "htdocs" / "ref").mkdir(parents=True)
            (work / "htdocs" / "ref" / "Check").write_bytes(b"\x00\x00\x00\x00\x02\x08\x01")
            (work / "check.bin").write_bytes(b"\x00" * 5)
            port = stack.free_port()
            ngd = st.add(stack.Proc("nghttpd", ["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", work / "htdocs", port],
                                    st.logdir, cpu=bl.SERVER_CPU))
            stack.wait_tcp("127.0.0.1", port, proc=ngd)
            out = {}
            for name, proc, url in (("nghttpd (C), static file", ngd, f"http://127.0.0.1:{port}/ref/Check"),
                                    ("EPP, gRPC health Check", epp,
                                     f"http://127.0.0.1:{epp.grpc_port}/grpc.health.v1.Health/Check")):
                cpu0, w0 = proc.cpu_seconds(), bl.wakeups(proc.pid)
                r = bl.h2load(url, duration=bl.DURATION, clients=1, streams=1, data=work / "check.bin",
                              headers=["content-type: application/grpc", "te: trailers"], rps=RATE, log=False)
                n = max(r.done, 1)
                out[name] = ((proc.cpu_seconds() - cpu0) * 1e6 / n, (bl.wakeups(proc.pid) - w0) / n, r.clean)
            ngd.stop()
            return out

        def moderate(path, rate=RATE):
            """One open-loop round: (summary, server CPU µs/req, server wake-ups/req, gateway Envoy CPU µs/req);
            the server figures are None on the direct path."""
            port, server, gateway = paths[path]
            cpu0, w0 = (server.cpu_seconds(), bl.wakeups(server.pid)) if server else (0, 0)
            g0 = gateway.cpu_seconds()
            r = bl.open_loop(port, body, hdrs, rate, conns=CONNS)
            n = max(r["completed_total"], 1)
            if not server:
                return r, None, None, (gateway.cpu_seconds() - g0) * 1e6 / n
            return (r, (server.cpu_seconds() - cpu0) * 1e6 / n, (bl.wakeups(server.pid) - w0) / n,
                    (gateway.cpu_seconds() - g0) * 1e6 / n)

        def saturation(port):
            out = []
            for _ in range(bl.ROUNDS):
                cpu0 = epp.cpu_seconds()
                r = bl.h2load(f"http://127.0.0.1:{port}/v1/completions", duration=bl.DURATION, warmup=bl.WARMUP,
                              clients=SAT_CONNS, streams=1, data=body, headers=hdrs, h1=True, log=False)
                cpu = epp.cpu_seconds() - cpu0
                out.append((r, cpu * 1e6 / max(r.rps * (bl.DURATION + bl.WARMUP), 1)))
            out.sort(key=lambda x: x[0].rps)
            return out[len(out) // 2]

        ref = isolated_reference()
        mod = {path: [] for path in paths}
        for _ in range(bl.ROUNDS):  # interleaved, so drifting machine load hits every path alike
            for path in paths:
                mod[path].append(moderate(path))
        # How the EPP's cost per request moves with the rate: at low rates every message is its own wake-up.
        sweep = [(rate, moderate("via EPP", rate)) for rate in SWEEP_RATES]
        sat = {path: saturation(port) for path, port in (("direct", direct_port), ("via EPP", gw_port))}

        med = lambda xs: bl.median(xs)
        rows = []
        summary = {}
        for path, runs in mod.items():
            p50, p90, p99 = (med([x[0][k] for x in runs]) for k in ("p50", "p90", "p99"))
            served = path != "direct"
            us, wk = (med([x[i] for x in runs]) for i in (1, 2)) if served else (None, None)
            gwus = med([x[3] for x in runs])
            summary[path] = (p50, p99, us, wk, gwus)
            rows.append(moderate_row(f"moderate {RATE}/s", path, [x[0] for x in runs], p50, p90, p99, us, wk, gwus))
        for rate, (r, us, wk, gwus) in sweep:
            rows.append(moderate_row(f"open loop {rate}/s", "via EPP", [r], r["p50"], r["p90"], r["p99"], us, wk, gwus))
        for path, (r, us) in sat.items():
            rows.append([f"saturation c={SAT_CONNS}", path, f"{r.rps:,.0f}", "-", "-", "-",
                         f"{us:.1f}" if path == "via EPP" else "-", "-", "-",
                         "yes" if r.clean else f"NO ({r.total - r.ok} bad)"])
        print(bl.machine_note())
        print(f"\n(b) HTTP/1.1 through Envoy 1.40 (concurrency 1), backend = direct_response Envoy. Moderate: open-loop, "
              f"requests evenly spaced at {RATE}/s over {CONNS} keep-alive connections, latency from write to last "
              f"byte, median of {bl.ROUNDS} interleaved rounds × {bl.DURATION}s; saturation: h2load closed loop.")
        print(bl.table(["load", "path", "req/s", "p50 ms", "p90 ms", "p99 ms", "ext_proc CPU µs/req", "wake-ups/req",
                        "gateway Envoy CPU µs/req", "all 2xx"], rows))
        print(f"\nper-wake-up reference on the picker's core, one request per wake-up at {RATE}/s (h2load, 1 connection):")
        print(bl.table(["server", "CPU µs/request", "wake-ups/request", "all OK"],
                       [[k, f"{u:.1f}", f"{w:.2f}", "yes" if c else "NO"] for k, (u, w, c) in ref.items()]))
        (d50, d99, _, _, gw_direct), (e50, e99, us, wk, gw_epp) = summary["direct"], summary["via EPP"]
        n50, n99, nus, nwk, _ = summary["via null ext_proc"]
        add50, add99 = e50 - d50, e99 - d99
        c_ref = next(iter(ref.values()))[0]
        print(f"\nmoderate {RATE}/s: added p50 {add50:.3f} ms (floor ≤ {FLOOR_P50_MS}) → {bl.verdict(add50 <= FLOOR_P50_MS)}; "
              f"added p99 {add99:.3f} ms (floor ≤ {FLOOR_P99_MS}) → {bl.verdict(add99 <= FLOOR_P99_MS)}; "
              f"EPP CPU {us:.1f} µs/req (floor ≤ {FLOOR_CPU_US}) → {bl.verdict(us <= FLOOR_CPU_US)}: "
              f"{wk:.1f} wake-ups/request × nghttpd's {c_ref:.1f} µs per isolated wake-up = {wk * c_ref:.0f} µs "
              f"would be a C server's cost for the same message pattern here")
        within = lambda ok: "within the floor" if ok else "above the floor: out of reach here for any ext_proc server"
        print(f"null ext_proc (C, the least any server can do) on this machine: CPU {nus:.1f} µs/req at {nwk:.1f} "
              f"wake-ups ({within(nus <= FLOOR_CPU_US)}), added p50 {n50 - d50:.3f} ms "
              f"({within(n50 - d50 <= FLOOR_P50_MS)}), added p99 {n99 - d99:.3f} ms ({within(n99 - d99 <= FLOOR_P99_MS)}); "
              f"the EPP over it: {us - nus:+.1f} µs CPU, {e50 - n50:+.3f} ms p50, {e99 - n99:+.3f} ms p99")
        print(f"gateway Envoy: {gw_direct:.0f} µs CPU per request direct, {gw_epp:.0f} via EPP — its ext_proc filter "
              f"alone costs Envoy {gw_epp - gw_direct:.0f} µs per request on this machine, against the EPP's {us:.0f}; "
              f"most of it lies on the request path, so it is part of the added latency whatever the server")
        (sd, _), (se, sus) = sat["direct"], sat["via EPP"]
        print(f"saturation: via EPP {se.rps:,.0f} req/s vs direct {sd.rps:,.0f} req/s (ratio {se.rps / max(sd.rps, 1):.2f}); "
              f"EPP CPU {sus:.1f} µs/req")
        ok = add50 <= FLOOR_P50_MS and add99 <= FLOOR_P99_MS and us <= FLOOR_CPU_US
        return 0 if ok or not bl.ENFORCE else 1
    finally:
        st.stop()


if __name__ == "__main__":
    sys.exit(main())
