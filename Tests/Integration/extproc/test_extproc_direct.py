"""Direct ext_proc Process-stream tests (grpcio + xds-protos), driving the picker the way Envoy 1.40 does."""
import asyncio
import collections
import json
import random

import grpc
import pytest

from extproc_lib import (ENDPOINTS, BUFFERED, FULL_DUPLEX, NONE, PROCESS, STREAMED, UUID4, Stream, destination, full_request,
                         joined_request_body, kind, req_body, req_headers, req_trailers, resp_body, resp_headers,
                         resp_trailers, set_headers, splice, streamed_body, top_model)

STABLE, CANARY = "facebook/opt-125m", "facebook/opt-125m-canary"


def run(epp, coro_fn, timeout=120):
    async def main():
        async with grpc.aio.insecure_channel(epp.address) as ch:
            return await asyncio.wait_for(coro_fn(ch), timeout)
    return asyncio.run(main())


def body_of(model="alias", prompt="hello", **extra):
    d = {"model": model, "prompt": prompt}
    d.update(extra)
    return json.dumps(d).encode()


def test_one_byte_chunks(epp):
    body = b'{ "model" : "alias", "prompt": "one byte at a time \\" \\\\ \\u00e9", "max_tokens": 7 }'

    async def go(ch):
        return await full_request(ch, body, chunk=1)
    reqs, resps, code = run(epp, go)
    assert code == grpc.StatusCode.OK
    assert kind(reqs[0]) == "request_headers"
    hdr, md = destination(reqs[0])
    assert hdr in ENDPOINTS and md == hdr
    assert joined_request_body(reqs) == splice(body, b'"alias"', "backend-model")
    assert all(kind(r) == "request_body" for r in reqs[1:])


def test_model_after_1mib_prompt(epp):
    prompt = b"p" * (1024 * 1024)
    body = b'{"prompt":"' + prompt + b'","max_tokens":3,"model":"alias"}'
    chunk = 32 * 1024
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]

    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers())
        for p in pieces[:-1]:
            await s.send(req_body(p))
        # The model is in the last chunk: nothing may come back before it.
        assert await s.no_reply_within(0.5)
        await s.send(req_body(pieces[-1]))
        first = await s.recv_pending()
        assert kind(first) == "request_headers"
        await s.send(req_body(b"", eos=True))
        rest = await s.collect_request()
        return [first] + rest
    replies = run(epp, go)
    assert destination(replies[0])[0] in ENDPOINTS
    sizes = [len(streamed_body(r)[0]) for r in replies[1:]]
    assert max(sizes) <= 62000, max(sizes)
    assert joined_request_body(replies) == splice(body, b'"alias"', "backend-model")


def test_nested_model_keys_untouched(epp):
    body = (b'{"metadata":{"model":"alias","inner":{"model":"alias"}},"messages":[{"role":"user","model":"alias",'
            b'"content":"hi"}],"model":"alias","extra":{"model":"alias"}}')

    async def go(ch):
        return await full_request(ch, body, chunk=7, path="/v1/chat/completions")
    reqs, _, code = run(epp, go)
    out = joined_request_body(reqs)
    d = json.loads(out)
    assert d["model"] == "backend-model"
    assert d["metadata"]["model"] == d["metadata"]["inner"]["model"] == d["messages"][0]["model"] == "alias"
    assert d["extra"]["model"] == "alias"
    assert out == body.replace(b'"model":"alias","extra"', b'"model":"backend-model","extra"')


def test_unicode_escapes(epp):
    async def go(ch):
        out = []
        # escaped key, escaped value → model "alias"
        b1 = b'{"mod\\u0065l":"ali\\u0061s","prompt":"x"}'
        out.append((b1, await full_request(ch, b1, chunk=3)))
        # non-ASCII model spelled with an escape → the "café" rule
        b2 = b'{"model":"caf\\u00e9","prompt":"x"}'
        out.append((b2, await full_request(ch, b2, chunk=5)))
        # the same model in raw UTF-8
        b3 = '{"model":"café","prompt":"x"}'.encode()
        out.append((b3, await full_request(ch, b3, chunk=2)))
        # escaped characters in an unknown model: passes unchanged (still routed)
        b4 = b'{"model":"we\\"ird\\\\model\\n\\ud83d\\ude00","prompt":"x"}'
        out.append((b4, await full_request(ch, b4, chunk=4)))
        return out
    res = run(epp, go)
    (b1, (r1, _, _)), (b2, (r2, _, _)), (b3, (r3, _, _)), (b4, (r4, _, _)) = res
    assert joined_request_body(r1) == b'{"mod\\u0065l":"backend-model","prompt":"x"}'
    assert json.loads(joined_request_body(r2))["model"] == "cafe-backend"
    assert joined_request_body(r2) == b'{"model":"cafe-backend","prompt":"x"}'
    assert joined_request_body(r3) == b'{"model":"cafe-backend","prompt":"x"}'
    assert joined_request_body(r4) == b4
    assert destination(r4[0])[0] in ENDPOINTS


def test_byte_for_byte_preservation(epp):
    rnd = random.Random(7)
    body = (b'{\n  "stream" :false ,\t"n": 1.0e10, "t": 0.1000000000000000055511151231257827,\r\n'
            b'  "big": 123456789012345678901234567890, "neg": -0, "u": "\\u00e9\\ud83d\\ude00\\/", "arr": [1 , 2,{"a":[]}],'
            b'  "model"   :   "alias"  , "prompt": "' + bytes(rnd.choice(b"abc xyz") for _ in range(5000)) + b'",'
            b'  "dup": 1, "dup": 2, "nul": null, "e": {} }')

    async def go(ch):
        outs = []
        for chunk in (1, 13, 64, 4096, None):
            outs.append(await full_request(ch, body, chunk=chunk))
        return outs
    expected = splice(body, b'"alias"', "backend-model")
    for reqs, _, code in run(epp, go):
        assert code == grpc.StatusCode.OK
        assert joined_request_body(reqs) == expected


def test_buffered_mode_routes_in_body_reply(epp):
    body = body_of(prompt="buffered " * 100)

    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers(mode=BUFFERED))
        h = await s.recv()
        await s.send(req_body(body, eos=True))
        b = await s.recv()
        await s.send(resp_headers(), resp_body(json.dumps({"model": "backend-model"}).encode(), eos=True))
        rh, rb = await s.recv(), await s.recv()
        rest, code = await s.close()
        return h, b, rh, rb, rest, code
    h, b, rh, rb, rest, code = run(epp, go)
    assert kind(h) == "request_headers"
    assert "x-gateway-destination-endpoint" not in set_headers(h.request_headers.response)
    assert kind(b) == "request_body"
    common = b.request_body.response
    hdr = set_headers(common)["x-gateway-destination-endpoint"]
    assert hdr in ENDPOINTS and common.clear_route_cache
    assert destination(b) == (hdr, hdr)
    assert common.body_mutation.body == splice(body, b'"alias"', "backend-model")
    assert set_headers(rh.response_headers.response)["x-gateway-target-model"] == "backend-model"
    assert json.loads(rb.response_body.response.body_mutation.body)["model"] == "alias"
    assert rest == [] and code == grpc.StatusCode.OK


def test_streamed_mode(epp):
    body = b'{"prompt":"' + b"s" * 3000 + b'","model":"alias","max_tokens":1}'
    pieces = [body[i:i + 1000] for i in range(0, len(body), 1000)]

    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers(mode=STREAMED))
        h = await s.recv()
        outs = []
        for i, p in enumerate(pieces):
            await s.send(req_body(p, eos=i == len(pieces) - 1))
            outs.append(await s.recv())
        rest, code = await s.close()
        return h, outs, rest, code
    h, outs, rest, code = run(epp, go)
    assert kind(h) == "request_headers" and destination(h)[0] in ENDPOINTS  # STREAMED routes on headers
    assert len(outs) == len(pieces) and all(kind(o) == "request_body" for o in outs)
    got = b""
    for o, p in zip(outs, pieces):
        bm = o.request_body.response.body_mutation
        got += bm.body if bm.WhichOneof("mutation") == "body" else p
    assert got == splice(body, b'"alias"', "backend-model")
    assert code == grpc.StatusCode.OK


def test_none_mode_routes_on_headers(epp):
    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers(mode=NONE))
        h = await s.recv(timeout=3)
        await s.send(resp_headers())
        rh = await s.recv(timeout=3)
        rest, code = await s.close()
        return h, rh, rest, code
    h, rh, rest, code = run(epp, go)
    assert kind(h) == "request_headers" and destination(h)[0] in ENDPOINTS
    assert kind(rh) == "response_headers" and rest == [] and code == grpc.StatusCode.OK


def test_thousand_concurrent_streams(epp):
    n = 1000

    async def go(ch):
        async def one(i):
            return await full_request(ch, body_of(model="opt-stable", prompt=f"req {i}"), chunk=40)
        return await asyncio.gather(*(one(i) for i in range(n)))
    results = run(epp, go, timeout=180)
    assert len(results) == n
    targets = collections.Counter()
    for reqs, resps, code in results:
        assert code == grpc.StatusCode.OK
        assert destination(reqs[0])[0] in ENDPOINTS
        t = top_model(joined_request_body(reqs))
        targets[t] += 1
        rh = [r for r in resps if kind(r) == "response_headers"][0]
        assert set_headers(rh.response_headers.response)["x-gateway-target-model"] == t
        restored = b"".join(streamed_body(r)[0] for r in resps if kind(r) == "response_body")
        assert json.loads(restored)["model"] == "opt-stable"
    assert set(targets) == {STABLE, CANARY} and 50 <= targets[CANARY] <= 160, targets


def test_early_routing_before_body_ends(epp):
    head = b'{"model":"alias","prompt":"'

    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers(), req_body(head))
        # The headers reply must come now, before the client sends any more of the body.
        h = await s.recv(timeout=3)
        b1 = await s.recv(timeout=3)
        await s.send(req_body(b"x" * 100_000))
        b2 = []
        while sum(len(streamed_body(r)[0]) for r in b2) < 100_000:
            b2.append(await s.recv(timeout=3))
        await s.send(req_body(b'"}', eos=True))
        b3 = await s.collect_request()
        rest, code = await s.close()
        return h, b1, b2, b3, code
    h, b1, b2, b3, code = run(epp, go)
    assert kind(h) == "request_headers" and destination(h)[0] in ENDPOINTS
    assert kind(b1) == "request_body"
    assert streamed_body(b1)[0] == b'{"model":"backend-model","prompt":"'
    assert b"".join(streamed_body(r)[0] for r in b2) == b"x" * 100_000
    assert joined_request_body(b3) == b'"}' and streamed_body(b3[-1])[1]


def test_one_reply_per_message_in_wire_order_with_trailers(epp):
    body = body_of(model="alias", prompt="t" * 200)

    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers(), req_body(body[:50]), req_body(body[50:]), req_trailers())
        await asyncio.sleep(0.2)
        await s.send(resp_headers(), resp_body(b'{"model":"backend-model",'), resp_body(b'"x":1}'), resp_trailers())
        rest, code = await s.close()
        return rest, code
    replies, code = run(epp, go)
    kinds = [kind(r) for r in replies]
    assert code == grpc.StatusCode.OK
    assert kinds.count("request_headers") == 1 and kinds.count("request_trailers") == 1
    assert kinds.count("response_headers") == 1 and kinds.count("response_trailers") == 1
    order = {"request_headers": 0, "request_body": 1, "request_trailers": 2, "response_headers": 3,
             "response_body": 4, "response_trailers": 5}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds), kinds
    req_bodies = [r for r in replies if kind(r) == "request_body"]
    assert not streamed_body(req_bodies[-1])[1]  # trailers follow: end_of_stream false
    assert joined_request_body(replies) == splice(body, b'"alias"', "backend-model")
    resp = b"".join(streamed_body(r)[0] for r in replies if kind(r) == "response_body")
    assert json.loads(resp) == {"model": "alias", "x": 1}


def test_get_routed_at_once(epp):
    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers("/v1/models", method="GET", eos=True))
        h = await s.recv(timeout=3)
        await s.send(resp_headers(), resp_body(b'{"data":[]}', eos=True))
        rest = [await s.recv(), await s.recv()]
        more, code = await s.close()
        return h, rest + more, code
    h, rest, code = run(epp, go)
    assert kind(h) == "request_headers"
    hdr, md = destination(h)
    assert hdr in ENDPOINTS and hdr == md
    assert h.request_headers.response.clear_route_cache
    assert [kind(r) for r in rest] == ["response_headers", "response_body"]
    assert code == grpc.StatusCode.OK


def test_subset_hint(epp):
    async def go(ch):
        picks = []
        for _ in range(20):
            s = Stream(ch)
            await s.send(req_headers("/v1/models", method="GET", eos=True, subset=[ENDPOINTS[1]]))
            picks.append(destination(await s.recv()))
            await s.close()
        s = Stream(ch)
        await s.send(req_headers("/v1/models", method="GET", eos=True, subset=[ENDPOINTS[0], ENDPOINTS[2]]))
        two = destination(await s.recv())[0]
        await s.close()
        s = Stream(ch)
        await s.send(req_headers("/v1/models", method="GET", eos=True, subset=[]))
        empty = await s.recv()
        await s.close()
        s = Stream(ch)
        await s.send(req_headers(subset=["10.200.0.9:8000"]), req_body(body_of(), eos=True))
        unknown = await s.recv()
        await s.close()
        return picks, two, empty, unknown
    picks, two, empty, unknown = run(epp, go)
    assert all(p == (ENDPOINTS[1], ENDPOINTS[1]) for p in picks), picks
    assert two in (ENDPOINTS[0], ENDPOINTS[2])
    for r in (empty, unknown):
        assert kind(r) == "immediate_response", r
        assert r.immediate_response.status.code == 503
        assert json.loads(r.immediate_response.body)["error"]["code"] == 503


def test_request_id_forwarded_or_generated(epp):
    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers("/v1/models", method="GET", eos=True, headers={"x-request-id": "client-id-1"}))
        with_id = await s.recv()
        await s.close()
        s = Stream(ch)
        await s.send(req_headers("/v1/models", method="GET", eos=True))
        without = await s.recv()
        await s.close()
        s = Stream(ch)
        await s.send(req_headers(), req_body(b"{bad", eos=True))
        err = await s.recv()
        await s.close()
        return with_id, without, err
    with_id, without, err = run(epp, go)
    hs = set_headers(with_id.request_headers.response)
    assert hs.get("x-request-id", "client-id-1") == "client-id-1"
    gen = set_headers(without.request_headers.response).get("x-request-id")
    assert gen and UUID4.fullmatch(gen), gen
    assert kind(err) == "immediate_response"
    ids = {h.header.key: h.header.raw_value for h in err.immediate_response.headers.set_headers}
    assert UUID4.fullmatch(ids.get("x-request-id", b"").decode()), ids


async def _target_for(ch, headers=None, body=None):
    s = Stream(ch)
    await s.send(req_headers(headers=headers), req_body(body or body_of(model="opt-stable"), eos=True))
    reqs = await s.collect_request()
    await s.close()
    return top_model(joined_request_body(reqs))


@pytest.mark.parametrize("flag,how", [("x-session-id", "header"), ("body:user", "body")])
def test_sticky_split_across_processes(epp_factory, flag, how):
    a = epp_factory(extra=["--split-affinity-header", flag], name="sticky-a")
    b = epp_factory(extra=["--split-affinity-header", flag], name="sticky-b")
    ids = [f"user-{i}" for i in range(2000)]

    def ask(i):
        if how == "header":
            return {"headers": {"x-session-id": i}}
        return {"body": json.dumps({"model": "opt-stable", "prompt": "p", "user": i}).encode()}

    async def sweep(ch, subset):
        return [await _target_for(ch, **ask(i)) for i in subset]
    first = run(a, lambda ch: sweep(ch, ids))
    again = run(a, lambda ch: sweep(ch, ids[:200]))
    other = run(b, lambda ch: sweep(ch, ids[:500]))
    assert again == first[:200]
    assert other == first[:500]
    c = collections.Counter(first)
    share = c[CANARY] / len(ids)
    assert 0.07 <= share <= 0.13, c


def test_unsticky_split_varies(epp):
    async def go(ch):
        return [await _target_for(ch, headers={"x-session-id": "same"}) for _ in range(200)]
    c = collections.Counter(run(epp, go))
    assert c[STABLE] > 0 and c[CANARY] > 0, c  # without the flag: random per request


def test_model_name_rewrite_header_seeds_target(epp):
    async def go(ch):
        seeded = await _target_for(ch, headers={"x-gateway-model-name-rewrite": "seeded-model"},
                                   body=body_of(model="no-rule-model"))
        llmd = await _target_for(ch, headers={"x-llm-d-model-name-rewrite": "seeded-2"},
                                 body=body_of(model="no-rule-model"))
        ruled = await _target_for(ch, headers={"x-gateway-model-name-rewrite": "seeded-model"},
                                  body=body_of(model="alias"))
        return seeded, llmd, ruled
    seeded, llmd, ruled = run(epp, go)
    assert seeded == "seeded-model" and llmd == "seeded-2"
    assert ruled == "backend-model"  # a matching rule overrides the header


def _sse(model, n=4):
    evs = [b'data: {"id":"c","object":"text_completion","model":"' + model.encode() + b'","choices":[{"text":"t%d"}]}\n\n' % i
           for i in range(n)]
    return b"".join(evs) + b"data: [DONE]\n\n"


def test_response_restore_sse_split_everywhere(epp):
    sse = _sse("backend-model")

    async def go(ch):
        outs = []
        for size in (1, 2, 3, 7, 16, 61):
            parts = [sse[i:i + size] for i in range(0, len(sse), size)]
            s = Stream(ch)
            await s.send(req_headers(), req_body(body_of(stream=True), eos=True))
            await s.collect_request()
            await s.send(resp_headers(content_type="text/event-stream"))
            rh = await s.recv()
            got = b""
            for i, p in enumerate(parts):
                await s.send(resp_body(p, eos=i == len(parts) - 1))
            while True:
                r = await s.recv()
                got += streamed_body(r)[0]
                if streamed_body(r)[1]:
                    break
            await s.close()
            outs.append((rh, got))
        return outs
    for rh, got in run(epp, go):
        assert set_headers(rh.response_headers.response)["x-gateway-target-model"] == "backend-model"
        assert got == sse.replace(b"backend-model", b"alias"), got


def test_response_chunks_echoed_promptly(epp):
    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers(), req_body(body_of(stream=True), eos=True))
        await s.collect_request()
        await s.send(resp_headers(content_type="text/event-stream"))
        await s.recv()
        ev = b'data: {"model":"backend-model","choices":[]}\n\n'
        await s.send(resp_body(ev))
        r = await s.recv(timeout=2)  # echoed before the stream ends
        await s.send(resp_body(b"data: [DONE]\n\n", eos=True))
        await s.recv()
        await s.close()
        return r
    r = run(epp, go)
    assert streamed_body(r)[0] == b'data: {"model":"alias","choices":[]}\n\n'


def test_restore_model_alias_false(epp_factory):
    e = epp_factory(extra=["--restore-model-alias=false"], name="norestore")
    sse = _sse("backend-model")

    async def go(ch):
        reqs, resps, code = await full_request(ch, body_of(), response_chunks=[sse[:30], sse[30:]])
        return resps
    resps = run(e, go)
    rh = [r for r in resps if kind(r) == "response_headers"][0]
    assert set_headers(rh.response_headers.response)["x-gateway-target-model"] == "backend-model"
    assert b"".join(streamed_body(r)[0] for r in resps if kind(r) == "response_body") == sse


def test_garbage_on_one_stream_others_keep_working(epp):
    async def go(ch):
        good = Stream(ch)
        await good.send(req_headers(), req_body(b'{"model":"alias",'))
        h = await good.recv()
        raw = ch.stream_stream(PROCESS, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        bad = raw(iter([b"\xff\xff\xff\xff garbage \x00\x01"]))
        bad_code = None
        try:
            async for _ in bad:
                pass
        except grpc.aio.AioRpcError as e:
            bad_code = e.code()
        if bad_code is None:
            bad_code = await bad.code()
        # A stream that sends a body before headers breaks the protocol: error for it only.
        wrong = Stream(ch)
        await wrong.send(req_body(b"{}", eos=True))
        wrong_code = None
        try:
            await wrong.recv()
            wrong_code = await wrong.call.code()
        except grpc.aio.AioRpcError as e:
            wrong_code = e.code()
        await good.send(req_body(b'"prompt":"x"}', eos=True))
        rest = await good.collect_request()
        _, code = await good.close()
        after = await full_request(ch, body_of())
        return h, rest, code, bad_code, wrong_code, after
    h, rest, code, bad_code, wrong_code, after = run(epp, go)
    assert bad_code not in (None, grpc.StatusCode.OK), bad_code
    assert wrong_code not in (None, grpc.StatusCode.OK), wrong_code
    assert kind(h) == "request_headers" and code == grpc.StatusCode.OK
    assert joined_request_body([h] + rest) == b'{"model":"backend-model","prompt":"x"}'
    assert after[2] == grpc.StatusCode.OK


def test_errors_are_immediate_responses(epp):
    async def one(ch, body, path="/v1/completions"):
        s = Stream(ch)
        await s.send(req_headers(path), req_body(body, eos=True))
        r = await s.recv()
        _, code = await s.close()
        return r, code

    async def go(ch):
        return [await one(ch, b'{"model":"alias","prompt":'), await one(ch, b'{"prompt":"x"}'),
                await one(ch, b'{"model":["x"],"prompt":"x"}'), await one(ch, b'{"model":"alias"}'),
                await one(ch, b'{"model":"alias","input":"x"}', "/v1/embeddings"),
                await one(ch, b'not json', "/v1/other/path")]
    res = run(epp, go)
    for r, code in res[:4]:
        assert kind(r) == "immediate_response" and r.immediate_response.status.code == 400, r
        err = json.loads(r.immediate_response.body)["error"]
        assert err["code"] == 400 and err["type"] and err["message"]
        assert r.immediate_response.details
        assert code == grpc.StatusCode.OK
    assert kind(res[4][0]) == "request_headers"
    # Unknown API paths pass through without a model.
    assert kind(res[5][0]) == "request_headers"


def test_client_resets_do_not_kill_connection(epp):
    """Envoy ends every Process stream with RST_STREAM(CANCEL) once the HTTP request is done (ext_proc
    client: closeStream + resetStream). 2,500 such streams on one h2c connection at full speed must not
    get the connection torn down (GOAWAY) — that gives Envoy's clients 500s."""
    import socket
    import struct
    import time
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    msg = req_headers("/v1/models", method="GET", eos=True).SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(msg)) + msg
    sock = socket.create_connection(("127.0.0.1", epp.grpc_port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    sock.sendall(c.data_to_send())
    goaway = None
    done = 0
    deadline = time.monotonic() + 120
    try:
        for i in range(2500):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", PROCESS), (":authority", "epp"),
                                 ("content-type", "application/grpc"), ("te", "trailers")])
            c.send_data(sid, frame)
            sock.sendall(c.data_to_send())
            got = False
            while not got and goaway is None and time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    goaway = "connection closed"
                    break
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                        got = True
                        c.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        goaway = ev
            if goaway is not None:
                break
            c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            sock.sendall(c.data_to_send())
            done += 1
    finally:
        sock.close()
    assert goaway is None, f"connection torn down after {done} streams: {goaway}"


def test_content_length_kept_true(epp):
    """Other gateways forward content-length: the routing reply corrects it for the rewritten body, and the
    response headers drop it when the alias restore may change the response length."""
    body = body_of(model="alias", prompt="len")

    async def go(ch):
        s = Stream(ch)
        await s.send(req_headers(headers={"content-length": str(len(body))}), req_body(body), req_body(b"", eos=True))
        reqs = await s.collect_request()
        await s.send(resp_headers())
        rh = await s.recv()
        await s.send(resp_body(b'{"model":"backend-model"}', eos=True))
        rb = await s.recv()
        await s.close()
        return reqs, rh, rb
    reqs, rh, rb = run(epp, go)
    out = joined_request_body(reqs)
    assert out == splice(body, b'"alias"', "backend-model")
    assert set_headers(reqs[0].request_headers.response).get("content-length") == str(len(out))
    mutation = rh.response_headers.response.header_mutation
    assert "content-length" in list(mutation.remove_headers)
    assert streamed_body(rb)[0] == b'{"model":"alias"}'


def test_body_cap_413_direct(epp_factory):
    e = epp_factory(extra=["--max-request-body-bytes=2000"], name="cap")

    async def go(ch):
        out = []
        for body in (body_of(prompt="a" * 1000), body_of(prompt="a" * 5000),
                     b'{"prompt":"' + b"b" * 5000 + b'","model":"alias"}'):
            s = Stream(ch)
            await s.send(req_headers())
            replies, sent, done = [], 0, False
            for i in range(0, len(body) + 1, 700):
                piece = body[i:i + 700]
                await s.send(req_body(piece, eos=i + 700 > len(body)))
                sent += len(piece)
                if sent > 2000 or i + 700 > len(body):
                    # Over the cap (or at the end): read until the verdict before sending more, as Envoy
                    # stops sending once the picker ended the stream.
                    while not done:
                        r = await s.recv(timeout=5)
                        if r is None:
                            break
                        replies.append(r)
                        done = kind(r) == "immediate_response" or (kind(r) == "request_body" and streamed_body(r)[1])
                    break
            out.append(replies)
        return out
    ok, big_first, big_last = run(e, go)
    assert kind(ok[0]) == "request_headers"
    for replies in (big_first, big_last):
        r = replies[-1]
        assert kind(r) == "immediate_response" and r.immediate_response.status.code == 413, r
        assert json.loads(r.immediate_response.body)["error"]["code"] == 413


async def _exchange(ch, body, headers=None, content_type="application/json", response_parts=(), resp_extra=None):
    s = Stream(ch)
    await s.send(req_headers(headers=headers), req_body(body, eos=True))
    reqs = await s.collect_request()
    rh_msg = resp_headers(content_type=content_type)
    for k, v in (resp_extra or {}).items():
        rh_msg.response_headers.headers.headers.add(key=k, raw_value=v.encode())
    await s.send(rh_msg)
    rh = await s.recv()
    out = b""
    for i, p in enumerate(response_parts):
        await s.send(resp_body(p, eos=i == len(response_parts) - 1))
    while response_parts:
        r = await s.recv()
        out += streamed_body(r)[0]
        if streamed_body(r)[1]:
            break
    await s.close()
    return reqs, rh, out


def test_restore_escapes_client_model(epp):
    """The client's model had escapes; the restored response value must be valid JSON naming the same string."""
    client_body = b'{"model":"we\\"ird \\u00e9 \\\\ name","prompt":"x"}'
    client_model = json.loads(client_body)["model"]

    async def go(ch):
        return await _exchange(ch, client_body, headers={"x-gateway-model-name-rewrite": "backend-model"},
                               response_parts=[b'{"id":"1","model":"backend-model","choices":[]}'])
    reqs, rh, out = run(epp, go)
    assert top_model(joined_request_body(reqs)) == "backend-model"
    assert json.loads(out)["model"] == client_model, out


def test_non_json_and_compressed_responses_pass_through(epp):
    import gzip
    html = b"<html><body>model: backend-model \"model\":\"backend-model\"</body></html>"
    gz = gzip.compress(b'{"model":"backend-model","choices":[]}' * 50)

    async def go(ch):
        a = await _exchange(ch, body_of(), content_type="application/json", response_parts=[html])
        b = await _exchange(ch, body_of(), content_type="application/json", response_parts=[gz[:100], gz[100:]],
                            resp_extra={"content-encoding": "gzip"})
        return a, b
    (_, _, html_out), (_, _, gz_out) = run(epp, go)
    assert html_out == html
    assert gz_out == gz


def _held_bytes(epp):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("inference_extension_held_request_body_bytes "):
                return float(line.split()[1])
    raise AssertionError("inference_extension_held_request_body_bytes not exported")


def test_held_body_budget_refuses_only_the_request_that_overflows(epp_factory):
    """Bodies whose model comes after the prompt are held until the model arrives (the OpenAI Python
    SDK writes `messages` first). The bytes held across all streams are capped: the request whose
    chunk would pass the cap gets 503, the one already held loses nothing, and the budget comes back
    when requests end — routed, refused or cancelled."""
    from conftest import RULES
    batch = ("apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
             "metadata: { name: batch }\nspec:\n  priority: -1\n  poolRef: { name: vllm-pool }\n")
    e = epp_factory(extra=["--max-held-request-body-bytes=1000000"], rules=RULES + "---\n" + batch, name="heldcap")
    chunk = 32 * 1024

    def late_body(fill, n=600_000):
        return b'{"prompt":"' + fill * n + b'","max_tokens":1,"model":"alias"}'

    body_a, body_b = late_body(b"a"), late_body(b"b")
    head_a, tail_a = body_a[:-30], body_a[-30:]  # the model is in the tail

    async def send_chunks(s, data):
        for i in range(0, len(data), chunk):
            await s.send(req_body(data[i:i + chunk]))

    async def go(ch):
        a = Stream(ch)
        await a.send(req_headers())
        await send_chunks(a, head_a)
        assert await a.no_reply_within(0.5)  # held: no model yet
        held_a = _held_bytes(e)
        assert held_a == len(head_a), held_a

        # B needs 600 KB held beside A's 600 KB: refused once its chunks pass the remaining 400 KB.
        b = Stream(ch)
        await b.send(req_headers())
        sent = 0
        while sent <= 1_000_000 - len(head_a):
            await b.send(req_body(body_b[sent:sent + chunk]))
            sent += chunk
        refused = await b.recv()
        assert kind(refused) == "immediate_response", refused
        assert refused.immediate_response.status.code == 503
        err = json.loads(refused.immediate_response.body)["error"]
        assert err["code"] == 503 and "1000000 bytes" in err["message"], err
        assert refused.immediate_response.details == "epp_held_body_budget_exhausted"
        assert _held_bytes(e) == len(head_a)  # B's reservation returned, A's kept

        # A goes on: routed once its model arrives, every byte forwarded with only the model changed.
        await a.send(req_body(tail_a, eos=True))
        first = await a.recv_pending()
        assert kind(first) == "request_headers" and destination(first)[0] in ENDPOINTS
        rest = await a.collect_request()
        assert joined_request_body([first] + rest) == splice(body_a, b'"alias"', "backend-model")
        await a.close()
        assert _held_bytes(e) == 0

        # With A done, the same 600 KB body that was refused fits.
        c = Stream(ch)
        await c.send(req_headers())
        await send_chunks(c, body_b[:-30])
        await c.send(req_body(body_b[-30:], eos=True))
        replies = await c.collect_request()
        assert kind(replies[0]) == "request_headers"
        assert joined_request_body(replies) == splice(body_b, b'"alias"', "backend-model")
        await c.close()

        # A request cancelled while held gives its bytes back too.
        d = Stream(ch)
        await d.send(req_headers())
        await send_chunks(d, head_a)
        assert await d.no_reply_within(0.3)
        assert _held_bytes(e) == len(head_a)
        d.call.cancel()
        for _ in range(50):
            if _held_bytes(e) == 0:
                break
            await asyncio.sleep(0.1)
        assert _held_bytes(e) == 0

        # Sheddable requests (priority < 0) may fill only half the budget; the other half stays for the rest.
        shed = {"x-gateway-inference-objective": "batch"}
        s1 = Stream(ch)
        await s1.send(req_headers(headers=shed))
        await send_chunks(s1, b'{"prompt":"' + b"s" * 450_000)
        assert await s1.no_reply_within(0.3)
        s2 = Stream(ch)
        await s2.send(req_headers(headers=shed))
        # Two chunks: 450 KB + 2 × 32 KiB passes half the budget. Nothing more is sent: the picker has
        # ended the stream, and a write after that fails (how soon depends on timing).
        await send_chunks(s2, (b'{"prompt":"' + b"t" * 100_000)[:2 * chunk])
        r = await s2.recv()
        assert kind(r) == "immediate_response" and r.immediate_response.status.code == 503, r
        n = Stream(ch)
        await n.send(req_headers())
        body_n = late_body(b"n", 500_000)
        await send_chunks(n, body_n[:-30])
        assert await n.no_reply_within(0.3)  # held beside the sheddable 450 KB: no refusal
        await n.send(req_body(body_n[-30:], eos=True))
        replies = [await n.recv_pending()] + await n.collect_request()
        assert kind(replies[0]) == "request_headers", replies[0]
        assert joined_request_body(replies) == splice(body_n, b'"alias"', "backend-model")
        await n.close()
        s1.call.cancel()

        # Bodies routed on arrival (model first) hold nothing, however large.
        big = b'{"model":"alias","prompt":"' + b"z" * 3_000_000 + b'"}'
        reqs, resps, status = await full_request(ch, big, chunk=chunk)
        assert kind(reqs[0]) == "request_headers"
        assert joined_request_body(reqs) == splice(big, b'"alias"', "backend-model")
    run(e, go)
