import COpenSSL
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Which side of the handshake a handler plays.
public enum TLSRole: Sendable {
    case server
    /// `serverHostname` may be a DNS name or an IP literal (IPv6 with or without brackets). The certificate is
    /// checked against DNS or IP SANs respectively (unless the context skips verification); a DNS name is also
    /// sent as SNI. nil: no SNI and only the chain is verified.
    case client(serverHostname: String?)
}

/// Fired as a user inbound event once the handshake completes.
public struct TLSHandshakeCompleted: Sendable {
    public let negotiatedALPN: String?
}

/// TLS as a NIO channel handler over OpenSSL memory BIOs.
/// Inbound: ciphertext `ByteBuffer` → plaintext `ByteBuffer`. Outbound: plaintext → ciphertext.
///
/// Writes issued before the handshake completes are buffered and sent after it. Plaintext writes are
/// encrypted on flush and their promises complete when the ciphertext write completes. Failures
/// (bad handshake, bad record, verification, ALPN) are fired as `TLSError` via `errorCaught` and the channel
/// is closed. `close` sends close_notify first (best effort, bounded by a timeout).
/// Event-loop confined, like every NIO handler.
///
/// Limits: a peer closing TCP without close_notify is reported as a plain channelInactive (HTTP/2 and gRPC frame
/// their own ends, so truncation is detectable above); removing the handler mid-connection drops any TLS state
/// it buffers; TLS 1.2 renegotiation is refused.
public final class OpenSSLHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private enum State {
        case idle          // not yet started (channel not active)
        case handshaking
        case active
        case closing       // close_notify sent, waiting for it to be written
        case closed        // failed, closed or inactive: nothing more goes through
    }

    private struct PendingWrite {
        var data: ByteBuffer
        var promise: EventLoopPromise<Void>?
    }

    /// Plaintext read buffers start at this size: a full TLS record fits, tiny records don't each allocate.
    private static let readBufferSize = 16 * 1024
    private static let maxReadBufferSize = 64 * 1024
    /// Ciphertext produced by one flush is handed downstream in chunks of about this size.
    private static let writeChunkSize = 256 * 1024
    /// Consecutive flushed writes smaller than this are copied together and encrypted as one record
    /// (fewer records: less framing and fewer AEAD setups), up to `coalescedRecordSize`.
    private static let coalesceThreshold = 2048
    private static let coalescedRecordSize = 16 * 1024
    /// How long `close` waits for the close_notify write before closing anyway.
    private static let closeNotifyTimeout = TimeAmount.seconds(3)

    private let tlsContext: TLSContext
    private let role: TLSRole
    private let ssl: OpaquePointer?
    private let rbio: OpaquePointer?   // owned by ssl
    private let wbio: OpaquePointer?   // owned by ssl
    private let setupError: String?    // why ssl is nil, reported when the channel starts
    private let handshakeTimeout: TimeAmount?
    private var handshakeTimer: Scheduled<Void>?
    private var state = State.idle
    private var pendingWrites = CircularBuffer<PendingWrite>(initialCapacity: 8)
    private var flushedWriteCount = 0  // leading entries of pendingWrites covered by a flush
    private var encrypting = false     // inside encryptAndFlush (a downstream write may re-enter flush())
    private var readBuffer: ByteBuffer?
    private var readPending = false    // downstream asked for read() and got no plaintext yet
    private var outputClosed = false   // close(mode: .output) sent close_notify
    private var closePromise: EventLoopPromise<Void>?
    private var closeTimeout: Scheduled<Void>?

    /// The ALPN protocol agreed during the handshake (nil before it completes or if none was negotiated).
    public private(set) var negotiatedALPN: String?
    /// The negotiated protocol version, e.g. "TLSv1.3" (nil before the handshake completes).
    public private(set) var negotiatedProtocolVersion: String?

    /// `handshakeTimeout`: a connection whose handshake has not completed this long after the channel became
    /// active fails with a `TLSError` and is closed (stops idle or slow-drip peers from holding connections);
    /// nil disables it.
    public init(context: TLSContext, role: TLSRole, handshakeTimeout: TimeAmount? = .seconds(10)) {
        self.tlsContext = context
        self.role = role
        self.handshakeTimeout = handshakeTimeout
        var setupError: String?
        var ssl = SSL_new(context.ctx)
        var rbio = BIO_new(BIO_s_mem())
        var wbio = BIO_new(BIO_s_mem())
        let roleMatches: Bool
        if case .server = role { roleMatches = context.isServer } else { roleMatches = !context.isServer }
        if !roleMatches {
            if let s = ssl { SSL_free(s) }
            if let r = rbio { BIO_free(r) }
            if let w = wbio { BIO_free(w) }
            ssl = nil; rbio = nil; wbio = nil
            setupError = context.isServer ? "a server TLSContext used for a client connection" : "a client TLSContext used for a server connection"
        } else if let s = ssl, let r = rbio, let w = wbio {
            // An empty memory BIO reports "retry" (WANT_READ) rather than EOF.
            _ = shim_BIO_set_mem_eof_return(r, -1)
            _ = shim_BIO_set_mem_eof_return(w, -1)
            SSL_set_bio(s, r, w)
            switch role {
            case .server:
                SSL_set_accept_state(s)
            case .client(let hostname):
                SSL_set_connect_state(s)
                if let hostname, !Self.configureClientHostname(s, hostname, verify: context.verifiesPeer) {
                    SSL_free(s)
                    ssl = nil; rbio = nil; wbio = nil
                    setupError = "invalid server host name \"\(hostname)\""
                }
            }
        } else {
            if let s = ssl { SSL_free(s) }
            if let r = rbio { BIO_free(r) }
            if let w = wbio { BIO_free(w) }
            ssl = nil; rbio = nil; wbio = nil
            setupError = "cannot create the TLS session (out of memory?)"
        }
        ERR_clear_error()
        self.setupError = setupError
        self.ssl = ssl
        self.rbio = rbio
        self.wbio = wbio
    }

    deinit {
        if let ssl { SSL_free(ssl) }
    }

    /// SNI for DNS names; host or IP SAN check when verifying.
    private static func configureClientHostname(_ ssl: OpaquePointer, _ name: String, verify: Bool) -> Bool {
        // URL-style IPv6 literals ("[::1]") are accepted too.
        let hostname = name.hasPrefix("[") && name.hasSuffix("]") ? String(name.dropFirst().dropLast()) : name
        let isIP = hostname.withCString { name -> Bool in
            var v4 = in_addr()
            var v6 = in6_addr()
            return inet_pton(AF_INET, name, &v4) == 1 || inet_pton(AF_INET6, name, &v6) == 1
        }
        if !isIP {
            guard shim_SSL_set_tlsext_host_name(ssl, hostname) == 1 else { return false }
        }
        guard verify else { return true }
        guard let param = SSL_get0_param(ssl) else { return false }
        if isIP {
            return X509_VERIFY_PARAM_set1_ip_asc(param, hostname) == 1
        }
        X509_VERIFY_PARAM_set_hostflags(param, UInt32(X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS))
        return X509_VERIFY_PARAM_set1_host(param, hostname, 0) == 1
    }

    // MARK: Lifecycle

    public func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { start(context: context) }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        cancelTimers()
        closeTimeout = nil
        failPendingWrites(ChannelError.ioOnClosedChannel)
    }

    public func channelActive(context: ChannelHandlerContext) {
        // Downstream first: its channelActive writes (e.g. HTTP/2 SETTINGS) are buffered until the handshake is done.
        context.fireChannelActive()
        start(context: context)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        state = .closed
        cancelTimers()
        failPendingWrites(ChannelError.ioOnClosedChannel)
        if let promise = closePromise {
            closePromise = nil
            promise.succeed()
        }
        context.fireChannelInactive()
    }

    private func start(context: ChannelHandlerContext) {
        guard state == .idle else { return }
        guard ssl != nil else {
            fail(context: context, error: TLSError(setupError ?? "no TLS session"))
            return
        }
        state = .handshaking
        if let handshakeTimeout {
            handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: handshakeTimeout) {
                guard self.state == .handshaking else { return }
                self.fail(context: context, error: TLSError("TLS handshake timed out after \(handshakeTimeout)"))
            }
        }
        if case .client = role {
            doHandshake(context: context)  // sends the ClientHello
        }
    }

    // MARK: Inbound

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if state == .idle { start(context: context) }
        guard state == .handshaking || state == .active, let rbio else { return }  // closing/closed: drop
        let ciphertext = unwrapInboundIn(data)
        ERR_clear_error()
        let written = ciphertext.withUnsafeReadableBytes { raw -> Bool in
            var offset = 0
            while offset < raw.count {
                let n = BIO_write(rbio, raw.baseAddress! + offset, Int32(clamping: raw.count - offset))
                guard n > 0 else { return false }
                offset += Int(n)
            }
            return true
        }
        guard written else {
            fail(context: context, error: TLSError.drainingQueue("cannot buffer inbound TLS data"))
            return
        }
        if state == .handshaking {
            doHandshake(context: context)
        }
        if state == .active {
            readPlaintext(context: context)
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        context.fireChannelReadComplete()
        // Ciphertext that produced no plaintext (handshake, partial record) must not swallow the downstream's
        // read() request, or a channel with autoRead off would stall.
        if readPending && state != .closed {
            context.read()
        }
    }

    public func read(context: ChannelHandlerContext) {
        readPending = true
        context.read()
    }

    private func doHandshake(context: ChannelHandlerContext) {
        guard let ssl else { return }
        ERR_clear_error()
        let rc = SSL_do_handshake(ssl)
        if rc == 1 {
            state = .active
            handshakeTimer?.cancel()
            handshakeTimer = nil
            var protocolName: UnsafePointer<UInt8>?
            var protocolLength: UInt32 = 0
            SSL_get0_alpn_selected(ssl, &protocolName, &protocolLength)
            if let protocolName, protocolLength > 0 {
                negotiatedALPN = String(decoding: UnsafeBufferPointer(start: protocolName, count: Int(protocolLength)), as: UTF8.self)
            }
            negotiatedProtocolVersion = SSL_get_version(ssl).map { String(cString: $0) }
            // Handshake output (Finished, tickets) plus any plaintext flushed while handshaking, in order.
            encryptAndFlush(context: context)
            guard state == .active else { return }
            context.fireUserInboundEventTriggered(TLSHandshakeCompleted(negotiatedALPN: negotiatedALPN))
            return
        }
        switch SSL_get_error(ssl, rc) {
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
            writeHandshakeOutput(context: context)
        default:
            fail(context: context, error: handshakeError(ssl))
        }
    }

    private func handshakeError(_ ssl: OpaquePointer) -> TLSError {
        var errors = drainOpenSSLErrorQueue()
        let verifyResult = SSL_get_verify_result(ssl)
        if verifyResult != X509_V_OK, let text = X509_verify_cert_error_string(verifyResult) {
            errors.append("certificate verification: \(String(cString: text))")
        }
        return TLSError("TLS handshake failed", openSSLErrors: errors)
    }

    /// Decrypts everything decryptable into (reused) buffers of 16-64 KiB, one fireChannelRead per buffer.
    /// A received alert (e.g. the server refusing our client certificate after a TLS 1.3 handshake) ends up here.
    private func readPlaintext(context: ChannelHandlerContext) {
        guard let ssl, let rbio else { return }
        let wanted = min(max(Self.readBufferSize, Int(BIO_ctrl_pending(rbio))), Self.maxReadBufferSize)
        var buffer: ByteBuffer
        if var reused = readBuffer {
            readBuffer = nil
            reused.clear(minimumCapacity: wanted)  // allocates only if downstream kept the last one
            buffer = reused
        } else {
            buffer = context.channel.allocator.buffer(capacity: wanted)
        }
        var peerClosed = false
        var failure: TLSError?
        while true {
            if buffer.writableBytes == 0 {
                deliver(context: context, &buffer)
                guard state == .active else { return }
                buffer.clear(minimumCapacity: wanted)
            }
            var rc: Int32 = 0
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 0) { raw in
                rc = SSL_read(ssl, raw.baseAddress, Int32(clamping: raw.count))
                return rc > 0 ? Int(rc) : 0
            }
            if rc > 0 { continue }
            switch SSL_get_error(ssl, rc) {
            case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
                break
            case SSL_ERROR_ZERO_RETURN:
                peerClosed = true
            default:
                failure = TLSError.drainingQueue("TLS read failed")
            }
            break
        }
        if buffer.readableBytes > 0 {
            deliver(context: context, &buffer)
            // Detach from the storage just handed downstream (a decoder appending to it must not pay a CoW copy);
            // if downstream did not keep it, this reuses the capacity without allocating.
            buffer.clear()
        }
        // Keep one standard-size buffer per connection; a grown one is not worth holding while idle.
        readBuffer = buffer.capacity <= Self.readBufferSize ? buffer : nil
        if let failure {
            fail(context: context, error: failure)
            return
        }
        guard state == .active else { return }
        if peerClosed {
            // The peer sent close_notify: answer with ours and close.
            beginClose(context: context, promise: nil)
            return
        }
        // Post-handshake messages (e.g. a KeyUpdate answer) may have been produced while reading.
        writeHandshakeOutput(context: context)
    }

    private func deliver(context: ChannelHandlerContext, _ buffer: inout ByteBuffer) {
        readPending = false
        context.fireChannelRead(wrapInboundOut(buffer))
    }

    // MARK: Outbound

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch state {
        case .closing, .closed:
            promise?.fail(ChannelError.ioOnClosedChannel)
        case .idle, .handshaking, .active:
            if outputClosed {
                promise?.fail(ChannelError.outputClosed)
                return
            }
            pendingWrites.append(PendingWrite(data: unwrapOutboundIn(data), promise: promise))
        }
    }

    public func flush(context: ChannelHandlerContext) {
        flushedWriteCount = pendingWrites.count
        // Re-entered from a downstream write (e.g. a writability change handler flushing): the running
        // encryptAndFlush loop picks the newly flushed writes up, keeping order.
        if state == .active && !encrypting {
            encryptAndFlush(context: context)
        }
    }

    public func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        switch mode {
        case .input:
            context.close(mode: .input, promise: promise)
        case .output:
            if state == .active && !outputClosed {
                failPendingWrites(ChannelError.outputClosed)
                sendCloseNotify(context: context, promise: nil)
                outputClosed = true
            }
            context.close(mode: .output, promise: promise)
        case .all:
            beginClose(context: context, promise: promise)
        }
    }

    /// Writes close_notify (when the session is up) and closes once it is written or after a timeout.
    private func beginClose(context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        switch state {
        case .closing:
            if let promise {
                if let closePromise { closePromise.futureResult.cascade(to: promise) } else { closePromise = promise }
            }
        case .closed:
            context.close(mode: .all, promise: promise)
        case .idle, .handshaking:
            state = .closed
            cancelTimers()
            failPendingWrites(ChannelError.ioOnClosedChannel)
            context.close(mode: .all, promise: promise)
        case .active:
            state = .closing
            failPendingWrites(ChannelError.ioOnClosedChannel)  // unflushed writes, as NIO does on close
            closePromise = promise
            if outputClosed {
                finishClose(context: context)
                return
            }
            let written = context.eventLoop.makePromise(of: Void.self)
            sendCloseNotify(context: context, promise: written)
            closeTimeout = context.eventLoop.assumeIsolated().scheduleTask(in: Self.closeNotifyTimeout) {
                self.finishClose(context: context)
            }
            written.futureResult.assumeIsolated().whenComplete { _ in
                self.finishClose(context: context)
            }
        }
    }

    private func finishClose(context: ChannelHandlerContext) {
        guard state == .closing else { return }
        state = .closed
        cancelTimers()
        let promise = closePromise
        closePromise = nil
        context.close(mode: .all, promise: promise)
    }

    private func sendCloseNotify(context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        guard let ssl else { promise?.succeed(); return }
        ERR_clear_error()
        _ = SSL_shutdown(ssl)  // 0: close_notify queued, peer's not yet seen; we don't wait for it
        ERR_clear_error()
        var out = context.channel.allocator.buffer(capacity: Int(BIO_ctrl_pending(wbio)))
        drainWriteBIO(into: &out)
        context.writeAndFlush(wrapOutboundOut(out), promise: promise)
    }

    /// Encrypts the flushed plaintext writes, prefixed by any pending handshake output, and writes+flushes the
    /// ciphertext (in chunks of about `writeChunkSize`). The write promises cascade from the last ciphertext write.
    private func encryptAndFlush(context: ChannelHandlerContext) {
        guard let ssl, let wbio else { return }
        var plaintextBytes = 0
        var index = pendingWrites.startIndex
        for _ in 0..<flushedWriteCount {
            plaintextBytes += pendingWrites[index].data.readableBytes
            index = pendingWrites.index(after: index)
        }
        // TLS 1.2/1.3 AEAD records add at most ~30 bytes per 16 KiB record.
        let estimate = Int(BIO_ctrl_pending(wbio)) + plaintextBytes + (plaintextBytes / 16384 + flushedWriteCount + 1) * 32
        let chunkCapacity = min(estimate, Self.writeChunkSize + 64 * 1024)
        var out = context.channel.allocator.buffer(capacity: chunkCapacity)
        drainWriteBIO(into: &out)
        var lead: EventLoopPromise<Void>?
        var wroteChunk = false
        var failure: TLSError?
        var coalesced: ByteBuffer?
        ERR_clear_error()
        encrypting = true
        while flushedWriteCount > 0, let write = pendingWrites.popFirst() {
            flushedWriteCount -= 1
            if let promise = write.promise {
                if let lead { lead.futureResult.cascade(to: promise) } else { lead = promise }
            }
            if failure != nil { continue }
            var data = write.data
            if data.readableBytes < Self.coalesceThreshold && (flushedWriteCount > 0 || coalesced != nil) {
                if coalesced == nil { coalesced = context.channel.allocator.buffer(capacity: Self.coalescedRecordSize) }
                coalesced!.writeBuffer(&data)
                if coalesced!.readableBytes < Self.coalescedRecordSize - Self.coalesceThreshold { continue }
            }
            if let pending = coalesced {
                coalesced = nil
                guard Self.sslWriteAll(ssl, pending) else {
                    failure = TLSError.drainingQueue("TLS encryption failed")
                    continue
                }
            }
            guard Self.sslWriteAll(ssl, data) else {
                failure = TLSError.drainingQueue("TLS encryption failed")
                continue
            }
            drainWriteBIO(into: &out)
            if out.readableBytes >= Self.writeChunkSize {
                context.write(wrapOutboundOut(out), promise: nil)  // may re-enter flush(): see `encrypting`
                wroteChunk = true
                out = context.channel.allocator.buffer(capacity: chunkCapacity)
            }
        }
        encrypting = false
        if failure == nil, let pending = coalesced {
            if Self.sslWriteAll(ssl, pending) {
                drainWriteBIO(into: &out)
            } else {
                failure = TLSError.drainingQueue("TLS encryption failed")
            }
        }
        if let failure {
            lead?.fail(failure)
            if wroteChunk { context.flush() }
            fail(context: context, error: failure)
            return
        }
        if out.readableBytes > 0 || lead != nil {
            context.writeAndFlush(wrapOutboundOut(out), promise: lead)
        } else if wroteChunk {
            context.flush()
        }
    }

    /// SSL_write of a whole buffer (a memory BIO never pushes back, so anything short of that is an error).
    private static func sslWriteAll(_ ssl: OpaquePointer, _ data: ByteBuffer) -> Bool {
        data.withUnsafeReadableBytes { raw -> Bool in
            var offset = 0
            while offset < raw.count {
                let n = SSL_write(ssl, raw.baseAddress! + offset, Int32(clamping: min(raw.count - offset, 1 << 30)))
                guard n > 0 else { return false }
                offset += Int(n)
            }
            return true
        }
    }

    /// Sends whatever the SSL engine produced on its own (handshake flights, alerts, post-handshake messages).
    private func writeHandshakeOutput(context: ChannelHandlerContext) {
        guard let wbio else { return }
        let pending = Int(BIO_ctrl_pending(wbio))
        guard pending > 0 else { return }
        var out = context.channel.allocator.buffer(capacity: pending)
        drainWriteBIO(into: &out)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    private func drainWriteBIO(into out: inout ByteBuffer) {
        guard let wbio else { return }
        while true {
            let pending = Int(BIO_ctrl_pending(wbio))
            if pending == 0 { return }
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: pending) { raw in
                Int(max(BIO_read(wbio, raw.baseAddress, Int32(clamping: pending)), 0))
            }
        }
    }

    // MARK: Failure

    /// Sends any alert OpenSSL queued, fails pending writes, fires the error and closes. Idempotent.
    private func fail(context: ChannelHandlerContext, error: TLSError) {
        ERR_clear_error()
        guard state != .closed else { return }
        state = .closed
        cancelTimers()
        if let wbio, BIO_ctrl_pending(wbio) > 0 {
            var out = context.channel.allocator.buffer(capacity: Int(BIO_ctrl_pending(wbio)))
            drainWriteBIO(into: &out)
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        }
        failPendingWrites(error)
        context.fireErrorCaught(error)
        let promise = closePromise
        closePromise = nil
        context.close(mode: .all, promise: promise)
    }

    private func cancelTimers() {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        closeTimeout?.cancel()
        closeTimeout = nil
    }

    private func failPendingWrites(_ error: Error) {
        flushedWriteCount = 0
        while let write = pendingWrites.popFirst() {
            write.promise?.fail(error)
        }
    }
}

@available(*, unavailable)
extension OpenSSLHandler: Sendable {}
