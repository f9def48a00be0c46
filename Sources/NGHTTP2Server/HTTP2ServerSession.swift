import CNGHTTP2
import NIOCore

/// Receives the events of an `HTTP2ServerSession`, synchronously, on the session's event loop.
///
/// Header name/value pointers are valid only during the call: compare bytes, do not keep them.
public protocol HTTP2ServerSessionDelegate: AnyObject {
    /// A client opened a stream (its request HEADERS began).
    func http2StreamOpened(_ id: HTTP2StreamID)
    /// One header field of the request headers (`isTrailers == false`) or of the trailers.
    func http2Header(_ id: HTTP2StreamID, name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer, isTrailers: Bool)
    /// A complete header block arrived; `endStream` means the client will send nothing more.
    func http2HeadersComplete(_ id: HTTP2StreamID, isTrailers: Bool, endStream: Bool)
    /// Request body bytes: a slice of the buffer given to `receive`, not a copy. Call `consume`
    /// once the application has taken them, so the client may send more.
    func http2Data(_ id: HTTP2StreamID, _ data: ByteBuffer)
    /// The client ended the stream with a DATA frame.
    func http2EndStream(_ id: HTTP2StreamID)
    /// The stream is gone (finished, reset by either side, or the connection ended).
    func http2StreamClosed(_ id: HTTP2StreamID, errorCode: HTTP2ErrorCode)
    /// The stream's outbound queue fell below the low-water mark after having been above the high one.
    func http2StreamWritable(_ id: HTTP2StreamID)
}

/// A thin, safe wrapper over one nghttp2 server session (one per connection).
///
/// Transport-agnostic: bytes go in through `receive` and come out of `drainOutbound`. nghttp2 does
/// framing, HPACK, stream states and flow control; this class owns per-stream outbound queues and
/// translates callbacks into `HTTP2ServerSessionDelegate` calls. Not thread-safe: confine it to one
/// event loop. Every nghttp2 callback runs synchronously inside a method of this class, which is why
/// handing nghttp2 an unretained `self` is sound.
public final class HTTP2ServerSession {
    private var session: OpaquePointer?
    public unowned(unsafe) var delegate: (any HTTP2ServerSessionDelegate)?
    let settings: HTTP2Settings
    private let allocator: ByteBufferAllocator

    /// Outbound state of streams we have started answering.
    private var outbound = StreamTable<OutboundStream>()
    /// Bytes delivered to the delegate but not yet consumed, per stream (returned to the
    /// connection window when a stream closes early).
    private var unconsumed: [HTTP2StreamID: Int] = [:]

    // Valid only during `receive`: the buffer whose memory nghttp2's data pointers point into.
    private var currentInput: ByteBuffer?
    private var currentInputBase: UnsafeRawPointer?

    // Valid only during `drainOutbound`.
    private var pendingOutput: ByteBuffer
    private var emit: ((ByteBuffer) -> Void)?

    /// Frames larger than this are passed on as slices of the application's buffers instead of
    /// being copied into the shared output buffer.
    private static let sliceThreshold = 8192

    public init(settings: HTTP2Settings = HTTP2Settings(), allocator: ByteBufferAllocator = ByteBufferAllocator()) throws {
        self.settings = settings
        self.allocator = allocator
        self.pendingOutput = allocator.buffer(capacity: 0)

        var callbacks: OpaquePointer?
        guard nghttp2_session_callbacks_new(&callbacks) == 0, let callbacks else {
            throw HTTP2SessionError(Int32(NGHTTP2_ERR_NOMEM.rawValue), "nghttp2_session_callbacks_new")
        }
        defer { nghttp2_session_callbacks_del(callbacks) }
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, cbBeginHeaders)
        nghttp2_session_callbacks_set_on_header_callback(callbacks, cbHeader)
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, cbFrameRecv)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, cbDataChunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, cbStreamClose)
        nghttp2_session_callbacks_set_send_data_callback(callbacks, cbSendData)

        var option: OpaquePointer?
        guard nghttp2_option_new(&option) == 0, let option else {
            throw HTTP2SessionError(Int32(NGHTTP2_ERR_NOMEM.rawValue), "nghttp2_option_new")
        }
        defer { nghttp2_option_del(option) }
        // Inbound flow control follows what the application consumed, not what arrived.
        nghttp2_option_set_no_auto_window_update(option, 1)
        nghttp2_option_set_max_deflate_dynamic_table_size(option, 4096)
        nghttp2_option_set_stream_reset_rate_limit(option, settings.resetBurst, settings.resetRate)

        var s: OpaquePointer?
        let rv = nghttp2_session_server_new2(&s, callbacks, Unmanaged.passUnretained(self).toOpaque(), option)
        guard rv == 0, let s else { throw HTTP2SessionError(rv, "nghttp2_session_server_new2") }
        self.session = s

        var entries = [
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue), value: settings.maxConcurrentStreams),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: settings.initialStreamWindowSize),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_FRAME_SIZE.rawValue), value: settings.maxFrameSize),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue), value: settings.maxHeaderListSize),
        ]
        var r = nghttp2_submit_settings(s, UInt8(NGHTTP2_FLAG_NONE.rawValue), &entries, entries.count)
        guard r == 0 else { throw HTTP2SessionError(r, "nghttp2_submit_settings") }
        r = nghttp2_session_set_local_window_size(s, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, Int32(clamping: settings.connectionWindowSize))
        guard r == 0 else { throw HTTP2SessionError(r, "nghttp2_session_set_local_window_size") }
    }

    deinit {
        if let session { nghttp2_session_del(session) }
    }

    // MARK: Input

    /// Feeds bytes read from the peer. Delegate callbacks fire synchronously from here.
    /// Throws on a fatal protocol error (e.g. a bad connection preface); the caller should flush
    /// what `drainOutbound` still yields (nghttp2 may have queued a GOAWAY) and close.
    public func receive(_ bytes: ByteBuffer) throws {
        guard let session else { return }
        try bytes.withUnsafeReadableBytes { raw in
            guard let base = raw.baseAddress else { return }
            currentInput = bytes
            currentInputBase = base
            defer {
                currentInput = nil
                currentInputBase = nil
            }
            let n = nghttp2_session_mem_recv(session, base.assumingMemoryBound(to: UInt8.self), raw.count)
            if n < 0 { throw HTTP2SessionError(Int32(n), "receive") }
        }
    }

    /// Returns `bytes` of a stream's received DATA to the flow-control windows (the application
    /// has processed them), letting the client send that much more.
    public func consume(_ id: HTTP2StreamID, _ bytes: Int) {
        guard let session, bytes > 0 else { return }
        if let left = unconsumed[id] {
            let n = min(left, bytes)
            if left - n == 0 { unconsumed[id] = 0 } else { unconsumed[id] = left - n }
            _ = nghttp2_session_consume(session, id, n)
        }
    }

    // MARK: Output

    /// Starts the response: HEADERS, then DATA from `sendData` until `sendTrailers`.
    /// With `endStream`, the headers end the stream (e.g. a gRPC trailers-only response).
    public func sendHeaders(_ id: HTTP2StreamID, _ headers: HTTP2HeaderBlock, endStream: Bool) {
        guard let session else { return }
        if endStream {
            _ = headers.withNVArray { nghttp2_submit_response(session, id, $0, $1, nil) }
            return
        }
        let stream = OutboundStream()
        outbound.insert(stream, for: id)
        var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: cbReadData)
        let rv = headers.withNVArray { nghttp2_submit_response(session, id, $0, $1, &provider) }
        if rv != 0 { outbound.remove(id) }
    }

    /// Queues body bytes on a stream whose headers were sent. Returns false once the stream's queue
    /// is above the high-water mark: stop producing until `http2StreamWritable`.
    @discardableResult
    public func sendData(_ id: HTTP2StreamID, _ data: ByteBuffer) -> Bool {
        guard let session, let stream = outbound[id], !stream.ended else { return false }
        if data.readableBytes > 0 {
            stream.queue.append(data)
            stream.queuedBytes += data.readableBytes
        }
        if stream.deferred {
            stream.deferred = false
            nghttp2_session_resume_data(session, id)
        }
        if stream.queuedBytes > settings.streamWriteHighWater { stream.wantsWritable = true }
        return !stream.wantsWritable
    }

    /// Ends the response with trailers (after the queued data), or with an empty DATA frame
    /// carrying END_STREAM when `trailers` is nil.
    public func sendTrailers(_ id: HTTP2StreamID, _ trailers: HTTP2HeaderBlock?) {
        guard let session, let stream = outbound[id], !stream.ended else { return }
        stream.ended = true
        stream.trailers = trailers
        if stream.deferred {
            stream.deferred = false
            nghttp2_session_resume_data(session, id)
        }
    }

    /// Whether the stream wants more data: false from the moment its queue passed the high-water
    /// mark until it drained below the low-water mark (`http2StreamWritable` then fires).
    public func isWritable(_ id: HTTP2StreamID) -> Bool {
        guard let stream = outbound[id] else { return false }
        return !stream.wantsWritable
    }

    /// Resets a stream (RST_STREAM).
    public func reset(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode) {
        guard let session else { return }
        _ = nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), id, code.rawValue)
    }

    /// First half of a graceful shutdown: a GOAWAY announcing it, streams keep working.
    public func sendShutdownNotice() {
        guard let session else { return }
        _ = nghttp2_submit_shutdown_notice(session)
    }

    /// Final GOAWAY: streams up to the last one processed may finish; newer ones are refused.
    public func sendGoAway(_ code: HTTP2ErrorCode = .noError) {
        guard let session else { return }
        let last = nghttp2_session_get_last_proc_stream_id(session)
        _ = nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), last, code.rawValue, nil, 0)
    }

    /// Streams still open in either direction.
    public var openStreamCount: Int { unconsumed.count }

    /// False once both sides are done (GOAWAY exchanged and no stream left): close the connection.
    public var wantsIO: Bool {
        guard let session else { return false }
        return nghttp2_session_want_read(session) != 0 || nghttp2_session_want_write(session) != 0
    }

    /// Serialises everything pending into buffers handed to `sink` in wire order. Large DATA
    /// payloads are passed as slices of the application's buffers (no copy).
    public func drainOutbound(_ sink: (ByteBuffer) -> Void) throws {
        guard let session else { return }
        try withoutActuallyEscaping(sink) { sink in
            emit = sink
            defer { emit = nil }
            while true {
                var ptr: UnsafePointer<UInt8>?
                let n = nghttp2_session_mem_send(session, &ptr)
                if n < 0 { throw HTTP2SessionError(Int32(n), "send") }
                if n == 0 { break }
                if let ptr { appendOutput(UnsafeRawBufferPointer(start: ptr, count: n)) }
            }
            flushPendingOutput()
        }
    }

    private func appendOutput(_ bytes: UnsafeRawBufferPointer) {
        if pendingOutput.capacity == 0 { pendingOutput = allocator.buffer(capacity: max(bytes.count, 16384)) }
        pendingOutput.writeBytes(bytes)
    }

    private func flushPendingOutput() {
        if pendingOutput.readableBytes > 0 {
            emit?(pendingOutput)
            pendingOutput = allocator.buffer(capacity: 0)
        }
    }

    // MARK: Callback bodies (called from the C trampolines below)

    fileprivate func onBeginHeaders(_ frame: UnsafePointer<nghttp2_frame>) {
        let id = frame.pointee.hd.stream_id
        if frame.pointee.headers.cat == NGHTTP2_HCAT_REQUEST {
            unconsumed[id] = 0
            delegate?.http2StreamOpened(id)
        }
    }

    fileprivate func onHeader(_ frame: UnsafePointer<nghttp2_frame>, _ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) {
        let isTrailers = frame.pointee.headers.cat != NGHTTP2_HCAT_REQUEST
        delegate?.http2Header(frame.pointee.hd.stream_id, name: name, value: value, isTrailers: isTrailers)
    }

    fileprivate func onFrameRecv(_ frame: UnsafePointer<nghttp2_frame>) {
        let hd = frame.pointee.hd
        let endStream = hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
        switch UInt32(hd.type) {
        case NGHTTP2_HEADERS.rawValue:
            let isTrailers = frame.pointee.headers.cat != NGHTTP2_HCAT_REQUEST
            delegate?.http2HeadersComplete(hd.stream_id, isTrailers: isTrailers, endStream: endStream)
        case NGHTTP2_DATA.rawValue:
            if endStream { delegate?.http2EndStream(hd.stream_id) }
        default:
            break
        }
    }

    fileprivate func onDataChunk(_ id: HTTP2StreamID, _ data: UnsafePointer<UInt8>, _ length: Int) {
        guard length > 0 else { return }
        unconsumed[id, default: 0] += length
        let slice: ByteBuffer
        if let input = currentInput, let base = currentInputBase,
           UnsafeRawPointer(data) >= base, UnsafeRawPointer(data) + length <= base + input.readableBytes {
            slice = input.getSlice(at: input.readerIndex + (UnsafeRawPointer(data) - base), length: length)!
        } else {
            // nghttp2 buffered the chunk internally; copying is the only option.
            var copy = allocator.buffer(capacity: length)
            copy.writeBytes(UnsafeRawBufferPointer(start: data, count: length))
            slice = copy
        }
        delegate?.http2Data(id, slice)
    }

    fileprivate func onStreamClose(_ id: HTTP2StreamID, _ errorCode: UInt32) {
        outbound.remove(id)
        if let left = unconsumed.removeValue(forKey: id), left > 0, let session {
            _ = nghttp2_session_consume_connection(session, left)
        }
        delegate?.http2StreamClosed(id, errorCode: HTTP2ErrorCode(rawValue: errorCode))
    }

    fileprivate func onReadData(_ id: HTTP2StreamID, _ maxLength: Int, _ flags: UnsafeMutablePointer<UInt32>) -> Int {
        guard let stream = outbound[id] else {
            return Int(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue)
        }
        let n = min(maxLength, stream.queuedBytes - stream.promised)
        if n == 0 {
            guard stream.ended else {
                stream.deferred = true
                return Int(NGHTTP2_ERR_DEFERRED.rawValue)
            }
            finishStream(id, stream, flags)
            return 0
        }
        flags.pointee |= NGHTTP2_DATA_FLAG_NO_COPY.rawValue
        stream.promised += n
        if stream.ended && stream.promised == stream.queuedBytes {
            finishStream(id, stream, flags)
        }
        return n
    }

    private func finishStream(_ id: HTTP2StreamID, _ stream: OutboundStream, _ flags: UnsafeMutablePointer<UInt32>) {
        flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
        if let trailers = stream.trailers, let session {
            flags.pointee |= NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
            _ = trailers.withNVArray { nghttp2_submit_trailer(session, id, $0, $1) }
        }
    }

    fileprivate func onSendData(_ id: HTTP2StreamID, _ frameHeader: UnsafePointer<UInt8>, _ length: Int) -> Int32 {
        guard let stream = outbound[id] else { return Int32(NGHTTP2_ERR_CALLBACK_FAILURE.rawValue) }
        appendOutput(UnsafeRawBufferPointer(start: frameHeader, count: 9))
        var remaining = length
        while remaining > 0, var head = stream.queue.first {
            let take = min(remaining, head.readableBytes)
            if take >= Self.sliceThreshold {
                flushPendingOutput()
                emit?(head.readSlice(length: take)!)
            } else {
                head.withUnsafeReadableBytes { appendOutput(UnsafeRawBufferPointer(rebasing: $0.prefix(take))) }
                head.moveReaderIndex(forwardBy: take)
            }
            if head.readableBytes == 0 {
                stream.queue.removeFirst()
            } else {
                stream.queue[stream.queue.startIndex] = head
            }
            remaining -= take
        }
        stream.queuedBytes -= length
        stream.promised -= length
        if stream.wantsWritable && stream.queuedBytes <= settings.streamWriteLowWater {
            stream.wantsWritable = false
            delegate?.http2StreamWritable(id)
        }
        return 0
    }
}

/// Per-stream outbound queue.
private final class OutboundStream {
    /// Room for the four replies of an ext_proc exchange queued in one read without regrowth
    /// (CircularBuffer doubles as soon as it is full).
    var queue = CircularBuffer<ByteBuffer>(initialCapacity: 8)
    var queuedBytes = 0
    /// Bytes announced to nghttp2 by the read callback but not yet taken by the send callback.
    var promised = 0
    var ended = false
    var deferred = false
    var wantsWritable = false
    var trailers: HTTP2HeaderBlock?
}

// MARK: C trampolines (no captures, so they convert to @convention(c))

@inline(__always)
private func sess(_ ud: UnsafeMutableRawPointer?) -> HTTP2ServerSession {
    Unmanaged<HTTP2ServerSession>.fromOpaque(ud!).takeUnretainedValue()
}

private let cbBeginHeaders: nghttp2_on_begin_headers_callback = { _, frame, ud in
    sess(ud).onBeginHeaders(frame!)
    return 0
}

private let cbHeader: nghttp2_on_header_callback = { _, frame, name, namelen, value, valuelen, _, ud in
    sess(ud).onHeader(frame!, UnsafeRawBufferPointer(start: name, count: namelen), UnsafeRawBufferPointer(start: value, count: valuelen))
    return 0
}

private let cbFrameRecv: nghttp2_on_frame_recv_callback = { _, frame, ud in
    sess(ud).onFrameRecv(frame!)
    return 0
}

private let cbDataChunk: nghttp2_on_data_chunk_recv_callback = { _, _, streamID, data, len, ud in
    sess(ud).onDataChunk(streamID, data!, len)
    return 0
}

private let cbStreamClose: nghttp2_on_stream_close_callback = { _, streamID, errorCode, ud in
    sess(ud).onStreamClose(streamID, errorCode)
    return 0
}

private let cbReadData: nghttp2_data_source_read_callback = { _, streamID, _, length, flags, _, ud in
    sess(ud).onReadData(streamID, length, flags!)
}

private let cbSendData: nghttp2_send_data_callback = { _, frame, framehd, length, _, ud in
    sess(ud).onSendData(frame!.pointee.hd.stream_id, framehd!, length)
}
