import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// Idle keep-alive connections to the API server, reused by whole-response requests (lists, lease
/// renewals every couple of seconds, status patches) so each does not pay a TCP and TLS handshake.
/// Watches keep connections of their own. A connection is reused only while it is younger than
/// `maxAge`, so a rotated CA or client certificate takes effect within that time.
final class KeepAliveConnections: Sendable {
    private let idle = NIOLockedValueBox<[KeepAliveConnection]>([])
    let maxIdle: Int
    let maxAge: TimeAmount

    init(maxIdle: Int = 4, maxAge: TimeAmount = .minutes(5)) {
        self.maxIdle = maxIdle
        self.maxAge = maxAge
    }

    /// The most recently used idle connection that is still open and young enough; others are closed.
    func take() -> KeepAliveConnection? {
        let now = NIODeadline.now()
        var stale: [KeepAliveConnection] = []
        defer { for c in stale { c.close() } }
        return idle.withLockedValue { list in
            while let c = list.popLast() {
                if c.isReusable(now: now, maxAge: maxAge) { return c }
                stale.append(c)
            }
            return nil
        }
    }

    /// Returns a connection after a complete keep-alive exchange (closes it when the pool is full).
    func put(_ connection: KeepAliveConnection) {
        let kept = idle.withLockedValue { list -> Bool in
            guard list.count < maxIdle else { return false }
            list.append(connection)
            return true
        }
        if !kept { connection.close() }
    }

    /// Closes every idle connection.
    func closeAll() {
        for c in idle.withLockedValue({ list -> [KeepAliveConnection] in defer { list = [] }; return list }) { c.close() }
    }

    var idleCount: Int { idle.withLockedValue { $0.count } }
}

/// One HTTP/1.1 connection carrying one exchange at a time.
final class KeepAliveConnection: Sendable {
    let channel: any Channel
    let collector: NIOLoopBound<ResponseCollector>
    let created: NIODeadline

    init(channel: any Channel, collector: ResponseCollector) {
        self.channel = channel
        self.collector = NIOLoopBound(collector, eventLoop: channel.eventLoop)
        self.created = .now()
    }

    func isReusable(now: NIODeadline, maxAge: TimeAmount) -> Bool {
        channel.isActive && now - created < maxAge
    }

    func close() { channel.close(promise: nil) }

    /// Writes the request and collects the whole response; fails if the connection closes first.
    func exchange(head: HTTPRequestHead, body: [UInt8]?, maxBodyBytes: Int, timeout: TimeAmount)
        -> EventLoopFuture<CollectedResponse> {
        let loop = channel.eventLoop
        let channel = self.channel
        let collector = self.collector
        return loop.flatSubmit {
            let promise = loop.makePromise(of: CollectedResponse.self)
            collector.value.start(promise, maxBodyBytes: maxBodyBytes)
            let deadline = loop.scheduleTask(in: timeout) {
                collector.value.timedOut(after: timeout)
                channel.close(promise: nil)
            }
            promise.futureResult.whenComplete { _ in deadline.cancel() }
            channel.write(HTTPClientRequestPart.head(head), promise: nil)
            if let body { channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil) }
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            return promise.futureResult
        }
    }
}

/// A whole response and whether the connection may carry another request.
struct CollectedResponse: Sendable {
    var head: HTTPResponseHead
    var body: [UInt8]
    var keepAlive: Bool
}

/// Why an exchange on a keep-alive connection failed.
enum ExchangeFailure: Error {
    /// The connection closed before any of the response arrived: on a reused connection the server
    /// most likely closed it as idle just as the request went out.
    case closedBeforeResponse
    /// The connection closed after part of the response.
    case closedDuringResponse
    case timedOut(TimeAmount)
    case bodyTooLarge(Int)
    case transport(any Error)
}

/// Collects one response at a time for `KeepAliveConnection` (event-loop confined).
final class ResponseCollector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    private var promise: EventLoopPromise<CollectedResponse>?
    private var head: HTTPResponseHead?
    private var body: [UInt8] = []
    private var maxBodyBytes = 0
    private var failure: ExchangeFailure?

    func start(_ promise: EventLoopPromise<CollectedResponse>, maxBodyBytes: Int) {
        if let failure {
            promise.fail(failure)  // the connection already failed while idle
            return
        }
        self.promise = promise
        self.maxBodyBytes = maxBodyBytes
        head = nil
        body = []
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard promise != nil else { return }  // nothing asked for: ignore (the connection is closed below)
        switch unwrapInboundIn(data) {
        case .head(let h):
            if h.status.code >= 200 { head = h }  // skip 1xx
        case .body(let buffer):
            guard body.count + buffer.readableBytes <= maxBodyBytes else {
                finish(.failure(.bodyTooLarge(maxBodyBytes)))
                context.close(promise: nil)
                return
            }
            body.append(contentsOf: buffer.readableBytesView)
        case .end:
            guard let head else { return }
            finish(.success(CollectedResponse(head: head, body: body, keepAlive: head.isKeepAlive)))
            body = []
        }
    }

    func timedOut(after timeout: TimeAmount) { finish(.failure(.timedOut(timeout))) }

    func channelInactive(context: ChannelHandlerContext) {
        fail(head == nil ? .closedBeforeResponse : .closedDuringResponse)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(.transport(error))
        context.close(promise: nil)
    }

    private func fail(_ error: ExchangeFailure) {
        if failure == nil { failure = error }
        finish(.failure(error))
    }

    private func finish(_ result: Result<CollectedResponse, ExchangeFailure>) {
        guard let p = promise else { return }
        promise = nil
        switch result {
        case .success(let r): p.succeed(r)
        case .failure(let e): p.fail(e)
        }
    }
}
