"""Helpers to drive ext_proc Process streams directly (grpcio asyncio + xds-protos), the way Envoy 1.40 does."""
import asyncio
import json
import re

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
FULL_DUPLEX = pm.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = pm.ProcessingMode.BUFFERED
STREAMED = pm.ProcessingMode.STREAMED
NONE = pm.ProcessingMode.NONE
ENDPOINTS = ["10.9.0.1:8000", "10.9.0.2:8000", "10.9.0.3:8000"]  # nothing listens: picker-only tests
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def req_headers(path="/v1/completions", method="POST", headers=None, eos=False, mode=FULL_DUPLEX,
                response_mode=None, subset=None, protocol_config=True):
    hs = [(":method", method), (":path", path), (":authority", "gw"), (":scheme", "http")]
    if method == "POST":
        hs.append(("content-type", "application/json"))
    hs += list((headers or {}).items())
    m = pb.ProcessingRequest()
    m.request_headers.end_of_stream = eos
    for k, v in hs:
        m.request_headers.headers.headers.add(key=k, raw_value=v.encode() if isinstance(v, str) else v)
    if protocol_config:
        m.protocol_config.request_body_mode = mode
        m.protocol_config.response_body_mode = response_mode if response_mode is not None else mode
    if subset is not None:
        hint = m.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        lst = hint.fields["x-gateway-destination-endpoint-subset"].list_value
        for s in subset:
            lst.values.add().string_value = s
    return m


def req_body(data, eos=False):
    m = pb.ProcessingRequest()
    m.request_body.body = data
    m.request_body.end_of_stream = eos
    return m


def req_trailers():
    m = pb.ProcessingRequest()
    m.request_trailers.trailers.headers.add(key="x-trailer", raw_value=b"1")
    return m


def resp_headers(status=200, content_type="application/json", eos=False):
    m = pb.ProcessingRequest()
    m.response_headers.end_of_stream = eos
    for k, v in ((":status", str(status)), ("content-type", content_type)):
        m.response_headers.headers.headers.add(key=k, raw_value=v.encode())
    return m


def resp_body(data, eos=False):
    m = pb.ProcessingRequest()
    m.response_body.body = data
    m.response_body.end_of_stream = eos
    return m


def resp_trailers():
    m = pb.ProcessingRequest()
    m.response_trailers.trailers.headers.add(key="grpc-status", raw_value=b"0")
    return m


def kind(reply):
    return reply.WhichOneof("response")


def set_headers(common):
    return {h.header.key: (h.header.raw_value or h.header.value.encode()).decode()
            for h in common.header_mutation.set_headers}


def destination(reply):
    """(header value, dynamic metadata value) of a routing reply."""
    common = getattr(reply, kind(reply)).response
    hdr = set_headers(common).get("x-gateway-destination-endpoint")
    md = None
    if "envoy.lb" in reply.dynamic_metadata.fields:
        md = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value
    return hdr, md


def streamed_body(reply):
    """(bytes, end_of_stream) of a FULL_DUPLEX body reply."""
    sr = getattr(reply, kind(reply)).response.body_mutation.streamed_response
    return sr.body, sr.end_of_stream


def top_model(body):
    return json.loads(body)["model"]


def splice(body, client_literal, target):
    """Expected rewritten body: the first top-level `"model": <client_literal>` value replaced."""
    m = re.search(rb'"(?:model|mod\\u0065l)"(\s*:\s*)' + re.escape(client_literal), body)
    assert m, "model literal not found"
    return body[:m.end() - len(client_literal)] + json.dumps(target).encode() + body[m.end():]


class Stream:
    """One Process stream: write messages, read replies with a timeout."""

    def __init__(self, channel, metadata=None):
        self.call = pbg.ExternalProcessorStub(channel).Process(metadata=metadata)

    async def send(self, *msgs):
        for m in msgs:
            await self.call.write(m)

    async def recv(self, timeout=5.0):
        r = await asyncio.wait_for(self.call.read(), timeout)
        if r is grpc.aio.EOF:
            return None
        return r

    async def no_reply_within(self, seconds):
        """True when nothing arrives within `seconds` (the pending read is kept for the next recv)."""
        if not hasattr(self, "_pending") or self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        done, _ = await asyncio.wait({self._pending}, timeout=seconds)
        return not done

    async def recv_pending(self, timeout=5.0):
        if getattr(self, "_pending", None) is not None:
            p, self._pending = self._pending, None
            r = await asyncio.wait_for(p, timeout)
            return None if r is grpc.aio.EOF else r
        return await self.recv(timeout)

    async def close(self, timeout=5.0):
        """Half-closes and drains: returns (remaining replies, grpc status code)."""
        await self.call.done_writing()
        rest = []
        while True:
            r = await asyncio.wait_for(self.call.read(), timeout)
            if r is grpc.aio.EOF:
                break
            rest.append(r)
        return rest, await self.call.code()

    async def collect_request(self, want_eos=True, timeout=5.0):
        """Reads until the request body reply with end_of_stream (or an immediate response)."""
        out = []
        while True:
            r = await self.recv(timeout)
            assert r is not None, f"stream ended early after {[kind(x) for x in out]}"
            out.append(r)
            k = kind(r)
            if k == "immediate_response":
                return out
            if k == "request_body" and streamed_body(r)[1]:
                return out
            if k == "request_headers" and not want_eos:
                return out


def joined_request_body(replies):
    return b"".join(streamed_body(r)[0] for r in replies if kind(r) == "request_body")


async def full_request(channel, body, chunk=None, path="/v1/completions", headers=None, mode=FULL_DUPLEX,
                       response=None, response_chunks=None, metadata=None):
    """One whole exchange as Envoy drives it (FULL_DUPLEX): request headers, body (chunked), response
    headers + body (default: the backend echoes the model it received). Returns (request replies,
    response replies, status)."""
    s = Stream(channel, metadata)
    await s.send(req_headers(path, headers=headers, mode=mode))
    pieces = [body] if not chunk else [body[i:i + chunk] for i in range(0, len(body), chunk)]
    for i, p in enumerate(pieces):
        await s.send(req_body(p, eos=False))
    await s.send(req_body(b"", eos=True))
    reqs = await s.collect_request()
    if kind(reqs[-1]) == "immediate_response":
        rest, code = await s.close()
        return reqs, [], code
    sent = joined_request_body(reqs)
    model = top_model(sent)
    if response is None:
        response = json.dumps({"id": "x", "object": "text_completion", "model": model, "choices": []}).encode()
    await s.send(resp_headers())
    resps = [await s.recv()]
    parts = response_chunks or [response]
    for i, p in enumerate(parts):
        await s.send(resp_body(p, eos=(i == len(parts) - 1)))
    while True:
        r = await s.recv()
        resps.append(r)
        if kind(r) == "response_body" and streamed_body(r)[1]:
            break
    rest, code = await s.close()
    return reqs, resps + rest, code
