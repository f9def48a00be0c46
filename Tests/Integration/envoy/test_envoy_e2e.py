"""End to end through a real Envoy 1.40: client → Envoy (ext_proc FULL_DUPLEX_STREAMED) → epp → fake vLLM."""
import collections
import http.client
import json
import os
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import stack
from e2e_clients import completion, h2_request, request, sha256, spliced

STABLE, CANARY = "facebook/opt-125m", "facebook/opt-125m-canary"
TARGETS = {STABLE, CANARY}


def hammer(port, n, threads=16, body_fn=None, path="/v1/completions", timeout=30):
    """n requests over `threads` keep-alive HTTP/1.1 connections. Returns [(status, headers, body, t)]."""
    counter = iter(range(n))
    lock = threading.Lock()
    results = []

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        local = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = body_fn(i) if body_fn else completion(prompt=f"request {i}")
            try:
                r = request(port, "POST", path, body, conn=conn)
                local.append((r.status, r.headers, r.body, time.monotonic()))
            except (OSError, http.client.HTTPException) as e:
                local.append((-1, {}, repr(e).encode(), time.monotonic()))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.close()
        with lock:
            results.extend(local)

    with ThreadPoolExecutor(threads) as ex:
        for f in [ex.submit(worker) for _ in range(threads)]:
            f.result(timeout=300)
    return results


def prometheus_samples(epp):
    """{metric{labels}: value} from the picker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def test_seed_split_5000_requests(seed_gateway):
    gw = seed_gateway
    gw.reset_backends()
    n = 5000
    before = prometheus_samples(gw.epp)
    results = hammer(gw.port, n, threads=16)
    assert len(results) == n
    bad = [r for r in results if r[0] != 200]
    assert not bad, f"{len(bad)} failed, first: {bad[0][0]} {bad[0][2][:300]!r}"
    by_header = collections.Counter(r[1].get("x-gateway-target-model") for r in results)
    assert set(by_header) == TARGETS, by_header
    canary_pct = 100.0 * by_header[CANARY] / n
    assert 8.0 <= canary_pct <= 12.0, f"canary share {canary_pct:.2f}% (header counts {by_header})"
    # The backend served what the header says, and the client sees the alias.
    for status, headers, body, _ in results:
        assert headers.get("x-fake-model") == headers.get("x-gateway-target-model")
        assert json.loads(body)["model"] == "opt-stable"
    # Counted from what the backends saw.
    stats = gw.backend_stats()
    seen = collections.Counter()
    for s in stats.values():
        seen.update(s["by_model"])
    assert sum(seen.values()) == n, stats
    assert seen[CANARY] == by_header[CANARY] and seen[STABLE] == by_header[STABLE], (seen, by_header)
    # Every backend got traffic (least-in-flight, ties at random) and saw its own address as destination.
    for addr, s in stats.items():
        assert s["requests"] > n * 0.2, stats
    for rec in gw.backend_last():
        assert rec["destination"] == rec["backend"]
    # The picker's metrics saw the same split; as Envoy drives the streams every request completed
    # (usage from the backend counted) and none is left running.
    after = prometheus_samples(gw.epp)
    for target in TARGETS:
        labels = f'{{model_name="opt-stable",target_model_name="{target}"}}'
        for metric, want in (("inference_objective_request_total", by_header[target]),
                             ("inference_objective_request_duration_seconds_count", by_header[target]),
                             ("inference_objective_input_tokens_count", by_header[target])):
            got = after.get(metric + labels, 0) - before.get(metric + labels, 0)
            assert got == want, (metric, target, got, want)
    assert after['inference_objective_running_requests{model_name="opt-stable"}'] == 0
    print(f"\nseed split over {n}: {dict(by_header)} canary={canary_pct:.2f}%")


def test_sse_stream_arrives_chunk_by_chunk(seed_gateway):
    gw = seed_gateway
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    body = completion(stream=True, max_tokens=6)
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json", "x-fake-chunk-delay-ms": "150"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.getheader("content-type").startswith("text/event-stream")
    target = r.getheader("x-gateway-target-model")
    assert target in TARGETS
    t0 = time.monotonic()
    events, buf = [], b""
    while time.monotonic() - t0 < 20:
        piece = r.read1(65536)
        if not piece:
            break
        buf += piece
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            events.append((time.monotonic() - t0, ev))
    conn.close()
    data = [e for _, e in events if e.startswith(b"data: ")]
    assert data[-1] == b"data: [DONE]"
    payloads = [json.loads(e[6:]) for e in data[:-1]]
    assert len(payloads) == 7
    assert all(p["model"] == "opt-stable" for p in payloads), payloads
    assert payloads[0]["echo"]["model"] == target
    # Arrival times at the client follow the backend's 150 ms pacing: streamed, not buffered.
    times = [t for t, e in events if e.startswith(b"data: ")]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(1 for g in gaps if g > 0.08) >= 5, f"events not spread out: {times}"
    assert times[-1] - times[0] > 0.7


def test_sse_chat_stream_h2c_model_restored(seed_gateway):
    body = json.dumps({"model": "opt-stable", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True, "max_tokens": 4}).encode()
    r = h2_request(seed_gateway.port, "POST", "/v1/chat/completions", body, headers={"x-fake-chunk-delay-ms": "100"})
    assert r.status == 200 and r.reset is None, r
    events = [e for e in r.body.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    assert all(json.loads(e[6:])["model"] == "opt-stable" for e in events[:-1])
    assert r.data_times[-1] - r.data_times[0] > 0.3, r.data_times


@pytest.mark.parametrize("size,model_first", [(int(1.2 * 1024 * 1024), True), (int(1.2 * 1024 * 1024), False),
                                              (50 * 1024 * 1024, True)],
                         ids=["1.2MiB-model-first", "1.2MiB-model-last", "50MiB-model-first"])
def test_large_body_byte_identical(seed_gateway, size, model_first):
    gw = seed_gateway
    filler = (b"lorem ipsum \\\"dolor\\\" sit amet \\u00e9 " * (size // 30 + 1))[: size - 100]
    if model_first:
        body = b'{"model":"opt-stable","max_tokens":3,"prompt":"' + filler + b'"}'
    else:
        body = b'{"max_tokens":3,"prompt":"' + filler + b'","model":"opt-stable"}'
    hwm0 = _hwm_mib(gw.epp.pid)
    t0 = time.monotonic()
    r = request(gw.port, "POST", "/v1/completions", body, timeout=120)
    elapsed = time.monotonic() - t0
    grew = _hwm_mib(gw.epp.pid) - hwm0
    assert r.status == 200, r
    target = r.header("x-gateway-target-model")
    assert target in TARGETS
    expected = spliced(body, "opt-stable", target)
    assert int(r.header("x-fake-body-len")) == len(expected)
    assert r.header("x-fake-body-sha256") == sha256(expected)
    assert r.header("x-fake-chunked") == "true"  # Envoy dropped content-length
    assert r.json()["model"] == "opt-stable"
    print(f"\n{len(body)} bytes through Envoy+EPP in {elapsed:.2f}s; EPP peak RSS grew {grew:.1f} MiB")
    if model_first and size > 8 * 1024 * 1024:
        # Early routing streams the body through: the picker must not hold it.
        assert grew < 24, f"EPP peak RSS grew {grew:.1f} MiB for a {size >> 20} MiB body"


def _hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def test_h2c_client(seed_gateway):
    r = h2_request(seed_gateway.port, "POST", "/v1/completions", completion(prompt="over h2c"))
    assert r.status == 200 and r.reset is None, r
    assert r.header("x-gateway-target-model") in TARGETS
    assert r.json()["model"] == "opt-stable"
    assert r.header("x-fake-model") == r.header("x-gateway-target-model")


def test_h2c_client_curl(seed_gateway, tmp_path):
    import subprocess
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-i", "--max-time", "20",
                          f"http://127.0.0.1:{seed_gateway.port}/v1/completions", "-H", "content-type: application/json",
                          "-d", completion().decode()], capture_output=True, timeout=30)
    text = out.stdout.decode()
    assert text.startswith("HTTP/2 200"), text + out.stderr.decode()
    assert "x-gateway-target-model: facebook/opt-125m" in text
    assert '"model": "opt-stable"' in text


def test_h2c_request_trailers(seed_gateway):
    body = completion(prompt="with trailers " * 1000)
    r = h2_request(seed_gateway.port, "POST", "/v1/completions", body, trailers=[("x-trailer-one", "1")])
    assert r.status == 200 and r.reset is None, r
    target = r.header("x-gateway-target-model")
    assert r.header("x-fake-body-sha256") == sha256(spliced(body, "opt-stable", target))
    assert r.json()["model"] == "opt-stable"


def test_h2c_large_body_with_trailers(seed_gateway):
    body = b'{"prompt":"' + b"x" * 300_000 + b'","model":"opt-stable"}'
    r = h2_request(seed_gateway.port, "POST", "/v1/completions", body, trailers=[("x-t", "v")], timeout=60)
    assert r.status == 200 and r.reset is None, r
    assert r.header("x-fake-body-sha256") == sha256(spliced(body, "opt-stable", r.header("x-gateway-target-model")))


def test_get_is_routed(seed_gateway):
    r = request(seed_gateway.port, "GET", "/v1/models")
    assert r.status == 200, r
    d = r.json()
    assert {m["id"] for m in d["data"]} == TARGETS
    assert d["echo"]["destination"] == d["echo"]["backend"]
    assert r.header("x-fake-destination") in {b.address for b in seed_gateway.backends}
    # Envoy saw the same destination as header and as envoy.lb dynamic metadata, and went there.
    dest = r.header("x-fake-destination")
    entries = seed_gateway.access_log(lambda es: any(e["method"] == "GET" and e["dest_header"] == dest for e in es))
    e = [e for e in entries if e["method"] == "GET" and e["dest_header"] == dest][-1]
    assert e["lb_metadata"] == dest and e["upstream_host"] == dest, e


def test_routing_by_dynamic_metadata_only(gateway_factory):
    """ORIGINAL_DST keyed only on envoy.lb metadata (no header lookup): the picker's metadata alone routes."""
    gw = gateway_factory(name="metaonly", header_routing=False)
    for _ in range(10):
        r = request(gw.port, "POST", "/v1/completions", completion())
        assert r.status == 200, r
        assert r.header("x-fake-destination") == r.json()["echo"]["backend"]


def test_fallback_endpoint_serves_when_the_first_is_down(gateway_factory, backends):
    """Envoy's override_host load balancer (the policy Envoy documents for endpoint pickers) reads the picker's
    comma-separated list: a request whose first endpoint refuses connections is retried on the second, and Envoy
    reports the endpoint that served (envoy.lb / x-gateway-destination-endpoint-served) back to the picker."""
    dead = f"127.0.0.4:{stack.free_port('127.0.0.4')}"  # nothing listens: connection refused
    eps = [dead] + [b.address for b in backends]
    gw = gateway_factory(endpoints=eps, pool_endpoints=eps, name="fallback",
                         extra=["--destination-endpoints", "2", "--scrape-model-server-metrics=false"])
    via_fallback = 0
    for _ in range(45):
        r = request(gw.port, "POST", "/v1/completions", completion())
        assert r.status == 200, r
        listed = r.header("x-fake-destination").split(",")  # what the backend got: the picker's list
        assert len(listed) == 2 and len(set(listed)) == 2 and set(listed) <= set(eps), listed
        assert r.json()["model"] == "opt-stable"
        assert r.header("x-fake-model") in TARGETS  # the retried request carried the rewritten body
        if listed[0] == dead:
            via_fallback += 1
            assert r.header("x-fake-backend") == listed[1], (listed, r.header("x-fake-backend"))
        else:
            assert r.header("x-fake-backend") == listed[0], (listed, r.header("x-fake-backend"))
    assert via_fallback > 0  # the dead endpoint is first for about a third of the requests
    entries = gw.access_log(lambda es: len(es) >= 45)
    assert all(e["served"] == e["upstream_host"] for e in entries[-45:]), entries[-3:]
    deadline = time.monotonic() + 5
    while True:
        _, body = stack.http_get(f"http://127.0.0.1:{gw.epp.metrics_port}/metrics")
        line = [l for l in body.decode().splitlines() if l.startswith("inference_extension_served_by_fallback_total")]
        if (line and float(line[0].rsplit(" ", 1)[1]) == via_fallback) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert line and float(line[0].rsplit(" ", 1)[1]) == via_fallback, (line, via_fallback)


def test_request_id_reaches_backend(seed_gateway):
    # With use_remote_address (as in GIE's config) Envoy replaces an edge client's x-request-id
    # (preserve_external_request_id defaults to false) before ext_proc sees it; the picker forwards it.
    import re
    r = request(seed_gateway.port, "POST", "/v1/completions", completion(), headers={"x-request-id": "my-id-123"})
    rid = r.json()["echo"]["request_id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid), rid
    entries = seed_gateway.access_log(lambda es: any(e["request_id"] == rid for e in es))
    assert any(e["request_id"] == rid for e in entries)


def _assert_openai_error(r, status):
    assert r.status == status, r
    assert r.header("content-type") == "application/json"
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["code"] == status
    return err


def test_invalid_json_400(seed_gateway):
    gw = seed_gateway
    gw.reset_backends()
    r = request(gw.port, "POST", "/v1/completions", b'{"model": "opt-stable", "prompt": tru}')
    _assert_openai_error(r, 400)
    r = request(gw.port, "POST", "/v1/completions", b'not json at all')
    _assert_openai_error(r, 400)
    time.sleep(0.1)
    assert sum(s["requests"] for s in gw.backend_stats().values()) == 0
    details = [e["details"] for e in gw.access_log(lambda es: sum(str(e["code"]) == "400" for e in es) >= 2)
               if str(e["code"]) == "400"]
    assert any("epp_" in d for d in details), details


def test_missing_model_400(seed_gateway):
    r = request(seed_gateway.port, "POST", "/v1/completions", b'{"prompt":"hi","max_tokens":3}')
    err = _assert_openai_error(r, 400)
    assert "model" in err["message"]
    r = request(seed_gateway.port, "POST", "/v1/completions", b'{"model":42,"prompt":"hi"}')
    _assert_openai_error(r, 400)
    r = request(seed_gateway.port, "POST", "/v1/chat/completions", b'{"model":"opt-stable"}')
    _assert_openai_error(r, 400)


def test_no_endpoints_503(gateway_factory):
    gw = gateway_factory(endpoints=[], name="noendpoints")
    r = request(gw.port, "POST", "/v1/completions", completion())
    _assert_openai_error(r, 503)
    r = request(gw.port, "GET", "/v1/models")
    assert r.status == 503


def test_endpoint_pointing_nowhere_503(gateway_factory):
    gw = gateway_factory(endpoints=["127.0.0.1:1"], name="nowhere")
    r = request(gw.port, "POST", "/v1/completions", completion())
    assert r.status == 503, r  # Envoy: upstream connection refused (UF)
    log = gw.access_log(lambda es: len(es) >= 1)
    assert log and "UF" in log[-1]["flags"], log[-1:]
    assert log[-1]["upstream_host"] == "127.0.0.1:1"


def test_oversize_413(gateway_factory):
    gw = gateway_factory(extra=["--max-request-body-bytes", "1000"], name="small")
    r = request(gw.port, "POST", "/v1/completions", completion(prompt="x" * 900))
    assert r.status == 413 or r.status == 200  # 900 + JSON overhead is just under/over: see next
    r = request(gw.port, "POST", "/v1/completions", completion(prompt="x" * 100))
    assert r.status == 200, r
    r = request(gw.port, "POST", "/v1/completions", completion(prompt="x" * 5000))
    _assert_openai_error(r, 413)
    # Model last in a big body: refused while held, never reaches a backend.
    r = request(gw.port, "POST", "/v1/completions", b'{"prompt":"' + b"y" * 200_000 + b'","model":"opt-stable"}')
    _assert_openai_error(r, 413)
    # Model first: routing began, the cap still ends it with 413 (HTTP/1.1 client sees it).
    r = request(gw.port, "POST", "/v1/completions", b'{"model":"opt-stable","prompt":"' + b"y" * 200_000 + b'"}')
    _assert_openai_error(r, 413)
    details = [e["details"] for e in gw.access_log(lambda es: sum(str(e["code"]) == "413" for e in es) >= 3)
               if str(e["code"]) == "413"]
    assert details and all("epp_request_body_too_large" in d for d in details), details


def test_rule_change_under_traffic(gateway_factory):
    gw = gateway_factory(name="rulechange")
    rule = gw.config_dir / "opt-stable.yaml"
    stop = threading.Event()
    results = []
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        local = []
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                r = request(gw.port, "POST", "/v1/completions", completion(), conn=conn)
                local.append((time.monotonic(), r.status, r.header("x-gateway-target-model"), r.json().get("model")))
            except Exception as e:
                local.append((time.monotonic(), -1, repr(e), None))
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    t_change = time.monotonic()
    # Promote the canary: one target, all traffic.
    stack.write_rule_atomically(rule, stack.rewrite_rule([(CANARY, 100)]))
    time.sleep(2.5)
    t_change2 = time.monotonic()
    # And back to a 50/50 split, written in place (not atomically) this time.
    rule.write_text(stack.rewrite_rule([(STABLE, 50), (CANARY, 50)]))
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    results.sort()
    errors = [r for r in results if r[1] != 200 or r[3] != "opt-stable"]
    assert not errors, f"{len(errors)} errors, first {errors[:3]}"
    before = [r for r in results if r[0] < t_change]
    assert before and collections.Counter(r[2] for r in before)[STABLE] > len(before) * 0.7
    # After the atomic rewrite: all canary from at most 1 s on.
    window = [r for r in results if t_change + 1.0 <= r[0] < t_change2]
    assert window and all(r[2] == CANARY for r in window), collections.Counter(r[2] for r in window)
    first_all_canary = min((r[0] for r in results if r[0] >= t_change and r[2] == CANARY
                            and all(x[2] == CANARY for x in results if r[0] <= x[0] < t_change2)), default=None)
    assert first_all_canary is not None and first_all_canary - t_change <= 1.0
    after = [r for r in results if r[0] >= t_change2 + 1.0]
    c = collections.Counter(r[2] for r in after)
    assert len(after) > 100 and 0.35 < c[STABLE] / len(after) < 0.65, c
    print(f"\nrule change: {len(results)} requests, 0 errors; canary-only after {first_all_canary - t_change:.3f}s; "
          f"then 50/50 → {dict(c)}")


def test_invalid_json_after_routing_began(seed_gateway):
    """Model first, garbage late in a large body: the client gets 400 and the backend never gets the whole request."""
    gw = seed_gateway
    gw.reset_backends()
    prompt = b"z" * (2 * 1024 * 1024)
    body = b'{"model":"opt-stable","prompt":"' + prompt + b'", oops this is not JSON }'
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head)
    # Send the start, give Envoy time to route and open the upstream request, then the rest.
    sock.sendall(body[:256 * 1024])
    time.sleep(0.5)
    mid = gw.backend_stats()
    try:
        sock.sendall(body[256 * 1024:])
    except OSError:
        pass
    sock.settimeout(10)
    resp = b""
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            resp += piece
    except socket.timeout:
        pass
    sock.close()
    head_part, _, rbody = resp.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 400"), resp[:500]
    assert b"connection: close" in head_part.lower()
    assert json.loads(rbody[: rbody.rfind(b"}") + 1])["error"]["code"] == 400
    time.sleep(0.5)
    stats = gw.backend_stats()
    # Early routing: the backend connection was already open during the upload ...
    assert any(s["running"] >= 0 for s in mid.values())
    # ... and the backend never completed a request: Envoy closed the upstream mid-body.
    assert sum(s["requests"] for s in stats.values()) == 0, stats
    incomplete = sum(s["incomplete"] for s in stats.values())
    partial = [b for s in stats.values() for b in s["incomplete_bytes"]]
    assert incomplete == 1, stats
    assert 0 < partial[0] < len(body), partial
    print(f"\nbackend saw {partial[0]} of {len(body)} bytes, then the upstream connection closed")


def test_invalid_json_after_routing_began_h2(seed_gateway):
    """Same over HTTP/2: Envoy sends the 400 then resets the stream (notes); either way no complete upstream request."""
    gw = seed_gateway
    gw.reset_backends()
    body = b'{"model":"opt-stable","prompt":"' + b"q" * (1024 * 1024) + b'" garbage'
    r = h2_request(gw.port, "POST", "/v1/completions", body, timeout=30)
    assert r.status == 400 or r.reset is not None, r
    if r.status == 400:
        assert json.loads(r.body)["error"]["code"] == 400
    time.sleep(0.5)
    stats = gw.backend_stats()
    assert sum(s["requests"] for s in stats.values()) == 0, stats


def test_demo_check_mode(backends):
    """demo/run-demo.sh --check (the README's demo) on free ports: ~200 requests, split printed, exit 0."""
    import subprocess
    port = stack.free_port()
    b1, b2 = f"127.0.0.2:{stack.free_port('127.0.0.2')}", f"127.0.0.3:{stack.free_port('127.0.0.3')}"
    out = subprocess.run([str(stack.DEMO / "run-demo.sh"), "--check", "--port", str(port), "--backends", f"{b1},{b2}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CHECK OK" in out.stdout
    assert "facebook/opt-125m-canary" in out.stdout and "restored to 'opt-stable': 200/200" in out.stdout


def test_broken_rule_file_keeps_last_good_rules(gateway_factory):
    """A broken manifest is reported (file and line) and the last good rules stay in force, no errors."""
    gw = gateway_factory(name="broken", rules=stack.rewrite_rule([(CANARY, None)]))
    rule = gw.config_dir / "opt-stable.yaml"
    for _ in range(20):
        r = request(gw.port, "POST", "/v1/completions", completion())
        assert r.status == 200 and r.header("x-gateway-target-model") == CANARY
    stack.write_rule_atomically(rule, "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n"
                                      "metadata: { name: opt-stable\nspec: [ unclosed\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "opt-stable.yaml" not in gw.epp.log_text():
        time.sleep(0.1)
    for _ in range(50):
        r = request(gw.port, "POST", "/v1/completions", completion())
        assert r.status == 200, r
        assert r.header("x-gateway-target-model") == CANARY and r.json()["model"] == "opt-stable"
    log = gw.epp.log_text()
    assert "opt-stable.yaml" in log and '"line"' in log, log[-2000:]
    # Fixing the file applies the new rule.
    stack.write_rule_atomically(rule, stack.rewrite_rule([(STABLE, None)]))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        r = request(gw.port, "POST", "/v1/completions", completion())
        if r.header("x-gateway-target-model") == STABLE:
            break
        time.sleep(0.05)
    assert r.header("x-gateway-target-model") == STABLE


def test_h2c_multiplexed_load(seed_gateway, tmp_path):
    """2,000 requests as 2 h2c connections × 50 concurrent streams (h2load) through Envoy: all 200."""
    import re
    import subprocess
    body = tmp_path / "req.json"
    body.write_bytes(completion(prompt="multiplexed " * 50))
    out = subprocess.run(["h2load", f"http://127.0.0.1:{seed_gateway.port}/v1/completions", "-n", "2000", "-c", "2",
                          "-m", "50", "-d", str(body), "-H", "content-type: application/json"],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    assert m and int(m.group(1)) == 2000, out


OBJECTIVES = ("---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
              "metadata: { name: batch }\nspec: { priority: -1, poolRef: { name: vllm-pool } }\n")


def test_load_aware_picking_and_shedding_through_envoy(gateway_factory, backends):
    """The picker scrapes the fake vLLMs' /metrics: the loaded one stops getting traffic, and a sheddable
    objective gets Envoy's 429 (the picker's ImmediateResponse) only while the whole pool is saturated."""
    gw = gateway_factory(name="load", rules=stack.SEED_RULE + OBJECTIVES)
    a, b = backends

    def set_load(backend, **load):
        stack.http_post(f"http://{backend.address}/fake/load", load)

    def served_by(n):
        out = collections.Counter()
        for i in range(n):
            r = request(gw.port, "POST", "/v1/completions", completion(prompt=f"load {i}"))
            assert r.status == 200, r.body[:300]
            out[r.headers["x-fake-backend"]] += 1
            time.sleep(0.02)  # a few per scrape interval, as traffic between two scrapes would be
        return out

    def settle(want, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = served_by(5)
            if set(got) == {want}:
                return
        pytest.fail(f"traffic did not settle on {want}: {got}")

    try:
        set_load(a, waiting=8, kv=0.9)
        set_load(b, waiting=0, kv=0.1)
        settle(b.address)
        assert served_by(20) == {b.address: 20}
        # Every mix of old and new samples favours A too (A 0/0.0 beats B's old 0/0.1, B 10 is worse than
        # A's old 8), so a streak on A means the flip is done.
        set_load(a, waiting=0, kv=0.0)
        set_load(b, waiting=10, kv=0.95)
        settle(a.address)
        assert served_by(20) == {a.address: 20}

        # Both full: sheddable requests are refused by Envoy with the picker's 429, others still go through.
        set_load(a, waiting=10, kv=0.9)
        set_load(b, waiting=10, kv=0.9)
        deadline = time.monotonic() + 10
        while True:
            r = request(gw.port, "POST", "/v1/completions", completion(),
                        headers={"x-gateway-inference-objective": "batch"})
            if r.status == 429 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status == 429, (r.status, r.body[:300])
        err = json.loads(r.body)["error"]
        assert err["code"] == 429 and err["type"] == "too_many_requests", err
        assert request(gw.port, "POST", "/v1/completions", completion()).status == 200
        entries = gw.access_log(lambda es: any("epp_pool_saturated" in e["details"] for e in es))
        assert any("epp_pool_saturated" in e["details"] and str(e["code"]) == "429" for e in entries), entries[-3:]
    finally:
        set_load(a)
        set_load(b)


def test_sheddable_request_waits_for_room_through_envoy(gateway_factory, backends):
    """With --sheddable-queue-timeout, a sheddable request that meets a saturated pool is held by the picker (Envoy
    keeps the client waiting, FULL_DUPLEX_STREAMED has no message timeout) and reaches a backend once the load
    drops; with the pool still full at the timeout the client gets the picker's 429."""
    gw = gateway_factory(name="queue", rules=stack.SEED_RULE + OBJECTIVES, extra=["--sheddable-queue-timeout", "2"])
    a, b = backends

    def set_loads(**load):
        for x in backends:
            stack.http_post(f"http://{x.address}/fake/load", load)

    def avg_queue():
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.epp.metrics_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("inference_pool_average_queue_size{"):
                    return float(line.rsplit(" ", 1)[1])

    def wait_avg_queue(want):
        deadline = time.monotonic() + 10
        while avg_queue() != want:
            assert time.monotonic() < deadline, f"picker's average queue {avg_queue()}, want {want}"
            time.sleep(0.05)

    batch = {"x-gateway-inference-objective": "batch"}
    try:
        set_loads(waiting=10, kv=0.9)
        wait_avg_queue(10.0)
        with ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            held = pool.submit(request, gw.port, "POST", "/v1/completions", completion(prompt="queued"), batch)
            time.sleep(1.0)
            assert not held.done(), f"answered while the pool was saturated: {held.result().status}"
            set_loads()
            r = held.result(timeout=10)
            waited = time.monotonic() - t0
        assert r.status == 200, r.body[:300]
        assert json.loads(r.body)["model"] == "opt-stable"
        assert r.headers["x-fake-backend"] in (a.address, b.address)
        assert waited >= 1.0
        # Still full when the timeout comes: 429 from the picker, through Envoy.
        set_loads(waiting=10, kv=0.9)
        wait_avg_queue(10.0)
        t0 = time.monotonic()
        r = request(gw.port, "POST", "/v1/completions", completion(prompt="times out"), headers=batch)
        assert r.status == 429, (r.status, r.body[:300])
        assert 1.8 <= time.monotonic() - t0 < 6
        assert json.loads(r.body)["error"]["type"] == "too_many_requests"
    finally:
        set_loads()


def test_prefix_affinity_through_envoy(seed_gateway):
    """Requests sharing a long prompt prefix land on one backend (its KV cache has the prefix), while
    different prefixes still use both backends; the fake backends report equal, idle load."""
    system = "You are a helpful assistant who answers briefly. " * 24
    for b in seed_gateway.backends:  # equal, idle load, and time for the picker to scrape it
        stack.http_post(f"http://{b.address}/fake/load", {})
    time.sleep(1.0)
    homes = {}
    for j in range(14):
        dests = set()
        for i in range(4):
            r = request(seed_gateway.port, "POST", "/v1/completions",
                        completion(model=STABLE, prompt=f"conversation {j:02d}: {system} question {i}"))
            assert r.status == 200, r.body[:300]
            dests.add(r.headers["x-fake-backend"])
            time.sleep(0.02)
        assert len(dests) == 1, f"conversation {j} spread over {dests}"
        homes[j] = dests.pop()
    assert len(set(homes.values())) == 2, homes


def test_tracing_through_envoy_backend_continues_the_trace(gateway_factory):
    """A client's sampled traceparent through Envoy: the picker exports its spans to an OTLP/HTTP
    collector (stand-in: otlp_receiver.py) and the vLLM backend receives a traceparent in the same
    trace whose parent is the picker's gateway.request span, so the backend's spans nest under it."""
    from otlp_receiver import Receiver, attributes
    collector = Receiver()
    try:
        gw = gateway_factory(name="traced", extra=["--tracing", "--tracing-endpoint", collector.url,
                                                   "--tracing-sample-ratio", "0", "--tracing-export-interval", "100ms"])
        trace, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        r = request(gw.port, "POST", "/v1/completions", completion(model="opt-stable"),
                    headers={"traceparent": f"00-{trace}-{parent}-01"})
        assert r.status == 200, r
        seen = dict((k.lower(), v) for k, v in r.json()["echo"]["headers"])["traceparent"]
        _, seen_trace, seen_parent, flags = seen.split("-")
        assert seen_trace == trace and flags == "01" and seen_parent != parent
        spans = collector.wait_spans(lambda s: any(x.name == "gateway.request" for _, x in s))
        root = next(x for _, x in spans if x.name == "gateway.request")
        assert root.trace_id.hex() == trace and root.parent_span_id.hex() == parent
        assert root.span_id.hex() == seen_parent
        a = attributes(root)
        assert a["gen_ai.request.model"] == "opt-stable" and a["gateway.target_model"] in TARGETS
        assert a["gateway.destination_endpoint"] == r.json()["echo"]["destination"]
        # Unsampled: the client's traceparent reaches the backend untouched and nothing is exported.
        before = len(collector.spans)
        r = request(gw.port, "POST", "/v1/completions", completion(model="opt-stable"),
                    headers={"traceparent": f"00-{trace}-{parent}-00"})
        seen = dict((k.lower(), v) for k, v in r.json()["echo"]["headers"])["traceparent"]
        assert seen == f"00-{trace}-{parent}-00"
        time.sleep(0.5)
        assert len(collector.spans) == before
    finally:
        collector.close()
