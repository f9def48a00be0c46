import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

/// Serves `GET /metrics` (Prometheus text format 0.0.4) over plain HTTP/1.1, like the reference
/// EPP's metrics port. Anything else gets 404 (or 405 for other methods on /metrics).
public final class MetricsServer: Sendable {
    private let channel: any Channel

    /// The bound port (useful when asked for port 0).
    public var port: Int { channel.localAddress?.port ?? 0 }

    public static func start(host: String, port: Int, group: any EventLoopGroup, logger: Logger,
                             exposition: @escaping @Sendable () -> [UInt8]) async throws -> MetricsServer {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(exposition: exposition))
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
    private var head: HTTPRequestHead?

    init(exposition: @escaping @Sendable () -> [UInt8]) {
        self.exposition = exposition
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
        case .body:
            break  // scrapes have no body; ignore whatever comes
        case .end:
            guard let head else { return }
            self.head = nil
            respond(to: head, context: context)
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
