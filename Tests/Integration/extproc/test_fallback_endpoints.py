"""Fallback endpoint lists (endpoint picker protocol v0.4) and the served-endpoint report (v1.0), driven over
grpcio Process streams as Envoy does.

With --destination-endpoints N the routing reply names up to N endpoints, best first, comma-separated, the same in
the x-gateway-destination-endpoint header and the envoy.lb metadata. When the gateway reports in the response's
metadata_context (envoy.lb / x-gateway-destination-endpoint-served) that another endpoint served the request, the
picker moves the request's in-flight count there and counts it in inference_extension_served_by_fallback_total.
"""
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "demo"))
import stack  # noqa: E402

from extproc_lib import ENDPOINTS, Stream, destination, kind, req_body, req_headers, resp_body, resp_headers  # noqa: E402
from test_metrics import scrape, value  # noqa: E402

NO_SCRAPE = ["--scrape-model-server-metrics=false"]


def run(epp, coro_fn, timeout=60):
    async def main():
        async with grpc.aio.insecure_channel(epp.address) as ch:
            return await asyncio.wait_for(coro_fn(ch), timeout)
    return asyncio.run(main())


def served(address):
    """Response headers as Envoy sends them with forwarding_namespaces envoy.lb after its load balancer chose."""
    m = resp_headers()
    lb = m.metadata_context.filter_metadata["envoy.lb"]
    lb.fields["x-gateway-destination-endpoint-served"].string_value = address
    return m


async def route(ch, subset=None):
    """Opens a stream and routes a completion; returns (stream, header value, metadata value)."""
    s = Stream(ch)
    await s.send(req_headers(subset=subset), req_body(json.dumps({"model": "alias", "prompt": "hi"}).encode(), eos=True))
    first = await s.recv()
    assert kind(first) == "request_headers", first
    hdr, md = destination(first)
    while True:  # the body reply
        r = await s.recv()
        if kind(r) == "request_body":
            break
    return s, hdr, md


async def finish(s, served_by=None):
    await s.send(served(served_by) if served_by else resp_headers())
    assert kind(await s.recv()) == "response_headers"
    await s.send(resp_body(b'{"model":"backend-model"}', eos=True))
    assert kind(await s.recv()) == "response_body"
    await s.close()


@pytest.fixture(scope="module")
def fallback_epp(epp_factory):
    return epp_factory(extra=["--destination-endpoints", "3"] + NO_SCRAPE, name="epp-fallback3")


def test_list_names_distinct_endpoints_in_header_and_metadata(fallback_epp):
    async def go(ch):
        out = []
        for _ in range(20):
            s, hdr, md = await route(ch)
            out.append((hdr, md))
            await finish(s)
        return out
    for hdr, md in run(fallback_epp, go):
        assert hdr == md, (hdr, md)
        parts = hdr.split(",")
        assert len(parts) == 3 and sorted(parts) == sorted(ENDPOINTS), hdr


def test_busy_endpoints_go_last_and_the_subset_hint_holds(fallback_epp):
    async def go(ch):
        held, hdr, _ = await route(ch)       # one request in flight on its first endpoint
        busy = hdr.split(",")[0]
        lists = []
        for _ in range(10):
            s, h, _ = await route(ch)
            lists.append(h.split(","))
            await finish(s)
        s, sub, _ = await route(ch, subset=[ENDPOINTS[0], ENDPOINTS[2], "10.200.0.9:8000"])
        await finish(s)
        await finish(held)
        return busy, lists, sub
    busy, lists, sub = run(fallback_epp, go)
    for parts in lists:
        assert parts[-1] == busy and busy not in parts[:-1], (busy, parts)
    assert sorted(sub.split(",")) == sorted([ENDPOINTS[0], ENDPOINTS[2]]), sub


def test_served_elsewhere_moves_the_in_flight_count(epp_factory):
    epp = epp_factory(extra=["--destination-endpoints", "2"] + NO_SCRAPE, endpoints=ENDPOINTS[:2], name="epp-served")

    async def go(ch):
        out = []
        for _ in range(5):
            a, hdr, _ = await route(ch)
            picked, fallback = hdr.split(",")
            # The gateway could not reach `picked` and sent the request to the fallback: while it runs there,
            # `picked` is idle, so the next request goes to `picked` first.
            await a.send(served(fallback))
            assert kind(await a.recv()) == "response_headers"
            b, hdr_b, _ = await route(ch)
            out.append((picked, hdr_b.split(",")[0]))
            await finish(b)
            await a.send(resp_body(b"{}", eos=True))
            assert kind(await a.recv()) == "response_body"
            await a.close()
        # Served where picked, or by an endpoint the picker does not know: counted only when elsewhere.
        c, hdr_c, _ = await route(ch)
        await finish(c, served_by=hdr_c.split(",")[0])
        d, _, _ = await route(ch)
        await finish(d, served_by="10.77.0.1:8000")
        # Nothing stays counted anywhere: the two endpoints are picked evenly again.
        firsts = []
        for _ in range(40):
            e, h, _ = await route(ch)
            firsts.append(h.split(",")[0])
            await finish(e)
        return out, firsts
    out, firsts = run(epp, go)
    for picked, next_first in out:
        assert next_first == picked, out
    assert set(firsts) == set(ENDPOINTS[:2]), firsts
    _, samples = scrape(epp)
    assert value(samples, "inference_extension_served_by_fallback_total", name="vllm-pool") == 6


def test_default_names_one_endpoint(epp):
    async def go(ch):
        s, hdr, md = await route(ch)
        await finish(s)
        return hdr, md
    hdr, md = run(epp, go)
    assert hdr == md and hdr in ENDPOINTS


@pytest.mark.parametrize("flag", ["0", "17", "-1"])
def test_bad_destination_endpoints_flag(flag):
    out = subprocess.run([stack.epp_bin(), "--secure-serving=false", "--endpoints", "127.0.0.1:1",
                          "--grpc-port", str(stack.free_port()), "--grpc-health-port", str(stack.free_port()),
                          "--metrics-port", "0", f"--destination-endpoints={flag}"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0
    assert "--destination-endpoints must be 1 to 16" in out.stdout + out.stderr, out.stderr[-500:]


@pytest.fixture(scope="module")
def three_backends(tmp_path_factory):
    """Fake vLLMs whose /metrics the test sets (POST /fake/load)."""
    st = stack.Stack(tmp_path_factory.mktemp("fallback-backends") / "logs")
    try:
        yield [st.fake_vllm(h, stack.free_port(h), name=f"fb-{h}") for h in ("127.0.0.51", "127.0.0.52", "127.0.0.53")]
    finally:
        st.stop()


def set_load(backend, **knobs):
    status, body = stack.http_post(f"http://{backend.address}/fake/load", knobs)
    assert status == 200, body


def test_fallbacks_are_ranked_by_load(epp_factory, three_backends):
    a, b, c = three_backends
    epp = epp_factory(extra=["--destination-endpoints", "3"], endpoints=[x.address for x in three_backends],
                      name="epp-fallback-load")

    async def until(ch, want, timeout=5.0):
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            s = Stream(ch)
            await s.send(req_headers("/v1/models", method="GET", eos=True))
            seen = destination(await s.recv())
            await s.close()
            if seen == (want, want):
                return True
            await asyncio.sleep(0.05)
        raise AssertionError(f"wanted {want}, last {seen}")

    try:
        set_load(a, waiting=0, kv=0.1)
        set_load(b, waiting=4, kv=0.5)
        set_load(c, waiting=8, kv=0.9)
        run(epp, lambda ch: until(ch, f"{a.address},{b.address},{c.address}"))
        set_load(a, waiting=8, kv=0.9)
        set_load(c, waiting=0, kv=0.1)
        run(epp, lambda ch: until(ch, f"{c.address},{b.address},{a.address}"))
    finally:
        for x in three_backends:
            set_load(x)


def test_span_names_the_list_and_the_endpoint_that_served(epp_factory):
    from otlp_receiver import Receiver, attributes
    collector = Receiver()
    try:
        epp = epp_factory(extra=["--destination-endpoints", "2", "--tracing", "--tracing-endpoint", collector.url,
                                 "--tracing-sample-ratio", "1", "--tracing-export-interval", "100ms"] + NO_SCRAPE,
                          name="epp-fallback-traced")

        async def go(ch):
            s, hdr, _ = await route(ch)
            await finish(s, served_by=hdr.split(",")[1])
            return hdr
        hdr = run(epp, go)
        spans = collector.wait_spans(lambda s: any(x.name == "gateway.request" for _, x in s))
        root = next(x for _, x in spans if x.name == "gateway.request")
        a = attributes(root)
        assert a["gateway.destination_endpoint"] == hdr
        assert a["gateway.destination_endpoint.served"] == hdr.split(",")[1]
    finally:
        collector.close()
