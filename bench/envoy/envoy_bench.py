#!/usr/bin/env python3
"""Bench (b): through Envoy 1.40 — Envoy→backend directly vs Envoy→EPP→backend.

Backend: a separate Envoy with a `direct_response` listener (a static OpenAI-style JSON body), so the
backend is never the bottleneck. Gateway Envoy (concurrency 1): listener G with the ext_proc filter
(FULL_DUPLEX_STREAMED, all phases, as in GIE) and listener D without it; both route through the same
ORIGINAL_DST cluster (D's clients name the backend in x-gateway-destination-endpoint, G's picker does).
Picker: release build pinned to CPU 0 (BENCH_SERVER_CPU); h2load (HTTP/1.1 keep-alive) on CPU 1.

Reports throughput, p50/p99 latency (h2load --log-file) at a fixed moderate rate and at saturation,
added p50/p99 of the EPP path, and EPP CPU µs per request.
Floors (moderate rate): EPP CPU ≤ 20 µs/request, added p50 ≤ 0.5 ms, added p99 ≤ 2 ms.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import extproc_benchlib as bl  # noqa: E402
from extproc_benchlib import stack  # noqa: E402

RATE = int(os.environ.get("BENCH_ENVOY_RATE", "500"))          # requests/s, moderate
CONNS = int(os.environ.get("BENCH_ENVOY_CONNS", "10"))
SAT_CONNS = int(os.environ.get("BENCH_ENVOY_SAT_CONNS", "32"))
FLOOR_CPU_US, FLOOR_P50_MS, FLOOR_P99_MS = 20.0, 0.5, 2.0


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

        # Sanity: both paths answer 200 and the EPP path restores the alias.
        import http.client
        for port, expect in ((direct_port, "facebook/opt-125m"), (gw_port, "opt-stable")):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("POST", "/v1/completions", body.read_bytes(), dict(h.split(": ", 1) for h in hdrs))
            r = c.getresponse()
            got = json.loads(r.read())
            assert r.status == 200 and got["model"] == expect, (port, r.status, got)
            c.close()

        def measure(port, rps=None, conns=CONNS):
            out = []
            for _ in range(bl.ROUNDS):
                n = None
                cpu0 = epp.cpu_seconds()
                r = bl.h2load(f"http://127.0.0.1:{port}/v1/completions", duration=bl.DURATION, warmup=bl.WARMUP,
                              clients=conns, streams=1, data=body, headers=hdrs, h1=True,
                              rps=(rps / conns) if rps else None)
                cpu = epp.cpu_seconds() - cpu0
                reqs = r.rps * (bl.DURATION + bl.WARMUP)
                out.append((r, cpu * 1e6 / max(reqs, 1)))
            out.sort(key=lambda x: x[0].p(0.5))
            return out[len(out) // 2]

        rows = []
        res = {}
        for label, rps, conns in (("moderate", RATE, CONNS), ("saturation", None, SAT_CONNS)):
            for path, port in (("direct", direct_port), ("via EPP", gw_port)):
                r, us = measure(port, rps, conns)
                res[(label, path)] = (r, us)
                rows.append([label + (f" {RATE}/s" if rps else f" c={conns}"), path, f"{r.rps:,.0f}",
                             f"{r.p(0.5):.3f}", f"{r.p(0.99):.3f}", f"{us:.1f}" if path == "via EPP" else "-",
                             "yes" if r.clean else f"NO ({r.total - r.ok} bad)"])
        print(bl.machine_note())
        print(f"\n(b) HTTP/1.1 through Envoy 1.40 (concurrency 1), backend = direct_response Envoy; median of "
              f"{bl.ROUNDS} × {bl.DURATION}s + {bl.WARMUP}s warm-up")
        print(bl.table(["load", "path", "req/s", "p50 ms", "p99 ms", "EPP CPU µs/req", "all 2xx"], rows))
        (d, _), (e, us) = res[("moderate", "direct")], res[("moderate", "via EPP")]
        add50, add99 = e.p(0.5) - d.p(0.5), e.p(0.99) - d.p(0.99)
        (sd, _), (se, sus) = res[("saturation", "direct")], res[("saturation", "via EPP")]
        print(f"moderate {RATE}/s: added p50 {add50:.3f} ms (floor ≤ {FLOOR_P50_MS}) → {bl.verdict(add50 <= FLOOR_P50_MS)}; "
              f"added p99 {add99:.3f} ms (floor ≤ {FLOOR_P99_MS}) → {bl.verdict(add99 <= FLOOR_P99_MS)}; "
              f"EPP CPU {us:.1f} µs/req (floor ≤ {FLOOR_CPU_US}) → {bl.verdict(us <= FLOOR_CPU_US)}")
        print(f"saturation: via EPP {se.rps:,.0f} req/s vs direct {sd.rps:,.0f} req/s (ratio {se.rps / max(sd.rps, 1):.2f}); "
              f"EPP CPU {sus:.1f} µs/req; p50 {se.p(0.5):.2f} vs {sd.p(0.5):.2f} ms")
        ok = add50 <= FLOOR_P50_MS and add99 <= FLOOR_P99_MS and us <= FLOOR_CPU_US
        return 0 if ok or not bl.ENFORCE else 1
    finally:
        st.stop()


if __name__ == "__main__":
    sys.exit(main())
