import CNGHTTP2
import NIOCore

/// A thin wrapper over an nghttp2 *client* session that carries one request and its response:
/// enough for small unary calls the picker makes itself (the OTLP/gRPC span exporter).
///
/// Transport-agnostic like `HTTP2ServerSession`: bytes go in through `receive` and come out of
/// `drainOutbound`; nghttp2 does framing, HPACK, SETTINGS and flow control (automatic window
/// updates: the response is small and read whole). Confine it to one event loop.
public final class HTTP2ClientSession {
    public struct Response: Sendable {
        /// Response header fields (`:status` among them), then trailer fields.
        public var headers: [(String, String)] = []
        public var trailers: [(String, String)] = []
        public var body: [UInt8] = []
        /// `.noError` when the stream ended normally; else the RST_STREAM / GOAWAY code.
        public var closeCode = HTTP2ErrorCode.noError
    }

    private var session: OpaquePointer?
    private var streamID: HTTP2StreamID = -1
    private var body: [UInt8] = []
    private var bodyOffset = 0
    private var partial = Response()
    /// Set once the request's stream has closed.
    public private(set) var response: Response?

    public init() throws {
        var callbacks: OpaquePointer?
        guard nghttp2_session_callbacks_new(&callbacks) == 0, let callbacks else {
            throw HTTP2SessionError(Int32(NGHTTP2_ERR_NOMEM.rawValue), "nghttp2_session_callbacks_new")
        }
        defer { nghttp2_session_callbacks_del(callbacks) }
        nghttp2_session_callbacks_set_on_header_callback(callbacks, clientHeader)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, clientDataChunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, clientStreamClose)
        var s: OpaquePointer?
        let rv = nghttp2_session_client_new(&s, callbacks, Unmanaged.passUnretained(self).toOpaque())
        guard rv == 0, let s else { throw HTTP2SessionError(rv, "nghttp2_session_client_new") }
        session = s
        let r = nghttp2_submit_settings(s, UInt8(NGHTTP2_FLAG_NONE.rawValue), nil, 0)
        guard r == 0 else { throw HTTP2SessionError(r, "nghttp2_submit_settings") }
    }

    deinit {
        if let session { nghttp2_session_del(session) }
    }

    /// Queues the request: `headers` (pseudo-headers first) and `body`, which ends the stream.
    public func submitRequest(_ headers: HTTP2HeaderBlock, body: [UInt8]) throws {
        guard let session, streamID < 0 else { throw HTTP2SessionError(Int32(NGHTTP2_ERR_INVALID_STATE.rawValue), "submitRequest") }
        self.body = body
        var provider = nghttp2_data_provider()
        provider.read_callback = clientReadBody
        let id = headers.withNVArray { nva, count in
            nghttp2_submit_request(session, nil, nva, count, &provider, nil)
        }
        guard id > 0 else { throw HTTP2SessionError(id, "nghttp2_submit_request") }
        streamID = id
    }

    /// Feeds bytes read from the server; the response completes from here.
    public func receive(_ bytes: ByteBuffer) throws {
        guard let session else { return }
        try bytes.withUnsafeReadableBytes { raw in
            guard let base = raw.baseAddress else { return }
            let n = nghttp2_session_mem_recv(session, base.assumingMemoryBound(to: UInt8.self), raw.count)
            if n < 0 { throw HTTP2SessionError(Int32(n), "receive") }
        }
    }

    /// What is ready to send (connection preface, SETTINGS, the request, acknowledgements), or nil.
    public func drainOutbound(allocator: ByteBufferAllocator) throws -> ByteBuffer? {
        guard let session else { return nil }
        var out: ByteBuffer?
        while true {
            var chunk: UnsafePointer<UInt8>?
            let n = nghttp2_session_mem_send(session, &chunk)
            if n < 0 { throw HTTP2SessionError(Int32(n), "send") }
            guard n > 0, let chunk else { break }
            if out == nil { out = allocator.buffer(capacity: max(n, 1024)) }
            out!.writeBytes(UnsafeRawBufferPointer(start: chunk, count: n))
        }
        return out
    }

    /// The connection ended before the response did.
    public func connectionClosed() {
        if response == nil {
            partial.closeCode = .cancel
            response = partial
        }
    }

    // MARK: Callbacks

    fileprivate func onHeader(_ frame: UnsafePointer<nghttp2_frame>, _ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) {
        guard frame.pointee.hd.stream_id == streamID else { return }
        let field = (String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
        if frame.pointee.headers.cat == NGHTTP2_HCAT_HEADERS && partial.headers.contains(where: { $0.0 == ":status" }) {
            partial.trailers.append(field)
        } else {
            partial.headers.append(field)
        }
    }

    fileprivate func onData(_ id: Int32, _ data: UnsafePointer<UInt8>, _ count: Int) {
        guard id == streamID else { return }
        partial.body.append(contentsOf: UnsafeBufferPointer(start: data, count: count))
    }

    fileprivate func onStreamClose(_ id: Int32, _ code: UInt32) {
        guard id == streamID else { return }
        partial.closeCode = HTTP2ErrorCode(rawValue: code)
        response = partial
    }

    fileprivate func readBody(_ buffer: UnsafeMutablePointer<UInt8>, _ length: Int, _ flags: UnsafeMutablePointer<UInt32>) -> Int {
        let n = min(length, body.count - bodyOffset)
        if n > 0 {
            body.withUnsafeBytes { UnsafeMutableRawPointer(buffer).copyMemory(from: $0.baseAddress! + bodyOffset, byteCount: n) }
            bodyOffset += n
        }
        if bodyOffset == body.count { flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue }
        return n
    }
}

private func clientSession(_ ud: UnsafeMutableRawPointer?) -> HTTP2ClientSession {
    Unmanaged<HTTP2ClientSession>.fromOpaque(ud!).takeUnretainedValue()
}

private let clientHeader: nghttp2_on_header_callback = { _, frame, name, namelen, value, valuelen, _, ud in
    clientSession(ud).onHeader(frame!, UnsafeRawBufferPointer(start: name, count: namelen),
                               UnsafeRawBufferPointer(start: value, count: valuelen))
    return 0
}

private let clientDataChunk: nghttp2_on_data_chunk_recv_callback = { _, _, streamID, data, len, ud in
    clientSession(ud).onData(streamID, data!, len)
    return 0
}

private let clientStreamClose: nghttp2_on_stream_close_callback = { _, streamID, errorCode, ud in
    clientSession(ud).onStreamClose(streamID, errorCode)
    return 0
}

private let clientReadBody: nghttp2_data_source_read_callback = { _, _, buf, length, flags, _, ud in
    clientSession(ud).readBody(buf!, length, flags!)
}
