import Foundation
import Logging
import NGHTTP2Server
import NIOCore
import NIOHTTP1
import NIOPosix
import OpenSSLTLS
import Protos
import SwiftProtobuf

/// Sends the tracer's spans to an OpenTelemetry collector every `interval`, from an event loop,
/// never from the request path: OTLP/HTTP (`POST …/v1/traces`, protobuf body, HTTP/1.1) or
/// OTLP/gRPC (`TraceService/Export` over HTTP/2 through the project's nghttp2 client session). A collector that is down or answers an error costs the batch
/// (OTLP exporters do not spool to disk) and one warning a minute; the queue stays bounded.
public final class OTLPExporter: Sendable {
    public struct Configuration: Sendable {
        /// OTLP/HTTP: full URL of the traces endpoint, e.g. `http://otel-collector:4318/v1/traces`;
        /// OTLP/gRPC: the collector's URL, e.g. `http://otel-collector:4317` (its path is ignored).
        public var endpoint: String
        /// OTLP/gRPC instead of OTLP/HTTP.
        public var grpc = false
        /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. an API key.
        public var headers: [(String, String)] = []
        /// Resource attributes; `service.name` among them.
        public var resource: [(String, String)] = [("service.name", "swift-epp")]
        public var interval: TimeAmount = .seconds(1)
        public var timeout: TimeAmount = .seconds(5)
        /// Spans per request body.
        public var batchSize = 2048
        /// For an https collector: PEM file of the CA certificates that verify it
        /// (`OTEL_EXPORTER_OTLP_CERTIFICATE`); nil: the system's trust roots.
        public var trustRootsFile: String?
        /// PEM files of a client certificate (chain) and its key, for a collector that wants mutual TLS
        /// (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` / `OTEL_EXPORTER_OTLP_CLIENT_KEY`).
        public var clientCertificateFile: String?
        public var clientKeyFile: String?

        public init(endpoint: String) {
            self.endpoint = endpoint
        }
    }

    struct Target: Sendable {
        var host: String
        var port: Int
        var path: String
        var tls: Bool

        /// Parses `http(s)://host[:port][/path]` (IPv6 hosts in brackets).
        init(url: String) throws {
            guard let c = URLComponents(string: url), let scheme = c.scheme?.lowercased(),
                  scheme == "http" || scheme == "https", let host = c.host, !host.isEmpty else {
                throw OTLPExporterError("tracing endpoint must be an http:// or https:// URL, got '\(url)'")
            }
            tls = scheme == "https"
            self.host = host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host
            port = c.port ?? (tls ? 443 : 80)
            path = c.path.isEmpty ? "/" : c.path + (c.query.map { "?\($0)" } ?? "")
        }

        var hostHeader: String {
            let h = host.contains(":") ? "[\(host)]" : host
            return (tls && port == 443) || (!tls && port == 80) ? h : "\(h):\(port)"
        }
    }

    public let tracer: Tracer
    private let configuration: Configuration
    private let target: Target
    private let tlsContext: TLSContext?
    private let loop: any EventLoop
    private let logger: Logger
    private let state: NIOLoopBoundBox<State>

    private struct State {
        var task: RepeatedTask?
        var failingSince: NIODeadline?
        var lastWarning: NIODeadline?
    }

    public init(tracer: Tracer, configuration: Configuration, loop: any EventLoop, logger: Logger) throws {
        self.tracer = tracer
        self.configuration = configuration
        target = try Target(url: configuration.endpoint)
        if target.tls {
            let read = { (path: String?) throws -> [UInt8]? in
                guard let path else { return nil }
                guard let data = FileManager.default.contents(atPath: path) else {
                    throw OTLPExporterError("cannot read \(path)")
                }
                return Array(data)
            }
            do {
                tlsContext = try TLSContext.client(trustRootsPEM: nil, trustRootsFile: configuration.trustRootsFile,
                                                   clientCertificatePEM: try read(configuration.clientCertificateFile),
                                                   clientKeyPEM: try read(configuration.clientKeyFile),
                                                   insecureSkipVerify: false, alpn: [configuration.grpc ? "h2" : "http/1.1"])
            } catch let error as OTLPExporterError {
                throw error
            } catch {
                throw OTLPExporterError("tracing TLS: \(error)")
            }
        } else {
            tlsContext = nil
        }
        self.loop = loop
        self.logger = logger
        state = .makeBoxSendingValue(State(), eventLoop: loop)
    }

    public func start() {
        loop.execute { [self] in
            guard state.value.task == nil else { return }
            state.value.task = loop.scheduleRepeatedAsyncTask(initialDelay: configuration.interval,
                                                              delay: configuration.interval) { [self] _ in
                exportQueued()
            }
        }
    }

    /// Stops the timer and sends what is queued (bounded by the timeout).
    public func shutdown() async {
        let flushed: EventLoopFuture<Void> = loop.flatSubmit { [self] in
            state.value.task?.cancel()
            state.value.task = nil
            return exportQueued()
        }
        _ = try? await flushed.get()
    }

    /// Sends every queued span, batch after batch, until the queue is empty or a send fails.
    private func exportQueued() -> EventLoopFuture<Void> {
        let batch = tracer.drain(limit: configuration.batchSize)
        guard !batch.isEmpty else { return loop.makeSucceededVoidFuture() }
        let body: [UInt8]
        do {
            body = try Self.encode(batch, resource: configuration.resource).serializedBytes()
        } catch {
            logger.error("cannot encode spans", metadata: ["error": "\(error)"])
            return loop.makeSucceededVoidFuture()
        }
        let sent: EventLoopFuture<Void> = configuration.grpc
            ? exportCall(body)
            : post(body).flatMapThrowing { status in
                guard (200..<300).contains(status) else { throw OTLPExporterError("collector answered HTTP \(status)") }
            }
        return sent.flatMap { [self] () -> EventLoopFuture<Void> in
            succeeded(batch.count)
            return tracer.queuedCount > 0 ? exportQueued() : loop.makeSucceededVoidFuture()
        }.flatMapErrorThrowing { [self] error in
            failed("\(error)", lost: batch.count)
        }
    }

    private func succeeded(_ count: Int) {
        if let since = state.value.failingSince {
            logger.info("exporting spans again", metadata: ["endpoint": "\(configuration.endpoint)",
                                                            "failing-for-seconds": "\((NIODeadline.now() - since).nanoseconds / 1_000_000_000)"])
            state.value.failingSince = nil
            state.value.lastWarning = nil
        }
    }

    private func failed(_ why: String, lost: Int) {
        let now = NIODeadline.now()
        if state.value.failingSince == nil { state.value.failingSince = now }
        if let last = state.value.lastWarning, now - last < .seconds(60) { return }
        state.value.lastWarning = now
        var hint = ""
        if target.port == 4317 && !configuration.grpc {
            hint = " (4317 is the collector's OTLP/gRPC port; this exporter speaks OTLP/HTTP, usually port 4318)"
        }
        logger.warning("cannot export spans; the batch is dropped\(hint)", metadata: [
            "endpoint": "\(configuration.endpoint)", "error": "\(why)", "spans-lost": "\(lost)",
            "spans-dropped-queue-full": "\(tracer.dropped)",
        ])
    }

    /// One POST on a fresh connection (one per interval at most, so no pool is worth keeping).
    private func post(_ body: [UInt8]) -> EventLoopFuture<Int> {
        let promise = loop.makePromise(of: Int.self)
        let target = target
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: target.path)
        head.headers.add(name: "host", value: target.hostHeader)
        head.headers.add(name: "content-type", value: "application/x-protobuf")
        head.headers.add(name: "content-length", value: String(body.count))
        head.headers.add(name: "user-agent", value: "swift-epp")
        head.headers.add(name: "connection", value: "close")
        for (name, value) in configuration.headers { head.headers.add(name: name, value: value) }
        let request = head
        return exchange(promise, pipeline: { pipeline in
            try pipeline.addHTTPClientHandlers()
            try pipeline.addHandler(StatusHandler(promise: promise))
        }, connected: { channel in
            var buffer = channel.allocator.buffer(capacity: body.count)
            buffer.writeBytes(body)
            channel.write(HTTPClientRequestPart.head(request), promise: nil)
            channel.write(HTTPClientRequestPart.body(.byteBuffer(buffer)), promise: nil)
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        })
    }

    /// One exchange with the collector on a fresh connection (TLS when the URL is https): `pipeline`
    /// adds the protocol's handlers, which complete `promise`; `connected` starts the request. The
    /// promise fails after the timeout, and the connection closes once it is complete.
    private func exchange<T: Sendable>(_ promise: EventLoopPromise<T>,
                                       pipeline: @escaping @Sendable (ChannelPipeline.SynchronousOperations) throws -> Void,
                                       connected: @escaping @Sendable (any Channel) -> Void = { _ in }) -> EventLoopFuture<T> {
        let target = target
        let tls = tlsContext
        let timeout = configuration.timeout
        let deadline = loop.scheduleTask(in: timeout) {
            promise.fail(OTLPExporterError("no answer within \(timeout.nanoseconds / 1_000_000) ms"))
        }
        ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(
                            OpenSSLHandler(context: tls, role: .client(serverHostname: target.host), handshakeTimeout: nil))
                    }
                    try pipeline(channel.pipeline.syncOperations)
                }
            }
            .connect(host: target.host, port: target.port)
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    connected(channel)
                    promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
                case .failure(let error):
                    promise.fail(error)
                }
            }
        promise.futureResult.whenComplete { _ in deadline.cancel() }
        return promise.futureResult
    }

    /// One OTLP/gRPC `Export` call on a fresh HTTP/2 connection.
    private func exportCall(_ message: [UInt8]) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: HTTP2ClientSession.Response.self)
        let target = target
        let timeout = configuration.timeout
        var headers = HTTP2HeaderBlock()
        headers.add(":method", "POST")
        headers.add(name: ":scheme", value: target.tls ? "https" : "http")
        headers.add(":path", "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        headers.add(name: ":authority", value: target.hostHeader)
        headers.add("content-type", "application/grpc")
        headers.add("te", "trailers")
        headers.add("user-agent", "swift-epp")
        headers.add(name: "grpc-timeout", value: "\(max(1, timeout.nanoseconds / 1_000_000))m")
        for (name, value) in configuration.headers { headers.add(name: name.lowercased(), value: value) }
        // gRPC message framing: not compressed, 4-byte big-endian length.
        var framed: [UInt8] = [0]
        framed.append(contentsOf: bigEndianBytes(UInt64(message.count)).suffix(4))
        framed.append(contentsOf: message)
        let request = headers
        let body = framed
        return exchange(promise, pipeline: { pipeline in
            try pipeline.addHandler(UnaryHTTP2CallHandler(headers: request, body: body, promise: promise))
        }).flatMapThrowing { response in
            let status = response.headers.first { $0.0 == ":status" }?.1 ?? "none"
            guard status == "200" else { throw OTLPExporterError("collector answered HTTP \(status)") }
            // Trailers-only responses carry grpc-status in the headers.
            let fields = response.trailers + response.headers
            let code = fields.first { $0.0 == "grpc-status" }?.1
            guard code == "0" else {
                let message = fields.first { $0.0 == "grpc-message" }?.1 ?? ""
                throw OTLPExporterError(code.map { "collector answered gRPC status \($0)\(message.isEmpty ? "" : ": \(message)")" }
                                        ?? "gRPC call ended without a status (HTTP/2 code \(response.closeCode.rawValue))")
            }
        }
    }

    static func encode(_ spans: [SpanRecord], resource: [(String, String)]) -> Opentelemetry_Proto_Collector_Trace_V1_ExportTraceServiceRequest {
        var scope = Opentelemetry_Proto_Trace_V1_ScopeSpans()
        scope.scope.name = "swift-epp"
        scope.spans = spans.map { s in
            var span = Opentelemetry_Proto_Trace_V1_Span()
            span.traceID = Data(s.context.traceID.bytes)
            span.spanID = Data(bigEndianBytes(s.context.spanID))
            if s.parentSpanID != 0 { span.parentSpanID = Data(bigEndianBytes(s.parentSpanID)) }
            span.flags = s.context.sampled ? 1 : 0
            span.name = s.name
            span.kind = s.kind == .server ? .server : .internal
            span.startTimeUnixNano = s.startUnixNanos
            span.endTimeUnixNano = s.endUnixNanos
            span.attributes = s.attributes.map { keyValue($0.0, $0.1) }
            if let message = s.errorMessage {
                span.status.code = .error
                span.status.message = message
            }
            return span
        }
        var rs = Opentelemetry_Proto_Trace_V1_ResourceSpans()
        rs.resource.attributes = resource.map { keyValue($0.0, .string($0.1)) }
        rs.scopeSpans = [scope]
        var request = Opentelemetry_Proto_Collector_Trace_V1_ExportTraceServiceRequest()
        request.resourceSpans = [rs]
        return request
    }

    private static func keyValue(_ key: String, _ value: SpanRecord.Value) -> Opentelemetry_Proto_Common_V1_KeyValue {
        var kv = Opentelemetry_Proto_Common_V1_KeyValue()
        kv.key = key
        switch value {
        case .string(let s): kv.value.value = .stringValue(s)
        case .int(let i): kv.value.value = .intValue(Int64(i))
        case .bool(let b): kv.value.value = .boolValue(b)
        }
        return kv
    }
}

public struct OTLPExporterError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Completes the promise with the response's status once the response has ended.
private final class StatusHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    private let promise: EventLoopPromise<Int>
    private var status: Int?

    init(promise: EventLoopPromise<Int>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): status = Int(head.status.code)
        case .body: break
        case .end: if let status { promise.succeed(status) }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(OTLPExporterError(status.map { "connection closed after HTTP \($0)" } ?? "connection closed without an answer"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}

/// Runs one HTTP/2 request over the channel with an `HTTP2ClientSession` and completes the promise
/// with its response (or what there was of it when the connection ended).
private final class UnaryHTTP2CallHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let headers: HTTP2HeaderBlock
    private let body: [UInt8]
    private let promise: EventLoopPromise<HTTP2ClientSession.Response>
    private var session: HTTP2ClientSession?

    init(headers: HTTP2HeaderBlock, body: [UInt8], promise: EventLoopPromise<HTTP2ClientSession.Response>) {
        self.headers = headers
        self.body = body
        self.promise = promise
    }

    func channelActive(context: ChannelHandlerContext) {
        do {
            let s = try HTTP2ClientSession()
            session = s
            try s.submitRequest(headers, body: body)
            try flush(context)
        } catch {
            fail(context, error)
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let session else { return }
        do {
            try session.receive(unwrapInboundIn(data))
            try flush(context)
            if let response = session.response { promise.succeed(response) }
        } catch {
            fail(context, error)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        session?.connectionClosed()
        if let response = session?.response { promise.succeed(response) } else {
            promise.fail(OTLPExporterError("connection closed without an answer"))
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(context, error)
    }

    private func flush(_ context: ChannelHandlerContext) throws {
        if let out = try session?.drainOutbound(allocator: context.channel.allocator) {
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        }
    }

    private func fail(_ context: ChannelHandlerContext, _ error: any Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
