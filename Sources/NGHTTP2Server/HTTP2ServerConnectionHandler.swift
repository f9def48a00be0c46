import NIOCore

/// The application side of an HTTP/2 server connection (e.g. the gRPC layer). Event-loop confined.
public protocol HTTP2ServerApplication: HTTP2ServerSessionDelegate {
    /// Called once the connection's session exists; keep the connection to send on it.
    func attach(_ connection: HTTP2ServerConnection)
    /// The transport is gone: every open stream is over.
    func connectionClosed()
}

/// Sent down a pipeline (as a user inbound event) to start a graceful shutdown of the connection.
public struct HTTP2GracefulShutdownEvent: Sendable {
    public init() {}
}

/// Adapts an `HTTP2ServerSession` to a NIO channel: bytes in, frames out, with back-pressure.
///
/// Outbound: everything the application queued is serialised once per read cycle (or once per
/// event-loop tick when triggered from elsewhere) and written with one flush. When the channel is
/// not writable, serialisation stops (nghttp2 keeps frames queued and the per-stream queues report
/// themselves unwritable) and socket reads pause, so a client that never reads cannot make the
/// server buffer without bound.
public final class HTTP2ServerConnectionHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = Never
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let settings: HTTP2Settings
    private let application: any HTTP2ServerApplication
    private var connection: HTTP2ServerConnection?
    private var context: ChannelHandlerContext?
    private var inReadCycle = false
    private var flushScheduled = false
    private var pendingRead = false
    private var blockedOnWritability = false
    private var closing = false

    /// Time between the shutdown notice and the final GOAWAY (lets in-flight requests arrive).
    public var goAwayGrace: TimeAmount = .milliseconds(200)

    public init(settings: HTTP2Settings, application: any HTTP2ServerApplication) {
        self.settings = settings
        self.application = application
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        do {
            let session = try HTTP2ServerSession(settings: settings, allocator: context.channel.allocator)
            session.delegate = application
            let conn = HTTP2ServerConnection(session: session, handler: self, eventLoop: context.eventLoop)
            connection = conn
            application.attach(conn)
        } catch {
            context.close(promise: nil)
            return
        }
        if context.channel.isActive { flushNow() }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    public func channelActive(context: ChannelHandlerContext) {
        flushNow()  // the server's SETTINGS
        context.fireChannelActive()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if let connection {
            connection.isClosed = true
            application.connectionClosed()
        }
        connection = nil
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let connection, !closing else { return }
        let bytes = unwrapInboundIn(data)
        inReadCycle = true
        do {
            try connection.session.receive(bytes)
        } catch {
            // Garbage or a fatal protocol error: send what nghttp2 queued (GOAWAY), then close.
            inReadCycle = false
            closing = true
            flushNow(force: true)
            context.close(promise: nil)
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        inReadCycle = false
        flushNow()
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            if blockedOnWritability { flushNow() }
            if pendingRead {
                pendingRead = false
                context.read()
            }
        }
        context.fireChannelWritabilityChanged()
    }

    public func read(context: ChannelHandlerContext) {
        if context.channel.isWritable || closing {
            context.read()
        } else {
            pendingRead = true
        }
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is HTTP2GracefulShutdownEvent {
            beginGracefulShutdown()
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        closing = true
        context.close(promise: nil)
    }

    private var shuttingDown = false

    private func beginGracefulShutdown() {
        guard let connection, let context, !shuttingDown else { return }
        shuttingDown = true
        connection.session.sendShutdownNotice()
        flushNow()
        context.eventLoop.assumeIsolated().scheduleTask(in: goAwayGrace) { [self] in
            guard let connection = self.connection else { return }
            connection.session.sendGoAway()
            self.flushNow()
        }
    }

    /// Requests a flush of everything the application queued: at the end of the current read
    /// cycle, or on the next event-loop tick.
    func flushSoon() {
        if inReadCycle || flushScheduled { return }
        guard let context else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { [self] in
            self.flushScheduled = false
            self.flushNow()
        }
    }

    private func flushNow(force: Bool = false) {
        guard let context, let connection else { return }
        if !force && !context.channel.isWritable {
            blockedOnWritability = true
            return
        }
        blockedOnWritability = false
        var wrote = false
        do {
            try connection.session.drainOutbound { buffer in
                context.write(wrapOutboundOut(buffer), promise: nil)
                wrote = true
            }
        } catch {
            closing = true
        }
        if wrote { context.flush() }
        if !closing && !connection.session.wantsIO { closing = true }
        if closing && !force { context.close(promise: nil) }
    }
}

/// What the application uses to answer: the session (send headers, data, trailers, resets) and
/// flush scheduling. Event-loop confined.
public final class HTTP2ServerConnection {
    public let session: HTTP2ServerSession
    public let eventLoop: any EventLoop
    /// True once the transport is gone; sends are then ignored.
    public internal(set) var isClosed = false
    private weak var handler: HTTP2ServerConnectionHandler?

    init(session: HTTP2ServerSession, handler: HTTP2ServerConnectionHandler, eventLoop: any EventLoop) {
        self.session = session
        self.handler = handler
        self.eventLoop = eventLoop
    }

    /// Makes sure what was queued goes out soon (coalesced per read cycle or loop tick).
    public func flushSoon() {
        if !isClosed { handler?.flushSoon() }
    }
}
