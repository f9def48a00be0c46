import NGHTTP2Server
import NIOCore

/// The server side of one RPC, handed to its `GRPCStreamHandler`. Event-loop confined.
public final class GRPCServerStream {
    public let id: HTTP2StreamID
    public let eventLoop: any EventLoop
    public var allocator: ByteBufferAllocator { ProtobufBytes.allocator }

    // Strong: a handler may keep its stream after the connection is gone; `isClosed` then guards.
    let connection: GRPCConnection
    var handler: (any GRPCStreamHandler)?
    var headersSent = false
    /// True once the status went out or the stream died; everything after is ignored.
    public internal(set) var isClosed = false
    var deadline: Scheduled<Void>?

    init(id: HTTP2StreamID, connection: GRPCConnection, eventLoop: any EventLoop) {
        self.id = id
        self.connection = connection
        self.eventLoop = eventLoop
    }

    /// Whether more messages can be sent without exceeding the stream's buffer bound.
    public var isWritable: Bool { !isClosed && connection.isWritable(self) }

    /// Sends one message (payload without prefix). Returns false when the stream is full or closed:
    /// wait for `GRPCStreamHandler.writable` before producing more.
    @discardableResult
    public func send(_ payload: ByteBuffer) -> Bool {
        var framed = allocator.buffer(capacity: 5 + min(payload.readableBytes, 8192))
        framed.writeInteger(UInt8(0))
        framed.writeInteger(UInt32(payload.readableBytes))
        if payload.readableBytes < 8192 {
            var p = payload
            framed.writeBuffer(&p)
            return sendFramed(framed)
        }
        // Large payloads go out as they are: the HTTP/2 layer sends slices without copying. Both
        // parts are always queued (a prefix without its payload would corrupt the stream); the
        // result only tells the caller to pause.
        _ = connection.sendFramed(self, framed, flush: false)
        return connection.sendFramed(self, payload, flush: true)
    }

    /// Sends a message whose buffer already starts with the 5-byte gRPC prefix (for encoders that
    /// write straight into the frame).
    @discardableResult
    public func sendFramed(_ framed: ByteBuffer) -> Bool {
        connection.sendFramed(self, framed, flush: true)
    }

    /// Ends the RPC with a status (trailers, or a trailers-only response when nothing was sent).
    public func finish(_ status: GRPCStatus) {
        connection.finish(self, status)
    }
}
