#!/usr/bin/env python3
"""Bench (c): time to first byte of a `stream: true` completion with a 220 KB prompt, through Envoy 1.40
with the EPP (ext_proc FULL_DUPLEX_STREAMED) and without it (same Envoy, listener without the filter).

Backend: the fake vLLM (demo/fake_vllm.py) in streaming mode: it reads the whole body, then sends the
first SSE event at once. TTFB = request start → first SSE `data:` bytes at the client (HTTP/1.1,
fresh keep-alive connection per path, alternating paths). Floor: the EPP adds ≤ 5 ms (median).
Two bodies: `model` first (the picker routes on the first chunk and streams the rest through) and
`model` last, as the OpenAI Python SDK orders a chat request (`messages` before `model`): the picker
must hold the whole prompt until the model arrives, then send it on.
The reference EPP adds 150 ms or more here (GIE #2928).
"""
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import extproc_benchlib as bl  # noqa: E402
from extproc_benchlib import stack  # noqa: E402

ITER = int(os.environ.get("BENCH_TTFB_ITER", "40"))
PROMPT = int(os.environ.get("BENCH_TTFB_PROMPT", str(220 * 1000)))
BUFFER = int(os.environ.get("BENCH_TTFB_ENVOY_BUFFER", "32768"))  # per_connection_buffer_limit_bytes (GIE: 32 KiB)
FLOOR_MS = 5.0


def one(port, body, headers, sock_holder):
    if sock_holder.get(port) is None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock_holder[port] = s
    s = sock_holder[port]
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-fake-chunk-delay-ms: 0\r\n{headers}\r\n").encode()
    t0 = time.perf_counter()
    s.sendall(head + body)
    buf = b""
    ttfb = None
    deadline = time.monotonic() + 10
    # Read the first event, then the rest of the chunked response (until the terminating chunk).
    while time.monotonic() < deadline:
        piece = s.recv(65536)
        if not piece:
            raise RuntimeError("connection closed")
        buf += piece
        if ttfb is None and b"data: " in buf:
            ttfb = (time.perf_counter() - t0) * 1000
        if buf.endswith(b"\r\n0\r\n\r\n"):
            break
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
    return ttfb, buf


def run_case(st, epp, backend, buffer, body):
    gw_port, direct_port = stack.free_port(), stack.free_port()
    st.envoy(epp_port=epp.grpc_port, port=gw_port, direct_port=direct_port, concurrency=1, access_log=False,
             name=f"gateway-envoy-{buffer}", buffer_limit=buffer)
    hdr = f"x-gateway-destination-endpoint: {backend.address}\r\n"
    socks = {}
    res = {"direct": [], "via EPP": []}
    for i in range(ITER + 3):
        order = (("direct", direct_port), ("via EPP", gw_port)) if i % 2 else (("via EPP", gw_port), ("direct", direct_port))
        for name, port in order:
            t, buf = one(port, body, hdr, socks)
            if name == "via EPP":
                assert b'"model": "opt-stable"' in buf and b"x-gateway-target-model" in buf.lower()
            if i >= 3:
                res[name].append(t)
    for s in socks.values():
        s.close()
    return res


def main():
    st = stack.Stack()
    try:
        bport = stack.free_port("127.0.0.2")
        backend = st.fake_vllm("127.0.0.2", bport, chunk_delay_ms=0)
        epp = st.epp([backend.address], config_dir=stack.DEMO / "config", configuration="release", cpu=bl.SERVER_CPU,
                     log_level="warning")
        prompt = ("The quick brown fox jumps over the lazy dog. " * (PROMPT // 45 + 1))[:PROMPT]
        body = json.dumps({"model": "opt-stable", "prompt": prompt, "max_tokens": 4, "stream": True}).encode()
        body_last = json.dumps({"prompt": prompt, "max_tokens": 4, "stream": True, "model": "opt-stable"}).encode()
        rows, added = [], {}
        buffers = [BUFFER] + ([1 << 20] if BUFFER != 1 << 20 else [])
        cases = [(b, "first", body) for b in buffers] + [(BUFFER, "last", body_last)]
        for buffer, where, data in cases:
            res = run_case(st, epp, backend, buffer, data)
            for name, ts in res.items():
                rows.append([f"{buffer // 1024} KiB", where, name, len(ts), f"{bl.percentile(ts, 0.5):.2f}",
                             f"{bl.percentile(ts, 0.9):.2f}", f"{min(ts):.2f}"])
            added[buffer, where] = (bl.percentile(res["via EPP"], 0.5) - bl.percentile(res["direct"], 0.5),
                                    bl.percentile(res["via EPP"], 0.9) - bl.percentile(res["direct"], 0.9),
                                    bl.percentile(res["via EPP"], 0.5) / bl.percentile(res["direct"], 0.5))
        print(bl.machine_note())
        print(f"\n(c) TTFB of a stream:true completion with a {len(body) / 1000:.0f} KB body through Envoy 1.40 "
              f"(HTTP/1.1, fake vLLM backend), {ITER} alternating requests per path; Envoy buffer = "
              f"per_connection_buffer_limit_bytes (GIE uses 32 KiB: the body crosses the EPP in 32 KiB chunks)")
        print(bl.table(["Envoy buffer", "model", "path", "n", "p50 ms", "p90 ms", "min ms"], rows))
        a50, a90, ratio = added[BUFFER, "first"]
        ok = a50 <= FLOOR_MS
        for buffer in buffers[1:]:
            b50, b90, _ = added[buffer, "first"]
            print(f"  with {buffer // 1024} KiB Envoy buffers the EPP adds {b50:.2f} ms p50 ({b90:.2f} ms p90)")
        l50, l90, _ = added[BUFFER, "last"]
        print(f"  model last (body held until the model arrives): the EPP adds {l50:.2f} ms p50 ({l90:.2f} ms p90)")
        print(f"EPP adds {a50:.2f} ms at p50 ({a90:.2f} ms at p90) with {BUFFER // 1024} KiB buffers vs floor ≤ {FLOOR_MS} ms "
              f"→ {bl.verdict(ok)} (ratio via/direct p50 {ratio:.2f}; reference EPP: +150 ms or more)")
        return 0 if ok or not bl.ENFORCE else 1
    finally:
        st.stop()


if __name__ == "__main__":
    sys.exit(main())
