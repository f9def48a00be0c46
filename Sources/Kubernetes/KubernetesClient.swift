import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

/// A minimal Kubernetes API client: HTTP/1.1 (NIOHTTP1's client codec) over NIOPosix, TLS via the
/// project's OpenSSL handler. Whole-response requests (`send`: lists, gets, lease renewals, status
/// patches) reuse keep-alive connections younger than five minutes; a watch gets a connection of its
/// own. The service-account token is re-read for every request and a new connection reads the CA
/// again, so rotations are picked up. Watch responses are streamed: `watch` hands over one decoded
/// event per line as chunks arrive; only a partial line is ever buffered.
public final class KubernetesClient: Sendable {
    public let config: ClusterConfig
    let group: any EventLoopGroup
    let logger: Logger
    /// Connect timeout per connection.
    public let connectTimeout: TimeAmount
    let userAgent = "swift-epp/1.0"
    let connections = KeepAliveConnections()

    public init(config: ClusterConfig, eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                connectTimeout: TimeAmount = .seconds(5), logger: Logger) {
        self.config = config
        self.group = eventLoopGroup
        self.connectTimeout = connectTimeout
        self.logger = logger
    }

    // MARK: Requests

    /// An API request. `query` values are percent-encoded by the client.
    public struct Request: Sendable {
        public var method: HTTPMethod
        public var path: String
        public var query: [(String, String)]
        public var body: [UInt8]?
        public var contentType: String?

        public init(method: HTTPMethod = .GET, path: String, query: [(String, String)] = [], body: [UInt8]? = nil,
                    contentType: String? = nil) {
            self.method = method
            self.path = path
            self.query = query
            self.body = body
            self.contentType = contentType
        }

        public var uri: String {
            guard !query.isEmpty else { return path }
            return path + "?" + query.map { "\(percentEncode($0.0))=\(percentEncode($0.1))" }.joined(separator: "&")
        }
    }

    /// A whole (non-streaming) response.
    public struct Response: Sendable {
        public var status: HTTPResponseStatus
        public var headers: HTTPHeaders
        public var body: [UInt8]

        /// Throws `KubernetesError.http` unless 2xx.
        public func checked(path: String) throws -> Response {
            guard (200..<300).contains(Int(status.code)) else {
                throw KubernetesError.http(code: Int(status.code), status: try? JSONDecoder().decode(APIStatus.self, from: Data(body)), path: path)
            }
            return self
        }

        public func decode<T: Decodable>(_ type: T.Type) throws -> T {
            do {
                return try JSONDecoder().decode(T.self, from: Data(body))
            } catch {
                throw KubernetesError.decoding("\(T.self): \(describeDecodingError(error))")
            }
        }
    }

    /// Sends a request and reads the whole response (bounded by `maxBodyBytes` and `timeout`), on an
    /// idle keep-alive connection when there is one. A reused connection that closes before any of
    /// the answer arrived (the server dropped it as idle just then) is retried once on a new one,
    /// except for POST, which might have been executed.
    public func send(_ request: Request, timeout: TimeAmount = .seconds(30), maxBodyBytes: Int = 64 << 20) async throws -> Response {
        var head = HTTPRequestHead(version: .http1_1, method: request.method, uri: request.uri)
        head.headers = try makeHeaders(request, keepAlive: true)
        if let reused = connections.take() {
            do {
                return try await exchange(on: reused, head: head, request: request, timeout: timeout, maxBodyBytes: maxBodyBytes)
            } catch ExchangeFailure.closedBeforeResponse where request.method != .POST && !Task.isCancelled {
                logger.debug("kept-alive connection closed before answering; retrying on a new one", metadata: ["path": "\(request.path)"])
            } catch let failure as ExchangeFailure {
                throw mapped(failure, request.path)
            }
        }
        let fresh = try await connect()
        do {
            return try await exchange(on: fresh, head: head, request: request, timeout: timeout, maxBodyBytes: maxBodyBytes)
        } catch let failure as ExchangeFailure {
            throw mapped(failure, request.path)
        }
    }

    private func exchange(on connection: KeepAliveConnection, head: HTTPRequestHead, request: Request, timeout: TimeAmount,
                          maxBodyBytes: Int) async throws -> Response {
        let future = connection.exchange(head: head, body: request.body, maxBodyBytes: maxBodyBytes, timeout: timeout)
        let collected: CollectedResponse
        do {
            collected = try await withTaskCancellationHandler {
                try await future.get()
            } onCancel: {
                connection.close()
            }
        } catch {
            connection.close()
            if Task.isCancelled { throw CancellationError() }
            throw error
        }
        if collected.keepAlive { connections.put(connection) } else { connection.close() }
        return Response(status: collected.head.status, headers: collected.head.headers, body: collected.body)
    }

    private func mapped(_ failure: ExchangeFailure, _ path: String) -> KubernetesError {
        switch failure {
        case .closedBeforeResponse: return .connectionClosed("\(path): no response")
        case .closedDuringResponse: return .connectionClosed("\(path): response ended early")
        case .timedOut(let t): return .connectionClosed("\(path): no complete response within \(Double(t.nanoseconds) / 1e9) s")
        case .bodyTooLarge(let limit): return .decoding("response body of \(path) exceeds \(limit) bytes")
        case .transport(let error): return .connectionClosed("\(path): \(error)")
        }
    }

    /// A new keep-alive connection for `send`.
    private func connect() async throws -> KeepAliveConnection {
        try await openConnection { channel in
            let collector = ResponseCollector()
            try channel.pipeline.syncOperations.addHandler(collector)
            return KeepAliveConnection(channel: channel, collector: collector)
        }
    }

    /// Connects to the API server with TLS (when configured) and the HTTP/1.1 client codec; `finish`
    /// adds what the caller needs on top, on the channel's event loop, and makes its handle.
    private func openConnection<Output: Sendable>(_ finish: @escaping @Sendable (any Channel) throws -> Output) async throws -> Output {
        let makeTLS = try tlsHandlerFactory(config: config)
        do {
            return try await ClientBootstrap(group: group)
                .connectTimeout(connectTimeout)
                .channelOption(.socketOption(.so_keepalive), value: 1)
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                .connect(host: config.host, port: config.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let makeTLS {
                            try channel.pipeline.syncOperations.addHandler(makeTLS())
                        }
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        return try finish(channel)
                    }
                }
        } catch {
            throw KubernetesError.connectionClosed("cannot connect to \(config.serverURL): \(error)")
        }
    }

    /// GET and decode a 2xx JSON response.
    public func get<T: Decodable>(_ type: T.Type, path: String, query: [(String, String)] = [],
                                  timeout: TimeAmount = .seconds(30)) async throws -> T {
        try await send(Request(path: path, query: query), timeout: timeout).checked(path: path).decode(T.self)
    }

    /// Reads the body of a streaming response piece by piece.
    public struct BodyReader {
        var iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
        var finished = false
        let path: String

        /// The next body chunk; nil at the end of the response. Throws if the connection drops first.
        public mutating func next() async throws -> ByteBuffer? {
            if finished { return nil }
            while true {
                let next: HTTPClientResponsePart?
                do {
                    next = try await iterator.next()
                } catch {
                    finished = true
                    if Task.isCancelled { throw CancellationError() }
                    throw KubernetesError.connectionClosed("\(path): \(error)")
                }
                guard let part = next else {
                    finished = true
                    if Task.isCancelled { throw CancellationError() }
                    throw KubernetesError.connectionClosed("\(path): response ended early")
                }
                switch part {
                case .head: continue
                case .body(let buffer): return buffer
                case .end:
                    finished = true
                    return nil
                }
            }
        }
    }

    /// Sends a request and hands the response head and a body reader to `handle`; the connection is
    /// closed when `handle` returns (or throws). The whole exchange is bounded by `timeout`.
    public func stream<R: Sendable>(_ request: Request, timeout: TimeAmount,
                                    _ handle: (HTTPResponseHead, inout BodyReader) async throws -> R) async throws -> R {
        // Everything that can fail comes before the NIOAsyncChannel exists (the TLS setup too, in
        // openConnection): once made it must go through executeThenClose (a dropped one traps in NIO).
        let headers = try makeHeaders(request, keepAlive: false)
        let channel = try await openConnection { channel in
            try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
        }
        let underlying = channel.channel
        let deadline = underlying.eventLoop.scheduleTask(in: timeout) {
            underlying.close(promise: nil)
        }
        defer { deadline.cancel() }
        let path = request.path
        let uri = request.uri
        let body = request.body
        do {
            return try await withTaskCancellationHandler {
                try await channel.executeThenClose { inbound, outbound in
                    var head = HTTPRequestHead(version: .http1_1, method: request.method, uri: uri)
                    head.headers = headers
                    var parts: [HTTPClientRequestPart] = [.head(head)]
                    if let body {
                        parts.append(.body(.byteBuffer(ByteBuffer(bytes: body))))
                    }
                    parts.append(.end(nil))
                    // One write + flush: the server may answer (and close) as soon as it has the request.
                    try await outbound.write(contentsOf: parts)
                    var iterator = inbound.makeAsyncIterator()
                    var responseHead: HTTPResponseHead?
                    while responseHead == nil {
                        guard let part = try await iterator.next() else {
                            throw KubernetesError.connectionClosed("\(path): no response")
                        }
                        if case .head(let h) = part, h.status.code >= 200 { responseHead = h }
                    }
                    var reader = BodyReader(iterator: iterator, path: path)
                    do {
                        return try await handle(responseHead!, &reader)
                    } catch {
                        throw HandlerFailure(underlying: error)
                    }
                }
            } onCancel: {
                underlying.close(promise: nil)
            }
        } catch let failure as HandlerFailure {
            throw failure.underlying
        } catch let error as KubernetesError {
            throw error
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            if Task.isCancelled { throw CancellationError() }
            throw KubernetesError.connectionClosed("\(path): \(error)")
        }
    }

    private func makeHeaders(_ request: Request, keepAlive: Bool) throws -> HTTPHeaders {
        var headers = HTTPHeaders()
        let defaultPort = config.usesTLS ? 443 : 80
        let hostHeader = (config.host.contains(":") ? "[\(config.host)]" : config.host)
            + (config.port == defaultPort ? "" : ":\(config.port)")
        headers.add(name: "Host", value: hostHeader)
        headers.add(name: "User-Agent", value: userAgent)
        headers.add(name: "Accept", value: "application/json")
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        if let token = try currentToken() {
            headers.add(name: "Authorization", value: "Bearer \(token)")
        }
        if let body = request.body {
            headers.add(name: "Content-Type", value: request.contentType ?? "application/json")
            headers.add(name: "Content-Length", value: String(body.count))
        } else if request.method != .GET && request.method != .HEAD {
            headers.add(name: "Content-Length", value: "0")
        }
        return headers
    }

    /// The bearer token, re-read from its file for every request.
    func currentToken() throws -> String? {
        switch config.credentials {
        case .none: return nil
        case .token(let token): return token
        case .tokenFile(let path):
            do {
                let token = try String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
                return token.isEmpty ? nil : token
            } catch {
                throw KubernetesError.configuration("cannot read token file \(path): \(error)")
            }
        }
    }

    // MARK: Watch

    /// One event of a watch stream.
    enum WatchLine<T: Decodable & Sendable>: Sendable {
        case event(WatchEventEnvelope<T>)
    }

    /// Opens a watch and calls `onEvent` for every event line as it arrives. Returns when the server ends
    /// the stream cleanly; throws `KubernetesError.http` for a non-2xx answer, `.connectionClosed` for a
    /// dropped connection. `onEvent` returning false stops the watch.
    func watch<T: Decodable & Sendable>(_ type: T.Type, request: Request, timeout: TimeAmount, maxLineBytes: Int = 16 << 20,
                                        onEvent: (WatchEventEnvelope<T>) async throws -> Bool) async throws {
        let path = request.path
        try await stream(request, timeout: timeout) { head, body in
            guard (200..<300).contains(Int(head.status.code)) else {
                var bytes: [UInt8] = []
                while let chunk = try await body.next(), bytes.count < 1 << 20 { bytes.append(contentsOf: chunk.readableBytesView) }
                throw KubernetesError.http(code: Int(head.status.code),
                                           status: try? JSONDecoder().decode(APIStatus.self, from: Data(bytes)), path: path)
            }
            var pending = ByteBuffer()
            let decoder = JSONDecoder()
            while let chunk = try await body.next() {
                var chunk = chunk
                pending.writeBuffer(&chunk)
                while let newline = pending.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) {
                    let length = newline - pending.readerIndex
                    let line = pending.readSlice(length: length)!
                    pending.moveReaderIndex(forwardBy: 1)
                    if line.readableBytes == 0 { continue }
                    let event: WatchEventEnvelope<T>
                    do {
                        event = try decoder.decode(WatchEventEnvelope<T>.self, from: Data(line.readableBytesView))
                    } catch {
                        throw KubernetesError.decoding("watch event on \(path): \(describeDecodingError(error))")
                    }
                    guard try await onEvent(event) else { return }
                }
                pending.discardReadBytes()
                if pending.readableBytes > maxLineBytes {
                    throw KubernetesError.decoding("watch event on \(path) exceeds \(maxLineBytes) bytes")
                }
            }
        }
    }
}

/// Carries an error thrown by a response handler through `stream` unchanged.
private struct HandlerFailure: Error {
    let underlying: any Error
}

private let unreserved: CharacterSet = {
    var set = CharacterSet()
    set.insert(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    return set
}()

func percentEncode(_ s: String) -> String {
    s.addingPercentEncoding(withAllowedCharacters: unreserved) ?? s
}
