import Foundation
import Logging
import NGHTTP2Server
import NIOCore

/// Immutable routing table: method paths as bytes, matched while the `:path` header is parsed, so
/// no String is made per request.
struct GRPCRouter: Sendable {
    let paths: [[UInt8]]
    let methods: [GRPCMethod]

    init(services: [any GRPCService]) {
        let all = services.flatMap(\.methods)
        methods = all
        paths = all.map { Array($0.path.utf8) }
    }

    func route(_ path: UnsafeRawBufferPointer) -> Int? {
        for (i, p) in paths.enumerated() where p.count == path.count {
            if p.withUnsafeBytes({ $0.elementsEqual(path) }) { return i }
        }
        return nil
    }
}

/// Per-connection gRPC protocol state: request header validation, routing, message framing,
/// deadlines, status trailers. Runs entirely on the connection's event loop.
final class GRPCConnection: HTTP2ServerApplication {
    private let router: GRPCRouter
    private let maxMessageBytes: Int
    private let logger: Logger
    private var connection: HTTP2ServerConnection!
    private var calls = StreamTable<Call>()

    /// Request-side state of one stream.
    private final class Call {
        let stream: GRPCServerStream
        var route: Int?
        var pathSeen = false
        var isPOST = false
        var contentTypeOK = false
        var timeoutNanos: Int64?
        var unsupportedEncoding: String?
        var rejected = false
        /// Partially received message, sized from its prefix.
        var pending: ByteBuffer?
        var pendingLength = -1
        var pendingCompressed = false
        init(stream: GRPCServerStream) { self.stream = stream }
    }

    init(router: GRPCRouter, maxMessageBytes: Int, logger: Logger) {
        self.router = router
        self.maxMessageBytes = maxMessageBytes
        self.logger = logger
    }

    func attach(_ connection: HTTP2ServerConnection) {
        self.connection = connection
    }

    // MARK: HTTP/2 events

    func http2StreamOpened(_ id: HTTP2StreamID) {
        let call = Call(stream: GRPCServerStream(id: id, connection: self, eventLoop: connection.eventLoop))
        calls.insert(call, for: id)
    }

    func http2Header(_ id: HTTP2StreamID, name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer, isTrailers: Bool) {
        guard !isTrailers, let call = calls[id] else { return }
        guard let first = name.first else { return }
        if first == UInt8(ascii: ":") {
            if name.equals(":path") {
                call.pathSeen = true
                call.route = router.route(value)
            } else if name.equals(":method") {
                call.isPOST = value.equals("POST")
            }
            return
        }
        switch name.count {
        case 12 where name.equals("content-type"):
            // application/grpc, optionally +proto or ;params
            let prefix = "application/grpc".utf8
            call.contentTypeOK = value.count >= prefix.count && value.prefix(prefix.count).elementsEqual(prefix)
                && (value.count == prefix.count || value[prefix.count] == UInt8(ascii: "+") || value[prefix.count] == UInt8(ascii: ";"))
        case 12 where name.equals("grpc-timeout"):
            call.timeoutNanos = parseGRPCTimeout(value)
        case 13 where name.equals("grpc-encoding"):
            if !value.equals("identity") {
                call.unsupportedEncoding = String(decoding: value, as: UTF8.self)
            }
        default:
            break
        }
    }

    func http2HeadersComplete(_ id: HTTP2StreamID, isTrailers: Bool, endStream: Bool) {
        guard let call = calls[id] else { return }
        if isTrailers {
            if endStream { http2EndStream(id) }
            return
        }
        let stream = call.stream
        if !call.isPOST {
            rejectHTTP(call, status: "405")
            return
        }
        if !call.contentTypeOK {
            rejectHTTP(call, status: "415")
            return
        }
        guard let route = call.route else {
            reject(call, GRPCStatus(.unimplemented, "unknown method"))
            return
        }
        if let encoding = call.unsupportedEncoding {
            reject(call, GRPCStatus(.unimplemented, "grpc-encoding \(encoding) is not supported (identity only)"))
            return
        }
        if let timeout = call.timeoutNanos {
            stream.deadline = connection.eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(timeout)) { [weak self, weak stream] in
                guard let stream else { return }
                self?.deadlineExceeded(stream)
            }
        }
        stream.handler = router.methods[route].makeHandler(stream)
        if endStream { http2EndStream(id) }
    }

    func http2Data(_ id: HTTP2StreamID, _ data: ByteBuffer) {
        guard let call = calls[id] else { return }
        let length = data.readableBytes
        // Bytes are handed on (or dropped) synchronously, so the window can reopen right away;
        // back-pressure comes from the outbound side holding `consume` back (see `writable`).
        if call.rejected || call.stream.isClosed {
            connection.session.consume(id, length)
            return
        }
        deframe(call, data)
        if !call.stream.isClosed && !call.stream.connection.isWritable(call.stream) && call.stream.headersSent {
            heldBack[id, default: 0] += length
        } else {
            connection.session.consume(id, length)
        }
    }

    /// Bytes not yet returned to the window because the stream's reply queue is full.
    private var heldBack: [HTTP2StreamID: Int] = [:]

    func http2EndStream(_ id: HTTP2StreamID) {
        guard let call = calls[id], !call.rejected, !call.stream.isClosed else { return }
        if call.pending != nil || call.pendingLength >= 0 {
            call.stream.finish(GRPCStatus(.internal, "request stream ended inside a message"))
            return
        }
        call.stream.handler?.receivedEnd(on: call.stream)
    }

    func http2StreamClosed(_ id: HTTP2StreamID, errorCode: HTTP2ErrorCode) {
        if !heldBack.isEmpty { heldBack[id] = nil }
        guard let call = calls.remove(id) else { return }
        let stream = call.stream
        stream.deadline?.cancel()
        stream.deadline = nil
        if !stream.isClosed {
            stream.isClosed = true
            stream.handler?.cancelled(stream)
        }
        stream.handler = nil
    }

    func http2StreamWritable(_ id: HTTP2StreamID) {
        if let held = heldBack.removeValue(forKey: id) {
            connection.session.consume(id, held)
            connection.flushSoon()
        }
        guard let call = calls[id], !call.stream.isClosed else { return }
        call.stream.handler?.writable(call.stream)
    }

    func connectionClosed() {
        let all = Array(calls.all)
        calls.removeAll()
        heldBack.removeAll()
        for call in all {
            let stream = call.stream
            stream.deadline?.cancel()
            if !stream.isClosed {
                stream.isClosed = true
                stream.handler?.cancelled(stream)
            }
            stream.handler = nil
        }
    }

    // MARK: Framing

    private func deframe(_ call: Call, _ data: ByteBuffer) {
        var data = data
        while data.readableBytes > 0 && !call.stream.isClosed {
            if call.pendingLength < 0 {
                // Waiting for (the rest of) a 5-byte prefix.
                if call.pending == nil, data.readableBytes >= 5 {
                    let flag = data.readInteger(as: UInt8.self)!
                    let length = Int(data.readInteger(as: UInt32.self)!)
                    guard beginMessage(call, compressed: flag != 0, length: length) else { return }
                    if data.readableBytes >= length {
                        // Whole message inside this chunk: a slice, no copy.
                        let message = data.readSlice(length: length)!
                        call.pendingLength = -1
                        deliver(call, message)
                        continue
                    }
                    var buffer = ProtobufBytes.allocator.buffer(capacity: length)
                    buffer.writeBuffer(&data)
                    call.pending = buffer
                    continue
                }
                var header = call.pending ?? ProtobufBytes.allocator.buffer(capacity: 5)
                call.pending = nil  // no second reference: appending must not copy the buffer
                let need = 5 - header.readableBytes
                var piece = data.readSlice(length: min(need, data.readableBytes))!
                header.writeBuffer(&piece)
                if header.readableBytes < 5 {
                    call.pending = header
                    return
                }
                let flag = header.readInteger(as: UInt8.self)!
                let length = Int(header.readInteger(as: UInt32.self)!)
                guard beginMessage(call, compressed: flag != 0, length: length) else { return }
                if length == 0 {
                    call.pendingLength = -1
                    deliver(call, ProtobufBytes.allocator.buffer(capacity: 0))
                    continue
                }
                call.pending = ProtobufBytes.allocator.buffer(capacity: length)
            } else {
                var buffer = call.pending!
                call.pending = nil
                let take = min(call.pendingLength - buffer.readableBytes, data.readableBytes)
                var piece = data.readSlice(length: take)!
                buffer.writeBuffer(&piece)
                if buffer.readableBytes == call.pendingLength {
                    call.pendingLength = -1
                    deliver(call, buffer)
                } else {
                    call.pending = buffer
                }
            }
        }
    }

    /// Validates a message prefix; finishes the call when the message cannot be accepted.
    private func beginMessage(_ call: Call, compressed: Bool, length: Int) -> Bool {
        if compressed {
            call.stream.finish(GRPCStatus(.unimplemented, "compressed message received but no grpc-encoding is supported (identity only)"))
            return false
        }
        if length > maxMessageBytes {
            call.stream.finish(GRPCStatus(.resourceExhausted, "message of \(length) bytes exceeds the limit of \(maxMessageBytes) bytes"))
            return false
        }
        call.pendingLength = length
        return true
    }

    private func deliver(_ call: Call, _ message: ByteBuffer) {
        guard let handler = call.stream.handler else { return }
        handler.received(message, on: call.stream)
    }

    // MARK: Responses

    private static let responseHeaders = HTTP2HeaderBlock([(":status", "200"), ("content-type", "application/grpc")])
    private static let okTrailers = HTTP2HeaderBlock([("grpc-status", "0")])

    func isWritable(_ stream: GRPCServerStream) -> Bool {
        !stream.headersSent || connection.session.isWritable(stream.id)
    }

    func sendFramed(_ stream: GRPCServerStream, _ framed: ByteBuffer, flush: Bool) -> Bool {
        guard !stream.isClosed, !connection.isClosed else { return false }
        if !stream.headersSent {
            stream.headersSent = true
            connection.session.sendHeaders(stream.id, Self.responseHeaders, endStream: false)
        }
        let ok = connection.session.sendData(stream.id, framed)
        if flush { connection.flushSoon() }
        return ok
    }

    func finish(_ stream: GRPCServerStream, _ status: GRPCStatus) {
        guard !stream.isClosed else { return }
        stream.isClosed = true
        stream.deadline?.cancel()
        stream.deadline = nil
        if let call = calls[stream.id] {
            // Whatever the client still sends is dropped: give its window back.
            call.rejected = true
            call.pending = nil
        }
        if !connection.isClosed {
            if stream.headersSent {
                connection.session.sendTrailers(stream.id, trailers(status))
            } else {
                var block = Self.responseHeaders
                appendStatus(&block, status)
                connection.session.sendHeaders(stream.id, block, endStream: true)
            }
            connection.flushSoon()
        }
        stream.handler = nil
    }

    private func trailers(_ status: GRPCStatus) -> HTTP2HeaderBlock {
        if status.code == .ok && status.message.isEmpty { return Self.okTrailers }
        var block = HTTP2HeaderBlock()
        appendStatus(&block, status)
        return block
    }

    private func appendStatus(_ block: inout HTTP2HeaderBlock, _ status: GRPCStatus) {
        if status.code == .ok {
            block.add("grpc-status", "0")
        } else {
            block.add(name: "grpc-status", value: String(status.code.rawValue))
        }
        if !status.message.isEmpty {
            block.add(name: "grpc-message", value: GRPCStatus.percentEncode(status.message))
        }
        if status.code == .unimplemented {
            block.add("grpc-accept-encoding", "identity")
        }
    }

    private func reject(_ call: Call, _ status: GRPCStatus) {
        call.rejected = true
        finish(call.stream, status)
    }

    private func rejectHTTP(_ call: Call, status: StaticString) {
        call.rejected = true
        call.stream.isClosed = true
        connection.session.sendHeaders(call.stream.id, HTTP2HeaderBlock([(":status", status)]), endStream: true)
        connection.flushSoon()
    }

    private func deadlineExceeded(_ stream: GRPCServerStream) {
        guard !stream.isClosed else { return }
        stream.deadline = nil
        let handler = stream.handler
        finish(stream, GRPCStatus(.deadlineExceeded, "deadline exceeded"))
        handler?.cancelled(stream)
    }
}

extension UnsafeRawBufferPointer {
    /// Byte equality with a constant (header names on the per-request path), without going
    /// through generic sequence comparison.
    @inlinable
    public func equals(_ s: StaticString) -> Bool {
        count == s.utf8CodeUnitCount && (count == 0 || memcmp(baseAddress!, s.utf8Start, count) == 0)
    }
}
