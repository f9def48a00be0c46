import NIOCore
import SwiftProtobuf

/// Handles one RPC. Every call happens on the connection's event loop, in wire order; handlers
/// must not block. Work that has to wait (I/O, locks) belongs elsewhere and comes back with
/// `stream.eventLoop.execute` (check `stream.isClosed` on return).
public protocol GRPCStreamHandler: AnyObject {
    /// One complete request message (its bytes, without the 5-byte prefix).
    func received(_ message: ByteBuffer, on stream: GRPCServerStream)
    /// The client half-closed: no more messages will come.
    func receivedEnd(on stream: GRPCServerStream)
    /// The RPC ended without `finish` from the handler: client reset, connection lost or deadline
    /// exceeded. Release resources; sends are ignored from now on.
    func cancelled(_ stream: GRPCServerStream)
    /// The stream's outbound queue drained after `send` reported it full.
    func writable(_ stream: GRPCServerStream)
}

extension GRPCStreamHandler {
    public func writable(_ stream: GRPCServerStream) {}
}

/// One method: its full path (`/package.Service/Method`) and a factory for per-RPC handlers.
public struct GRPCMethod: Sendable {
    public let path: String
    public let makeHandler: @Sendable (GRPCServerStream) -> any GRPCStreamHandler

    public init(path: String, makeHandler: @escaping @Sendable (GRPCServerStream) -> any GRPCStreamHandler) {
        self.path = path
        self.makeHandler = makeHandler
    }

    /// A unary method: exactly one request message, one reply (or an error status).
    public static func unary(path: String, _ body: @escaping @Sendable (ByteBuffer, GRPCServerStream) -> Void) -> GRPCMethod {
        GRPCMethod(path: path) { _ in UnaryHandler(body) }
    }
}

/// A set of methods served together.
public protocol GRPCService: Sendable {
    var methods: [GRPCMethod] { get }
}

/// Collects the single request message of a unary call.
final class UnaryHandler: GRPCStreamHandler {
    private let body: @Sendable (ByteBuffer, GRPCServerStream) -> Void
    private var request: ByteBuffer?

    init(_ body: @escaping @Sendable (ByteBuffer, GRPCServerStream) -> Void) { self.body = body }

    func received(_ message: ByteBuffer, on stream: GRPCServerStream) {
        if request != nil {
            stream.finish(GRPCStatus(.unimplemented, "unary method received more than one request message"))
            return
        }
        request = message
    }

    func receivedEnd(on stream: GRPCServerStream) {
        guard let request else {
            stream.finish(GRPCStatus(.unimplemented, "unary method received no request message"))
            return
        }
        self.request = nil
        body(request, stream)
    }

    func cancelled(_ stream: GRPCServerStream) { request = nil }
}

extension GRPCServerStream {
    /// Decodes a protobuf request, finishing the RPC with INVALID_ARGUMENT when the bytes are not a
    /// valid message.
    public func decode<M: SwiftProtobuf.Message>(_ type: M.Type, from buffer: ByteBuffer) -> M? {
        do {
            return try M(serializedBytes: ProtobufBytes(buffer))
        } catch {
            finish(GRPCStatus(.invalidArgument, "invalid \(M.protoMessageName) message: \(error)"))
            return nil
        }
    }

    /// Serialises and sends a protobuf message.
    @discardableResult
    public func send<M: SwiftProtobuf.Message>(_ message: M) -> Bool {
        do {
            let bytes: ProtobufBytes = try message.serializedBytes()
            return sendFramed(bytes.framed())
        } catch {
            finish(GRPCStatus(.internal, "cannot serialise \(M.protoMessageName): \(error)"))
            return false
        }
    }
}
