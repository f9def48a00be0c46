import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

/// Whether a scrape may read the metrics.
public enum MetricsAccess: Sendable, Equatable {
    case allow
    case deny(status: Int, message: String)
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4) over plain HTTP/1.1, like the reference
/// EPP's metrics port. Anything else gets 404 (or 405 for other methods on /metrics). With
/// `authorize`, each scrape's request headers are checked first (the reference's
/// `--metrics-endpoint-auth`); pipelined requests are still answered in order.
public final class MetricsServer: Sendable {
    private let channel: any Channel

    /// The bound port (useful when asked for port 0).
    public var port: Int { channel.localAddress?.port ?? 0 }

    public static func start(host: String, port: Int, group: any EventLoopGroup, logger: Logger,
                             authorize: (@Sendable (HTTPHeaders) async -> MetricsAccess)? = nil,
                             exposition: @escaping @Sendable () -> [UInt8]) async throws -> MetricsServer {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(exposition: exposition, authorize: authorize))
                }
            }
            .bind(host: host, port: port).get()
        logger.info("metrics server listening", metadata: ["address": "\(host):\(channel.localAddress?.port ?? port)"])
        return MetricsServer(channel: channel)
    }

    private init(channel: any Channel) {
        self.channel = channel
    }

    public func close() async {
        try? await channel.close()
    }
}

private final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let exposition: @Sendable () -> [UInt8]
    private let authorize: (@Sendable (HTTPHeaders) async -> MetricsAccess)?
    private var head: HTTPRequestHead?
    private var removed = false

    init(exposition: @escaping @Sendable () -> [UInt8], authorize: (@Sendable (HTTPHeaders) async -> MetricsAccess)?) {
        self.exposition = exposition
        self.authorize = authorize
    }

    func handlerRemoved(context: ChannelHandlerContext) { removed = true }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
        case .body:
            break  // scrapes have no body; ignore whatever comes
        case .end:
            guard let head else { return }
            self.head = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            guard let authorize, path == "/metrics", head.method == .GET || head.method == .HEAD else {
                return respond(to: head, context: context)
            }
            // The pipeline handler in front holds pipelined requests until this one's response
            // ends, so the answers stay in order while the check runs.
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            let loop = context.eventLoop
            let headers = head.headers
            Task {
                let access = await authorize(headers)
                loop.execute {
                    let (handler, context) = bound.value
                    guard !handler.removed else { return }  // the scraper went away meanwhile
                    if case .deny(let status, let message) = access {
                        handler.send(head: head, status: HTTPResponseStatus(statusCode: status), contentType: "text/plain; charset=utf-8",
                                     body: context.channel.allocator.buffer(string: message + "\n"), context: context)
                    } else {
                        handler.respond(to: head, context: context)
                    }
                }
            }
        }
    }

    private func respond(to head: HTTPRequestHead, context: ChannelHandlerContext) {
        let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        let status: HTTPResponseStatus
        var contentType = "text/plain; charset=utf-8"
        let body: ByteBuffer
        if path == "/metrics" && (head.method == .GET || head.method == .HEAD) {
            status = .ok
            contentType = "text/plain; version=0.0.4; charset=utf-8"
            body = context.channel.allocator.buffer(bytes: exposition())
        } else if path == "/metrics" {
            status = .methodNotAllowed
            body = context.channel.allocator.buffer(string: "only GET /metrics\n")
        } else {
            status = .notFound
            body = context.channel.allocator.buffer(string: "not found: metrics are at /metrics\n")
        }
        send(head: head, status: status, contentType: contentType, body: body, context: context)
    }

    private func send(head: HTTPRequestHead, status: HTTPResponseStatus, contentType: String, body: ByteBuffer,
                      context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: contentType)
        headers.add(name: "content-length", value: String(body.readableBytes))
        var responseHead = HTTPResponseHead(version: head.version, status: status, headers: headers)
        let keepAlive = head.isKeepAlive
        if !keepAlive { responseHead.headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(responseHead)), promise: nil)
        if head.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        let written: EventLoopPromise<Void>? = keepAlive ? nil : context.eventLoop.makePromise()
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: written)
        let channel = context.channel
        written?.futureResult.whenComplete { _ in channel.close(promise: nil) }
    }
}
