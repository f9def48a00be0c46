"""Prometheus metrics on --metrics-port, scraped over HTTP after Process streams driven with grpcio.

Checks the reference EPP's metric names and labels (so dashboards keep working) and that the counts
follow what the streams did: completed requests with token usage, refused requests as errors with
their code, rewrite decisions, running requests back to zero, ready pods from the endpoint list.
"""
import asyncio
import json
import re
import urllib.error
import urllib.request

import grpc
import pytest

from extproc_lib import ENDPOINTS, Stream, full_request, kind, req_body, req_headers

STABLE = "facebook/opt-125m"


def scrape(epp):
    with urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return text, samples


def value(samples, metric, **labels):
    """Sum of the samples of `metric` whose labels include `labels`."""
    total, found = 0.0, False
    for name, v in samples.items():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?", name)
        if not m or m.group(1) != metric:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v2 for k, v2 in labels.items()):
            total, found = total + v, True
    return total if found else None


def run(epp, coro_fn, timeout=60):
    async def main():
        async with grpc.aio.insecure_channel(epp.address) as ch:
            return await asyncio.wait_for(coro_fn(ch), timeout)
    return asyncio.run(main())


@pytest.fixture(scope="module")
def metrics_epp(epp_factory):
    # Its own process, so the counts start at zero whatever other tests did.
    return epp_factory(name="epp-metrics")


def test_metrics_follow_requests(metrics_epp):
    epp = metrics_epp
    _, before = scrape(epp)
    assert value(before, "inference_pool_ready_pods", name="vllm-pool") == len(ENDPOINTS)
    assert value(before, "inference_objective_request_total") is None  # nothing yet

    usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16,
             "prompt_tokens_details": {"cached_tokens": 4}}

    async def go(ch):
        out = []
        for _ in range(5):
            body = json.dumps({"model": "opt-stable", "prompt": "hi"}).encode()
            resp = json.dumps({"id": "x", "object": "text_completion", "model": STABLE, "choices": [],
                               "usage": usage}).encode()
            out.append(await full_request(ch, body, response=resp))
        out.append(await refused(ch, b'{"model": "opt-stable", "prompt": '))  # truncated JSON → 400
        out.append(await refused(ch, json.dumps({"prompt": "no model"}).encode()))  # missing model → 400
        return out

    async def refused(ch, body):
        # The whole body in one message: the picker answers and ends the stream, nothing left to write.
        s = Stream(ch)
        await s.send(req_headers(), req_body(body, eos=True))
        replies = [await s.recv()]
        rest, code = await s.close()
        return replies + rest, [], code
    results = run(epp, go)
    assert all(code == grpc.StatusCode.OK for _, _, code in results)
    assert [kind(r[0][-1]) for r in results[-2:]] == ["immediate_response"] * 2

    text, s = scrape(epp)
    # Every request counts, refused ones too: 5 completed + the truncated one (its model was read
    # before the body proved invalid, so it is named); the one without a model counts under model_name="".
    assert value(s, "inference_objective_request_total", model_name="opt-stable") == 6
    assert value(s, "inference_objective_request_total", model_name="") == 1
    # The seed split sends each routed request to one of the two arms; the decisions add up per rule.
    assert value(s, "inference_extension_model_rewrite_decisions_total", model_rewrite_name="default/opt-stable",
                 model_name="opt-stable") == 5
    assert value(s, "inference_objective_input_tokens_sum", model_name="opt-stable") == 55
    assert value(s, "inference_objective_output_tokens_sum", model_name="opt-stable") == 25
    assert value(s, "inference_objective_prompt_cached_tokens_sum", model_name="opt-stable") == 20
    assert value(s, "inference_objective_request_duration_seconds_count", model_name="opt-stable") == 5
    assert value(s, "inference_objective_request_sizes_count", model_name="opt-stable") == 6
    assert value(s, "inference_objective_running_requests", model_name="opt-stable") == 0
    assert value(s, "inference_objective_request_error_total", error_code="BadRequest") == 2
    assert value(s, "inference_objective_request_error_total", model_name="opt-stable", error_code="BadRequest") == 1
    assert value(s, "inference_extension_scheduler_e2e_duration_seconds_count", model_name="opt-stable") == 5
    # Reference names and labels, with HELP/TYPE lines.
    assert "# TYPE inference_objective_request_duration_seconds histogram" in text
    assert re.search(r'inference_objective_request_total\{model_name="opt-stable",target_model_name="facebook/opt-125m(-canary)?"\} \d+', text)


def test_metrics_endpoint_paths(metrics_epp):
    base = f"http://127.0.0.1:{metrics_epp.metrics_port}"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/nope", timeout=5)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(base + "/metrics", data=b"x", method="POST"), timeout=5)
    assert e.value.code == 405
    # Garbage instead of HTTP: 400 and the connection closes; the listener keeps serving.
    import socket
    with socket.create_connection(("127.0.0.1", metrics_epp.metrics_port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400"), reply
    # Query strings are ignored, and the listener keeps serving.
    with urllib.request.urlopen(base + "/metrics?x=1", timeout=5) as r:
        assert r.status == 200
