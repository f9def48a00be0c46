#!/usr/bin/env python3
"""A small, fast fake vLLM (OpenAI-compatible) server for demos, tests and benchmarks.

Standard library only (asyncio), HTTP/1.1 with keep-alive, request bodies with content-length or
chunked transfer encoding (Envoy sends upstream requests chunked), bodies of any size: the body is
hashed as it streams in and only a bounded prefix/suffix is kept when it is large.

Endpoints
  POST /v1/completions, /v1/chat/completions, /v1/embeddings   JSON, or SSE with "stream": true
  GET  /v1/models, /health, /metrics (vLLM metric names; --metrics-flavor sglang or trtllm serves the same
                      knobs under SGLang's or Triton TensorRT-LLM's names instead)
  GET  /fake/stats    counters: requests per model received, incomplete uploads, /metrics scrapes, ...
  POST /fake/reset    clears the counters (not the load knobs)
  GET  /fake/last     the last few request records
  POST /fake/load     load knobs for what GET /metrics serves, a JSON object (missing keys take their
                      defaults, so `{}` restores them all); answers the knobs now in force:
                        waiting  int, default 0      vllm:num_requests_waiting
                        running  int or null         vllm:num_requests_running (null: streams in progress)
                        kv       0..1 or null        vllm:kv_cache_usage_perc and vllm:gpu_cache_usage_perc
                                                     (null: min(1, running streams / 100))
                        metrics  "ok" (default) | "garbage" (200 with bytes that are not Prometheus text)
                                 | "hang" (the request is read but never answered; the connection stays
                                 open until the client closes it) | "404"
                        lora_running  list of adapter names, default []   vllm:lora_requests_info labels
                        lora_waiting  list of adapter names, default []   (running_lora_adapters,
                        max_lora      int >= 0, default 4                  waiting_lora_adapters, max_lora)
                      Every GET /metrics counts in /fake/stats `metrics_scrapes`, whatever the mode. Like vLLM,
                      /metrics keeps one vllm:lora_requests_info series per adapter state seen, valued with the
                      time it began (the newest is the current one).

Every inference response echoes what the backend received, both in the JSON (`"echo": {...}`) and in
response headers: x-fake-backend, x-fake-model, x-fake-body-len, x-fake-body-sha256,
x-fake-destination (the x-gateway-destination-endpoint request header), x-fake-chunked.
Like vLLM it answers `"model": <the model it received>`.

Knobs per request (headers): x-fake-chunk-delay-ms (SSE delay between events, default 20),
x-fake-chunks (number of SSE content events, default 5 or max_tokens), x-fake-status (reply status).

Usage: fake_vllm.py --host 127.0.0.2 --port 8000 [--name b1] [--models a,b]
"""
import argparse
import asyncio
import hashlib
import json
import re
import signal
import ssl
import sys
import time
import uuid

KEEP_WHOLE = 8 * 1024 * 1024      # bodies up to this size are kept and JSON-parsed
KEEP_EDGE = 256 * 1024            # larger bodies: keep this much of the head and the tail
MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.requests = 0
        self.by_model = {}
        self.by_path = {}
        self.incomplete = 0          # uploads whose connection ended before the body did
        self.incomplete_bytes = []   # bytes received by those
        self.bad_json = 0
        self.metrics_scrapes = 0
        self.last = []
        self.started = time.time()

    def record(self, rec):
        self.requests += 1
        m = rec.get("model")
        self.by_model[m if m is not None else "<none>"] = self.by_model.get(m if m is not None else "<none>", 0) + 1
        self.by_path[rec["path"]] = self.by_path.get(rec["path"], 0) + 1
        self.last.append(rec)
        if len(self.last) > 50:
            del self.last[:-50]

    def as_json(self):
        return {"requests": self.requests, "by_model": self.by_model, "by_path": self.by_path,
                "incomplete": self.incomplete, "incomplete_bytes": self.incomplete_bytes[-20:],
                "bad_json": self.bad_json, "running": RUNNING[0],
                "metrics_scrapes": self.metrics_scrapes, "load": dict(LOAD)}


STATS = Stats()
RUNNING = [0]
LOAD_DEFAULTS = {"waiting": 0, "running": None, "kv": None, "metrics": "ok", "lora_running": [], "lora_waiting": [],
                 "max_lora": 4}
LOAD = dict(LOAD_DEFAULTS)   # set by POST /fake/load; read by GET /metrics
LORA_SERIES = {("4", "", ""): time.time()}  # (max_lora, running, waiting) label values -> when that state began
METRICS_MODES = ("ok", "garbage", "hang", "404")
HANG = object()              # dispatch result: leave the request unanswered
GARBAGE_METRICS = (
    b"\x00\x01\x02\xff\xfe binary junk \x80\x81\r\n"
    b"# TYPE vllm:num_requests_waiting gauge\n"
    b'vllm:num_requests_waiting{model_name="x" 12\n'
    b"vllm:kv_cache_usage_perc notanumber\n"
    b"\xc3\x28 }}}{{{ = \x00\n")


def set_load(obj):
    """Replaces the load knobs from a POST /fake/load body; returns an error message or None."""
    if not isinstance(obj, dict):
        return "body must be a JSON object"
    unknown = set(obj) - set(LOAD_DEFAULTS)
    if unknown:
        return f"unknown keys: {sorted(unknown)}"
    new = dict(LOAD_DEFAULTS)
    new.update(obj)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(new["waiting"]) or new["waiting"] < 0:
        return "waiting must be an integer >= 0"
    if new["running"] is not None and (not is_int(new["running"]) or new["running"] < 0):
        return "running must be an integer >= 0 or null"
    if new["kv"] is not None:
        if isinstance(new["kv"], bool) or not isinstance(new["kv"], (int, float)) or not 0 <= new["kv"] <= 1:
            return "kv must be a number in 0..1 or null"
        new["kv"] = float(new["kv"])
    if new["metrics"] not in METRICS_MODES:
        return f"metrics must be one of {list(METRICS_MODES)}"
    for key in ("lora_running", "lora_waiting"):
        if not isinstance(new[key], list) or not all(isinstance(a, str) and a and "," not in a for a in new[key]):
            return f"{key} must be a list of adapter names"
    if not is_int(new["max_lora"]) or new["max_lora"] < 0:
        return "max_lora must be an integer >= 0"
    LOAD.clear()
    LOAD.update(new)
    state = (str(new["max_lora"]), ",".join(new["lora_running"]), ",".join(new["lora_waiting"]))
    LORA_SERIES.pop(state, None)
    LORA_SERIES[state] = max([time.time()] + [t + 0.001 for t in LORA_SERIES.values()])
    return None


class Incomplete(Exception):
    def __init__(self, received):
        self.received = received


class Body:
    """Streams a request body: sha256, length, and the bytes needed to find the model."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self.length = 0
        self.head = bytearray()
        self.tail = bytearray()
        self.whole = True

    def add(self, data):
        self.sha.update(data)
        self.length += len(data)
        if self.whole:
            self.head += data
            if len(self.head) > KEEP_WHOLE:
                self.whole = False
                self.tail = self.head[-KEEP_EDGE:]
                del self.head[KEEP_EDGE:]
        else:
            self.tail += data
            if len(self.tail) > 2 * KEEP_EDGE:
                del self.tail[:-KEEP_EDGE]

    def parse(self):
        """(json object or None, model or None, stream flag, max_tokens)."""
        if self.whole:
            try:
                obj = json.loads(self.head)
            except Exception:
                return None, None, False, None
            if not isinstance(obj, dict):
                return None, None, False, None
            model = obj.get("model")
            return obj, model if isinstance(model, str) else None, obj.get("stream") is True, obj.get("max_tokens")
        # Large body: find the model in the head or the tail (approximation, good for tests).
        model = None
        for part in (bytes(self.head), bytes(self.tail)):
            m = MODEL_RE.search(part)
            if m:
                try:
                    model = json.loads(b'"' + m.group(1) + b'"')
                except Exception:
                    model = None
                break
        stream = re.search(rb'"stream"\s*:\s*true', bytes(self.head) + bytes(self.tail)) is not None
        return {}, model, stream, None


async def read_body(reader, headers):
    body = Body()
    te = headers.get("transfer-encoding", "").lower()
    chunked = "chunked" in te
    try:
        if chunked:
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # trailers until an empty line
                    while True:
                        t = await reader.readuntil(b"\r\n")
                        if t == b"\r\n":
                            break
                    break
                remaining = size
                while remaining:
                    data = await reader.read(min(remaining, 1 << 20))
                    if not data:
                        raise Incomplete(body.length)
                    body.add(data)
                    remaining -= len(data)
                if await reader.readexactly(2) != b"\r\n":
                    raise Incomplete(body.length)
        else:
            remaining = int(headers.get("content-length", "0") or 0)
            while remaining:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    raise Incomplete(body.length)
                body.add(data)
                remaining -= len(data)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        raise Incomplete(body.length)
    return body, chunked


def response_head(status, headers, chunked=False, length=None):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}"]
    for k, v in headers:
        lines.append(f"{k}: {v}")
    if chunked:
        lines.append("transfer-encoding: chunked")
    else:
        lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Server:
    def __init__(self, args):
        self.name = args.name
        self.models = [m for m in args.models.split(",") if m]
        self.default_delay = args.chunk_delay_ms
        self.flavor = args.metrics_flavor

    async def handle(self, reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    return
                headers = {}
                raw_headers = []
                for line in lines[1:]:
                    if not line:
                        continue
                    k, _, v = line.partition(":")
                    k = k.strip().lower()
                    v = v.strip()
                    raw_headers.append([k, v])
                    headers[k] = v if k not in headers else headers[k] + "," + v
                try:
                    body, chunked = await read_body(reader, headers)
                except Incomplete as e:
                    STATS.incomplete += 1
                    STATS.incomplete_bytes.append(e.received)
                    return
                keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
                if await self.dispatch(method, target, headers, raw_headers, body, chunked, writer) is HANG:
                    # Never answer: hold the connection until the client gives up and closes it.
                    while await reader.read(65536):
                        pass
                    return
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def dispatch(self, method, target, headers, raw_headers, body, chunked, writer):
        path = target.split("?", 1)[0]
        if path == "/health":
            return self.send(writer, 200, b"", [])
        if path == "/metrics":
            STATS.metrics_scrapes += 1
            mode = LOAD["metrics"]
            if mode == "hang":
                return HANG
            if mode == "404":
                return self.send(writer, 404, b"404 page not found\n", [("content-type", "text/plain; charset=utf-8")])
            if mode == "garbage":
                return self.send(writer, 200, GARBAGE_METRICS, [("content-type", "text/plain; version=0.0.4")])
            return self.send(writer, 200, self.metrics().encode(), [("content-type", "text/plain; version=0.0.4")])
        if path == "/fake/load":
            if method == "GET":
                return self.send_json(writer, 200, dict(LOAD))
            if method != "POST":
                return self.send_json(writer, 405, {"error": "use POST"})
            try:
                obj = json.loads(bytes(body.head)) if body.length else {}
            except ValueError:
                return self.send_json(writer, 400, {"error": "invalid JSON"})
            err = set_load(obj) if body.whole else "body too large"
            if err:
                return self.send_json(writer, 400, {"error": err})
            return self.send_json(writer, 200, dict(LOAD))
        if path == "/fake/stats":
            return self.send_json(writer, 200, STATS.as_json())
        if path == "/fake/last":
            return self.send_json(writer, 200, {"last": STATS.last})
        if path == "/fake/reset":
            STATS.reset()
            return self.send_json(writer, 200, {"ok": True})
        obj, model, stream, max_tokens = body.parse() if body.length else (None, None, False, None)
        rec = {"backend": self.name, "method": method, "path": path, "model": model,
               "body_len": body.length, "body_sha256": body.sha.hexdigest(), "chunked": chunked,
               "destination": headers.get("x-gateway-destination-endpoint"),
               "request_id": headers.get("x-request-id"), "headers": raw_headers}
        STATS.record(rec)
        echo_headers = [("x-fake-backend", self.name), ("x-fake-model", model or ""),
                        ("x-fake-body-len", str(body.length)), ("x-fake-body-sha256", rec["body_sha256"]),
                        ("x-fake-destination", rec["destination"] or ""), ("x-fake-chunked", str(chunked).lower())]
        if path == "/v1/models" and method == "GET":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": m} for m in self.models]
            return self.send_json(writer, 200, {"object": "list", "data": data, "echo": rec}, echo_headers)
        if method != "POST":
            return self.send_json(writer, 404, {"error": {"message": "not found", "type": "not_found", "code": 404}}, echo_headers)
        status = int(headers.get("x-fake-status", "200"))
        if body.length and obj is None:
            STATS.bad_json += 1
            return self.send_json(writer, 400, {"object": "error", "message": "invalid JSON", "type": "BadRequestError",
                                                "code": 400, "echo": rec}, echo_headers)
        kind = "chat" if path.endswith("/chat/completions") else "embeddings" if path.endswith("/embeddings") else "text"
        n = int(headers.get("x-fake-chunks", max_tokens if isinstance(max_tokens, int) and 0 < max_tokens <= 64 else 5))
        if stream and kind != "embeddings":
            delay = float(headers.get("x-fake-chunk-delay-ms", self.default_delay)) / 1000.0
            RUNNING[0] += 1
            try:
                await self.stream(writer, status, kind, model, n, delay, rec, echo_headers)
            finally:
                RUNNING[0] -= 1
            return
        rid = "cmpl-" + uuid.uuid4().hex[:16]
        usage = {"prompt_tokens": max(1, body.length // 4), "completion_tokens": n, "total_tokens": max(1, body.length // 4) + n}
        if kind == "chat":
            out = {"id": "chat" + rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": " hello" * n},
                                "finish_reason": "length"}], "usage": usage}
        elif kind == "embeddings":
            out = {"object": "list", "model": model, "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                   "usage": usage}
        else:
            out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                   "choices": [{"index": 0, "text": " hello" * n, "logprobs": None, "finish_reason": "length"}],
                   "usage": usage}
        out["echo"] = rec
        return self.send_json(writer, status, out, echo_headers)

    async def stream(self, writer, status, kind, model, n, delay, rec, echo_headers):
        writer.write(response_head(status, [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
                                   + echo_headers, chunked=True))
        rid = "cmpl-" + uuid.uuid4().hex[:16]
        created = int(time.time())
        for i in range(n + 1):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f" tok{i}"}
                ev = {"id": "chat" + rid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [{"index": 0, "delta": delta, "finish_reason": "length" if i == n else None}]}
            else:
                ev = {"id": rid, "object": "text_completion", "created": created, "model": model,
                      "choices": [{"index": 0, "text": f" tok{i}", "logprobs": None,
                                   "finish_reason": "length" if i == n else None}]}
            if i == n:
                ev["usage"] = {"prompt_tokens": max(1, rec["body_len"] // 4), "completion_tokens": n,
                               "total_tokens": max(1, rec["body_len"] // 4) + n}
            if i == 0:
                ev["echo"] = {k: v for k, v in rec.items() if k != "headers"}
            self.chunk(writer, b"data: " + json.dumps(ev).encode() + b"\n\n")
            await writer.drain()
            if delay:
                await asyncio.sleep(delay)
        self.chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")

    @staticmethod
    def chunk(writer, data):
        writer.write(b"%x\r\n" % len(data) + data + b"\r\n")

    def send(self, writer, status, payload, headers):
        writer.write(response_head(status, headers, length=len(payload)) + payload)

    def send_json(self, writer, status, obj, extra=()):
        self.send(writer, status, json.dumps(obj).encode(), [("content-type", "application/json")] + list(extra))

    def metrics(self):
        running = RUNNING[0] if LOAD["running"] is None else LOAD["running"]
        kv = f"{min(1.0, RUNNING[0] / 100):.4f}" if LOAD["kv"] is None else repr(LOAD["kv"])
        waiting = LOAD["waiting"]
        models = ",".join(self.models)
        model = self.models[0] if self.models else ""
        if self.flavor == "sglang":
            return (
                "# TYPE sglang:num_running_reqs gauge\n"
                f'sglang:num_running_reqs{{model_name="{model}"}} {running}\n'
                "# TYPE sglang:num_queue_reqs gauge\n"
                f'sglang:num_queue_reqs{{model_name="{model}"}} {waiting}\n'
                "# TYPE sglang:token_usage gauge\n"
                f'sglang:token_usage{{model_name="{model}"}} {kv}\n'
                "# TYPE sglang:gen_throughput gauge\n"
                f'sglang:gen_throughput{{model_name="{model}"}} 42.0\n')
        if self.flavor == "trtllm":  # Triton's TensorRT-LLM backend: one family, told apart by labels
            return (
                "# TYPE nv_trt_llm_request_metrics gauge\n"
                f'nv_trt_llm_request_metrics{{model="ensemble",request_type="waiting",version="1"}} {waiting}\n'
                f'nv_trt_llm_request_metrics{{model="ensemble",request_type="scheduled",version="1"}} {running}\n'
                'nv_trt_llm_request_metrics{model="ensemble",request_type="max",version="1"} 512\n'
                "# TYPE nv_trt_llm_kv_cache_block_metrics gauge\n"
                'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble",version="1"} 8192\n'
                f'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="fraction",model="ensemble",version="1"}} {kv}\n')
        return (
            "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{self.models[0] if self.models else ""}"}} {running}\n'
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{self.models[0] if self.models else ""}"}} {waiting}\n'
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc {kv}\n"
            "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f"vllm:gpu_cache_usage_perc {kv}\n"
            "# HELP vllm:lora_requests_info Running stats on lora requests.\n"
            "# TYPE vllm:lora_requests_info gauge\n"
            + "".join(f'vllm:lora_requests_info{{max_lora="{m}",running_lora_adapters="{r}",waiting_lora_adapters="{w}"}} '
                      f"{t:.3f}\n" for (m, r, w), t in LORA_SERIES.items()) +
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            "# TYPE vllm:cache_config_info gauge\n"
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="8192"} 1.0\n'
            f"# fake backend {self.name} serving {models}\n")


async def main_async(args):
    server = Server(args)
    srv = await asyncio.start_server(server.handle, args.host, args.port, limit=1 << 20, backlog=1024)
    print(json.dumps({"msg": "fake vllm listening", "name": args.name, "address": f"{args.host}:{args.port}"}), flush=True)
    if args.tls_port:
        # The same server over HTTPS on a second port (model servers that serve /metrics over TLS).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        tls_srv = await asyncio.start_server(server.handle, args.host, args.tls_port, ssl=ctx, limit=1 << 20)
        print(json.dumps({"msg": "fake vllm listening (tls)", "address": f"{args.host}:{args.tls_port}"}), flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with srv:
        await stop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.2")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None)
    p.add_argument("--models", default="facebook/opt-125m,facebook/opt-125m-canary")
    p.add_argument("--chunk-delay-ms", type=float, default=20.0)
    p.add_argument("--metrics-flavor", choices=("vllm", "sglang", "trtllm"), default="vllm")
    p.add_argument("--tls-port", type=int, default=0, help="also serve HTTPS on this port (needs --tls-cert/--tls-key)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    args = p.parse_args(argv)
    if args.name is None:
        args.name = f"{args.host}:{args.port}"
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
