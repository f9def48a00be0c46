import Logging
import NGHTTP2Server
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A gRPC server over the project's nghttp2 wrapper: one listener, plaintext h2c (prior
/// knowledge) or TLS through a handler the caller supplies.
public final class GRPCServer: Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        public var services: [any GRPCService]
        public var http2 = HTTP2Settings()
        /// Largest request message accepted (larger → RESOURCE_EXHAUSTED).
        public var maxMessageBytes = 4 << 20
        /// Makes the TLS handler for a new connection (nil: plaintext h2c). Called on the
        /// connection's event loop; it can pick up a reloaded certificate each time.
        public var tls: (@Sendable () throws -> any ChannelHandler)?

        public init(host: String, port: Int, services: [any GRPCService]) {
            self.host = host
            self.port = port
            self.services = services
        }
    }

    private let channel: any Channel
    private let connections: ConnectionRegistry
    public let logger: Logger

    /// The bound address (useful with port 0).
    public var localAddress: SocketAddress? { channel.localAddress }

    private init(channel: any Channel, connections: ConnectionRegistry, logger: Logger) {
        self.channel = channel
        self.connections = connections
        self.logger = logger
    }

    /// Binds and starts accepting connections.
    public static func start(configuration: Configuration, group: any EventLoopGroup, logger: Logger) async throws -> GRPCServer {
        let router = GRPCRouter(services: configuration.services)
        let registry = ConnectionRegistry()
        let settings = configuration.http2
        let maxMessageBytes = configuration.maxMessageBytes
        let tls = configuration.tls
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 256 << 10, high: 1 << 20))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let ops = channel.pipeline.syncOperations
                    if let tls { try ops.addHandler(try tls()) }
                    let app = GRPCConnection(router: router, maxMessageBytes: maxMessageBytes, logger: logger)
                    try ops.addHandler(HTTP2ServerConnectionHandler(settings: settings, application: app))
                    registry.add(channel)
                }
            }
        let channel = try await bootstrap.bind(host: configuration.host, port: configuration.port).get()
        return GRPCServer(channel: channel, connections: registry, logger: logger)
    }

    /// Stops accepting and asks every connection to shut down gracefully (GOAWAY; in-flight
    /// streams finish). Connections close by themselves once their streams are done.
    public func initiateGracefulShutdown() {
        channel.close(promise: nil)
        for c in connections.all {
            c.pipeline.fireUserInboundEventTriggered(HTTP2GracefulShutdownEvent())
        }
    }

    /// Number of open connections.
    public var connectionCount: Int { connections.count }

    /// Closes everything now.
    public func close() async {
        try? await channel.close()
        for c in connections.all { try? await c.close() }
    }
}

/// The open connections of one server, for graceful shutdown.
final class ConnectionRegistry: Sendable {
    private let channels = NIOLockedValueBox([ObjectIdentifier: any Channel]())

    func add(_ channel: any Channel) {
        let key = ObjectIdentifier(channel)
        channels.withLockedValue { $0[key] = channel }
        channel.closeFuture.whenComplete { _ in
            _ = self.channels.withLockedValue { $0.removeValue(forKey: key) }
        }
    }

    var all: [any Channel] { channels.withLockedValue { Array($0.values) } }
    var count: Int { channels.withLockedValue { $0.count } }
}
