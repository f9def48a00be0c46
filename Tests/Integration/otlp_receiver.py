"""A stand-in OpenTelemetry collector for tests: OTLP/HTTP on 127.0.0.1 (POST /v1/traces with a
protobuf ExportTraceServiceRequest), decoded by the protobuf library with the official OTLP schema —
an independent decoder of what the picker sends, as a real collector would use. It keeps every span
with its resource attributes and the request headers, and can answer errors on demand.

The schema is otlp_trace_descriptors.pb, the FileDescriptorSet of PyPI opentelemetry-proto 1.45.2
(`scripts/gen_descriptor_set.py --preset otlp -o ...`), loaded into a private descriptor pool: the
xds-protos wheel installs an older copy of the same OTLP modules, so importing them could give either.
"""
import http.server
import threading
import time
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _otlp_classes():
    fds = descriptor_pb2.FileDescriptorSet.FromString((Path(__file__).parent / "otlp_trace_descriptors.pb").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:  # dependencies first
        pool.Add(f)
    get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    return (get("opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest"),
            get("opentelemetry.proto.collector.trace.v1.ExportTraceServiceResponse"))


ExportTraceServiceRequest, ExportTraceServiceResponse = _otlp_classes()


class Receiver:
    """tls: a directory with tls.crt / tls.key to serve https; client_ca: also require a client certificate
    signed by this CA file (mutual TLS)."""

    def __init__(self, tls=None, client_ca=None):
        self.spans = []          # (resource attributes dict, span protobuf)
        self.requests = []       # request headers (dict, lower-case names) per POST; ":client-cn" with mutual TLS
        self.status = 200        # what to answer next
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                peer = {}
                if client_ca:
                    subject = dict(x[0] for x in self.connection.getpeercert()["subject"])
                    peer[":client-cn"] = subject.get("commonName")
                with receiver.lock:
                    receiver.requests.append({k.lower(): v for k, v in self.headers.items()} | {":path": self.path} | peer)
                    status = receiver.status
                    if status == 200 and self.path == "/v1/traces":
                        req = ExportTraceServiceRequest.FromString(body)
                        for rs in req.resource_spans:
                            attrs = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                            for ss in rs.scope_spans:
                                receiver.spans.extend((attrs, s) for s in ss.spans)
                out = ExportTraceServiceResponse().SerializeToString() if status == 200 else b"no"
                self.send_response(status if self.path == "/v1/traces" else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        if tls:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(f"{tls}/tls.crt", f"{tls}/tls.key")
            if client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(client_ca)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://127.0.0.1:{self.port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_spans(self, predicate, timeout=10.0):
        """Spans (resource, span) once `predicate(all spans)` holds; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans not as expected after {timeout}s: {[s.name for _, s in spans]}")
            time.sleep(0.05)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def attributes(span):
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


class GRPCReceiver:
    """The same stand-in collector on OTLP/gRPC (`TraceService/Export`, grpcio server): spans, request
    metadata, and an error status on demand (`status`, a grpc.StatusCode, None = OK)."""

    def __init__(self, host="127.0.0.1", port=0, tls=None):
        """tls: a directory with tls.crt / tls.key to serve over TLS (ALPN h2, as grpcio does)."""
        import grpc
        from concurrent import futures
        self.spans, self.requests, self.status, self.lock = [], [], None, threading.Lock()
        receiver = self

        def export(request, context):
            with receiver.lock:
                receiver.requests.append(dict(context.invocation_metadata()))
                if receiver.status is not None:
                    context.abort(receiver.status, "collector says no")
                for rs in request.resource_spans:
                    attrs = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        receiver.spans.extend((attrs, s) for s in ss.spans)
            return ExportTraceServiceResponse()

        handler = grpc.method_handlers_generic_handler("opentelemetry.proto.collector.trace.v1.TraceService", {
            "Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=ExportTraceServiceRequest.FromString,
                                                          response_serializer=ExportTraceServiceResponse.SerializeToString)})
        self.server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
        if tls:
            creds = grpc.ssl_server_credentials([(open(f"{tls}/tls.key", "rb").read(), open(f"{tls}/tls.crt", "rb").read())])
            self.port = self.server.add_secure_port(f"{host}:{port}", creds)
        else:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.server.start()
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"

    wait_spans = Receiver.wait_spans

    def close(self):
        self.server.stop(0)
