#!/usr/bin/env python3
"""Bench (a): ext_proc Process streams driven directly over h2c at full speed.

One cycle = one Process stream carrying request headers (as Envoy forwards them) + a 1 KB body with end_of_stream + response
headers + response body (end_of_stream), pre-encoded as gRPC frames in one h2load -d file; the picker
answers all four and ends the stream with grpc-status 0 when h2load half-closes. The picker (release)
is pinned to CPU 0, h2load to CPU 1. Reports cycles/s and picker CPU µs per cycle (utime+stime from
/proc over the measured window). Floor: ≥ 50,000 cycles/s.
"""
import json
import os
import shlex
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import extproc_benchlib as bl  # noqa: E402
from extproc_benchlib import stack  # noqa: E402
from extproc_lib import PROCESS, kind, req_body, req_headers, resp_body, resp_headers  # noqa: E402

FLOOR_CYCLES = 50_000


def cycle_payload():
    prompt = "x" * (1024 - len('{"model":"opt-stable","prompt":"","max_tokens":5}'))
    body = json.dumps({"model": "opt-stable", "prompt": prompt, "max_tokens": 5}, separators=(",", ":")).encode()
    assert len(body) == 1024
    response = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "facebook/opt-125m",
                           "choices": [{"index": 0, "text": " hello", "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 250, "completion_tokens": 1, "total_tokens": 251}}).encode()
    # The request headers a gateway Envoy forwards for an HTTP/1.1 client: Envoy adds x-request-id and
    # x-forwarded-proto to what curl sends.
    forwarded = {"content-length": str(len(body)), "user-agent": "curl/7.88.1", "accept": "*/*",
                 "x-forwarded-proto": "http", "x-request-id": "9b0d3c52-6a4e-4f7e-8d21-4c3f5e6a7b80"}
    msgs = [req_headers("/v1/completions", headers=forwarded), req_body(body, eos=True), resp_headers(),
            resp_body(response, eos=True)]
    return b"".join(bl.grpc_frame(m) for m in msgs)


def verify_one_cycle(port, payload):
    """Sends one cycle with the h2 package; checks the four replies and grpc-status 0."""
    import h2.config
    import h2.connection
    import h2.events
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", PROCESS), (":authority", "epp"),
                         ("content-type", "application/grpc"), ("te", "trailers")])
    c.send_data(sid, payload, end_stream=True)
    sock.sendall(c.data_to_send())
    data, trailers, done = b"", {}, False
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        for ev in c.receive_data(sock.recv(65536)):
            if isinstance(ev, h2.events.DataReceived):
                data += ev.data
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
        sock.sendall(c.data_to_send())
    sock.close()
    replies = [pb.ProcessingResponse.FromString(f) for f in bl.parse_grpc_frames(data)]
    kinds = [kind(r) for r in replies]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body"], kinds
    assert trailers.get("grpc-status") == "0", trailers
    restored = replies[3].response_body.response.body_mutation.streamed_response.body
    assert json.loads(restored)["model"] == "opt-stable"
    return kinds, trailers


def main():
    st = stack.Stack()
    try:
        # BENCH_EPP_ARGS: extra picker flags, to price a feature (e.g. "--tracing --tracing-sample-ratio 1").
        epp = st.epp(["127.0.0.2:8000", "127.0.0.3:8000"], config_dir=stack.DEMO / "config", configuration="release",
                     cpu=bl.SERVER_CPU, log_level="warning", extra=shlex.split(os.environ.get("BENCH_EPP_ARGS", "")))
        payload = cycle_payload()
        kinds, trailers = verify_one_cycle(epp.grpc_port, payload)
        print(f"verified one cycle: replies {kinds}, grpc-status {trailers.get('grpc-status')}")
        data = Path(tempfile.mkdtemp(prefix="bench-extproc-")) / "cycle.bin"
        data.write_bytes(payload)
        url = f"http://127.0.0.1:{epp.grpc_port}{PROCESS}"
        hdrs = ["content-type: application/grpc", "te: trailers"]
        rows = []
        best = None
        for conns, streams in ((1, 100), (4, 100), (16, 32)):
            results = []
            for _ in range(bl.ROUNDS):
                cpu0 = epp.cpu_seconds()
                r = bl.h2load(url, duration=bl.DURATION, warmup=bl.WARMUP, clients=conns, streams=streams, data=data,
                              headers=hdrs, log=False)
                cpu = epp.cpu_seconds() - cpu0
                cycles = r.rps * (bl.DURATION + bl.WARMUP)
                results.append((r.rps, cpu * 1e6 / max(cycles, 1), r))
            results.sort(key=lambda x: x[0])
            rps, us, r = results[len(results) // 2]
            rows.append([f"{conns}x{streams}", f"{rps:,.0f}", f"{us:.1f}", "yes" if r.clean else f"NO ({r.failed} failed)"])
            if best is None or rps > best[0]:
                best = (rps, us, f"{conns}x{streams}")
        print(bl.machine_note())
        print("\n(a) ext_proc Process cycles over h2c, picker pinned to one core (median of "
              f"{bl.ROUNDS} × {bl.DURATION}s + {bl.WARMUP}s warm-up)")
        print(bl.table(["conns x streams", "cycles/s", "EPP CPU µs/cycle", "all OK"], rows))
        ok = best[0] >= FLOOR_CYCLES
        print(f"best {best[0]:,.0f} cycles/s ({best[2]}) vs floor {FLOOR_CYCLES:,}: ratio {best[0] / FLOOR_CYCLES:.2f} "
              f"→ {bl.verdict(ok)}; EPP CPU {best[1]:.1f} µs/cycle (1e6/µs = {1e6 / best[1]:,.0f} cycles/s/core)")
        return 0 if ok or not bl.ENFORCE else 1
    finally:
        st.stop()


if __name__ == "__main__":
    sys.exit(main())
