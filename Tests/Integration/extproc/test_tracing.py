"""OpenTelemetry tracing, driven over Process streams (grpcio) and checked at a stand-in OTLP/HTTP
collector (otlp_receiver.py, decoding with the PyPI opentelemetry-proto messages): which requests are
traced (parent-based ratio sampling), the spans and their parent links, the traceparent the backend
gets, the OTEL_* environment, and a collector that is down or failing costing no request."""
import asyncio
import os
import json
import time

import grpc
import pytest

from extproc_lib import ENDPOINTS, Stream, destination, full_request, kind, req_body, req_headers, set_headers
from otlp_receiver import Receiver, attributes

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def run(epp, coro_fn, timeout=60):
    async def main():
        async with grpc.aio.insecure_channel(epp.address) as ch:
            return await asyncio.wait_for(coro_fn(ch), timeout)
    return asyncio.run(main())


@pytest.fixture
def collector():
    r = Receiver()
    yield r
    r.close()


def tracing_epp(epp_factory, collector_url, ratio, env=None, name="traced"):
    return epp_factory(extra=["--tracing", "--tracing-endpoint", collector_url, "--tracing-sample-ratio", str(ratio),
                              "--tracing-export-interval", "100ms"], env=env, name=name)


def usage_response(model):
    return json.dumps({"id": "x", "object": "text_completion", "model": model, "choices": [],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}).encode()


def routing_headers(reqs):
    return set_headers(reqs[0].request_headers.response)


def test_sampled_parent_is_traced_and_the_backend_continues_the_trace(epp_factory, collector):
    e = tracing_epp(epp_factory, collector.url, 0.0, name="traced-parent",
                    env={"OTEL_SERVICE_NAME": "picker-under-test", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci",
                         "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc"})
    body = json.dumps({"model": "alias", "prompt": "hello"}).encode()
    hdrs = {"traceparent": f"00-{TRACE}-{PARENT}-01", "x-request-id": "req-1"}
    reqs, resps, code = run(e, lambda ch: full_request(ch, body, headers=hdrs, response=usage_response("backend-model")))
    assert code == grpc.StatusCode.OK
    sent = routing_headers(reqs)["traceparent"]
    version, trace, span_id, flags = sent.split("-")
    assert (version, trace, flags) == ("00", TRACE, "01") and span_id != PARENT and span_id != "0" * 16

    spans = collector.wait_spans(lambda s: any(x.name == "gateway.request" for _, x in s))
    by_name = {x.name: (res, x) for res, x in spans}
    assert set(by_name) == {"gateway.request", "gateway.director.handle_request", "gateway.scheduler.schedule"}
    res, root = by_name["gateway.request"]
    assert res["service.name"] == "picker-under-test" and res["deployment.environment"] == "ci"
    assert root.trace_id.hex() == TRACE and root.parent_span_id.hex() == PARENT
    assert root.span_id.hex() == span_id, "the backend's traceparent names the picker's server span"
    assert root.kind == root.SPAN_KIND_SERVER and root.end_time_unix_nano >= root.start_time_unix_nano
    assert abs(root.start_time_unix_nano / 1e9 - time.time()) < 60, "wall-clock timestamps"
    a = attributes(root)
    assert a["gen_ai.request.model"] == "alias" and a["gateway.target_model"] == "backend-model"
    assert a["gateway.request.size_bytes"] == len(body) and a["gateway.request.id"] == "req-1"
    assert a["gateway.destination_endpoint"] in ENDPOINTS and a["gateway.request.outcome"] == "completed"
    assert a["gen_ai.usage.prompt_tokens"] == 7 and a["gen_ai.usage.completion_tokens"] == 3
    assert a["gateway.response.streaming"] is False

    _, director = by_name["gateway.director.handle_request"]
    _, scheduler = by_name["gateway.scheduler.schedule"]
    assert director.parent_span_id == root.span_id and scheduler.parent_span_id == director.span_id
    assert director.kind == director.SPAN_KIND_INTERNAL
    assert attributes(director)["gateway.admission.result"] == "admitted"
    assert attributes(director)["gateway.admission.candidate_pods"] == len(ENDPOINTS)
    assert attributes(scheduler)["gateway.scheduler.result"] == "scheduled"
    assert attributes(scheduler)["gateway.target_pod.name"] == a["gateway.destination_endpoint"]
    assert root.start_time_unix_nano <= director.start_time_unix_nano <= scheduler.start_time_unix_nano
    assert scheduler.end_time_unix_nano <= director.end_time_unix_nano <= root.end_time_unix_nano
    post = collector.requests[-1]
    assert post["content-type"] == "application/x-protobuf" and post["authorization"] == "Bearer abc"


def test_unsampled_parent_and_ratio_zero_roots_are_not_traced(epp_factory, collector):
    e = tracing_epp(epp_factory, collector.url, 0.0, name="traced-off")
    body = json.dumps({"model": "alias", "prompt": "hello"}).encode()

    async def go(ch):
        out = []
        for hdrs in ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, {}, {"traceparent": "garbage"}):
            out.append(await full_request(ch, body, headers=hdrs))
        # Then one sampled request, as a marker that export works and the others were not just late.
        out.append(await full_request(ch, body, headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}))
        return out
    results = run(e, go)
    for reqs, _, code in results[:3]:
        assert code == grpc.StatusCode.OK and "traceparent" not in routing_headers(reqs)
    spans = collector.wait_spans(lambda s: any(x.name == "gateway.request" for _, x in s))
    time.sleep(0.5)
    assert [x.name for _, x in collector.spans].count("gateway.request") == 1


def test_ratio_one_traces_roots_and_refusals_are_errors(epp_factory, collector):
    e = tracing_epp(epp_factory, collector.url, 1.0, name="traced-all")

    async def go(ch):
        ok = await full_request(ch, json.dumps({"model": "alias", "prompt": "x"}).encode())
        bad = await full_request(ch, b'{"prompt": "no model"}')
        return ok, bad
    (ok_reqs, _, _), (bad_reqs, _, _) = run(e, go)
    _, trace, span_id, flags = routing_headers(ok_reqs)["traceparent"].split("-")
    assert flags == "01"
    assert kind(bad_reqs[-1]) == "immediate_response"
    spans = collector.wait_spans(lambda s: sum(x.name == "gateway.request" for _, x in s) == 2)
    roots = [x for _, x in spans if x.name == "gateway.request"]
    ok_root = next(x for x in roots if x.trace_id.hex() == trace)
    assert ok_root.span_id.hex() == span_id and ok_root.parent_span_id == b"", "a root span: no parent"
    bad_root = next(x for x in roots if x.trace_id.hex() != trace)
    assert bad_root.status.code == bad_root.status.STATUS_CODE_ERROR and bad_root.status.message == "epp_missing_model"
    assert attributes(bad_root)["http.response.status_code"] == 400
    assert attributes(bad_root)["gateway.request.outcome"] == "refused"
    assert not any(x.name == "gateway.director.handle_request" and x.trace_id == bad_root.trace_id for _, x in spans), \
        "refused before routing: no routing spans"


def test_collector_down_or_failing_costs_no_request(epp_factory, collector):
    collector.status = 503
    e = tracing_epp(epp_factory, collector.url, 1.0, name="traced-failing")
    body = json.dumps({"model": "alias", "prompt": "x"}).encode()

    async def go(ch):
        return [await full_request(ch, body) for _ in range(20)]
    for reqs, _, code in run(e, go):
        assert code == grpc.StatusCode.OK and destination(reqs[0])[0] in ENDPOINTS
    deadline = time.monotonic() + 10
    while "cannot export spans" not in e.tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = e.tail(200)
    assert "cannot export spans" in log and "HTTP 503" in log
    assert log.count("cannot export spans") == 1, "one warning, not one per batch"
    # The collector recovers: later spans arrive (the failed batches are gone, as with any OTLP exporter).
    collector.status = 200
    run(e, lambda ch: full_request(ch, body, headers={"x-request-id": "after-recovery"}))
    spans = collector.wait_spans(lambda s: any(attributes(x).get("gateway.request.id") == "after-recovery" for _, x in s))
    assert spans
    deadline = time.monotonic() + 5
    while "exporting spans again" not in e.tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "exporting spans again" in e.tail(200)


def test_unreachable_collector_and_bad_settings(epp_factory, collector):
    # Nothing listens on the collector port: requests are served all the same.
    dead = f"http://127.0.0.1:{collector.port}/v1/traces"
    collector.close()
    e = tracing_epp(epp_factory, dead, 1.0, name="traced-dead")
    body = json.dumps({"model": "alias", "prompt": "x"}).encode()
    for reqs, _, code in run(e, lambda ch: asyncio.gather(*[full_request(ch, body) for _ in range(10)])):
        assert code == grpc.StatusCode.OK
    deadline = time.monotonic() + 10
    while "cannot export spans" not in e.tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "cannot export spans" in e.tail(200)
    # A collector URL that is not http(s) is refused at start, with a clear message.
    import subprocess, stack
    out = subprocess.run([stack.epp_bin(), "--secure-serving=false", "--endpoints", "127.0.0.1:1", "--tracing",
                          "--tracing-endpoint", "grpc://collector:4317", "--grpc-port", "0"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "http:// or https://" in (out.stdout + out.stderr)


def test_spans_are_flushed_at_shutdown(epp_factory, collector):
    """Spans still queued when the picker is told to stop (SIGTERM) are sent before it exits."""
    e = epp_factory(extra=["--tracing", "--tracing-endpoint", collector.url, "--tracing-sample-ratio", "1",
                           "--tracing-export-interval", "10m"], name="traced-shutdown")
    body = json.dumps({"model": "alias", "prompt": "x"}).encode()
    run(e, lambda ch: full_request(ch, body, headers={"x-request-id": "last-words"}))
    time.sleep(0.3)
    assert collector.spans == [], "nothing exported before the (10 min) interval"
    assert e.stop() == 0
    names = [x.name for _, x in collector.spans if attributes(x).get("gateway.request.id") in (None, "last-words")]
    assert "gateway.request" in names and len(collector.spans) == 3


def test_otlp_grpc_export(epp_factory):
    """OTLP/gRPC (the reference's exporter protocol): asked for with OTEL_EXPORTER_OTLP_PROTOCOL, or
    chosen for an OTEL_EXPORTER_OTLP_ENDPOINT on the collector's gRPC port 4317 as the reference's
    chart sets it; spans arrive at a grpcio TraceService with the headers from the environment, and
    an error status from the collector is a logged, dropped batch, never a failed request."""
    from otlp_receiver import GRPCReceiver
    body = json.dumps({"model": "alias", "prompt": "x"}).encode()
    hdrs = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    collector = GRPCReceiver()
    try:
        e = epp_factory(extra=["--tracing", "--tracing-export-interval", "100ms"], name="traced-grpc",
                        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                             "OTEL_EXPORTER_OTLP_HEADERS": "X-Api-Key=k1"})
        reqs, _, code = run(e, lambda ch: full_request(ch, body, headers=hdrs))
        assert code == grpc.StatusCode.OK
        spans = collector.wait_spans(lambda s: len(s) == 3)
        root = next(x for _, x in spans if x.name == "gateway.request")
        assert root.trace_id.hex() == TRACE and root.span_id.hex() == routing_headers(reqs)["traceparent"].split("-")[2]
        assert collector.requests[-1]["x-api-key"] == "k1"
        collector.status = grpc.StatusCode.UNAVAILABLE
        for reqs, _, code in run(e, lambda ch: asyncio.gather(*[full_request(ch, body, headers=hdrs) for _ in range(5)])):
            assert code == grpc.StatusCode.OK
        deadline = time.monotonic() + 10
        while "cannot export spans" not in e.tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "gRPC status 14: collector says no" in e.tail(200)
    finally:
        collector.close()
    # The reference chart's setting: an endpoint on port 4317 and no protocol named → OTLP/gRPC.
    try:
        collector = GRPCReceiver("127.0.0.5", 4317)
    except (OSError, RuntimeError) as err:
        pytest.skip(f"127.0.0.5:4317 is taken: {err}")
    try:
        e = epp_factory(extra=["--tracing", "--tracing-export-interval", "100ms"], name="traced-4317",
                        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.5:4317"})
        run(e, lambda ch: full_request(ch, body, headers=hdrs))
        assert collector.wait_spans(lambda s: len(s) == 3)
    finally:
        collector.close()


def test_https_collectors_with_their_own_ca_and_mutual_tls(epp_factory, cert_factory, tmp_path):
    """OTEL_EXPORTER_OTLP_CERTIFICATE trusts a collector signed by a private CA (OTLP/HTTP and OTLP/gRPC);
    OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE / _CLIENT_KEY answer a collector that wants mutual TLS; a collector the
    picker cannot verify gets nothing and costs no request."""
    from otlp_receiver import GRPCReceiver
    server = cert_factory(tmp_path / "collector", "collector.test")  # SAN IP:127.0.0.1, self-signed: its own CA
    client = cert_factory(tmp_path / "client", "epp-client")
    ca = str(server / "tls.crt")
    body = json.dumps({"model": "alias", "prompt": "x"}).encode()
    flags = ["--tracing", "--tracing-sample-ratio", "1", "--tracing-export-interval", "100ms"]

    c = Receiver(tls=server)
    try:
        e = epp_factory(extra=flags + ["--tracing-endpoint", c.url], name="traced-tls", env={"OTEL_EXPORTER_OTLP_CERTIFICATE": ca})
        run(e, lambda ch: full_request(ch, body))
        assert c.wait_spans(lambda s: len(s) == 3)
    finally:
        c.close()

    c = Receiver(tls=server, client_ca=str(client / "tls.crt"))
    try:
        e = epp_factory(extra=flags + ["--tracing-endpoint", c.url], name="traced-mtls",
                        env={"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": ca,
                             "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(client / "tls.crt"),
                             "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(client / "tls.key")})
        run(e, lambda ch: full_request(ch, body))
        assert c.wait_spans(lambda s: len(s) == 3)
        assert c.requests[-1][":client-cn"] == "epp-client"
    finally:
        c.close()

    c = Receiver(tls=server)
    try:
        e = epp_factory(extra=flags + ["--tracing-endpoint", c.url], name="traced-untrusted")
        for reqs, _, code in run(e, lambda ch: asyncio.gather(*[full_request(ch, body) for _ in range(5)])):
            assert code == grpc.StatusCode.OK
        deadline = time.monotonic() + 10
        while "cannot export spans" not in e.tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cannot export spans" in e.tail(200) and c.spans == []
    finally:
        c.close()

    g = GRPCReceiver(tls=server)
    try:
        e = epp_factory(extra=flags, name="traced-grpc-tls",
                        env={"OTEL_EXPORTER_OTLP_ENDPOINT": g.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                             "OTEL_EXPORTER_OTLP_CERTIFICATE": ca})
        run(e, lambda ch: full_request(ch, body))
        assert g.wait_spans(lambda s: len(s) == 3)
    finally:
        g.close()

    import subprocess, stack
    out = subprocess.run([stack.epp_bin(), "--secure-serving=false", "--endpoints", "127.0.0.1:1", "--tracing",
                          "--tracing-endpoint", "https://127.0.0.1:1/v1/traces", "--grpc-port", "0"],
                         env={**os.environ, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(client / "tls.crt")},
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "go together" in (out.stdout + out.stderr)
    out = subprocess.run([stack.epp_bin(), "--secure-serving=false", "--endpoints", "127.0.0.1:1", "--tracing",
                          "--tracing-endpoint", "https://127.0.0.1:1/v1/traces", "--grpc-port", "0"],
                         env={**os.environ, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing.pem")},
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "missing.pem" in (out.stdout + out.stderr)
