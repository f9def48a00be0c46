import CNGHTTP2

/// An HTTP/2 stream identifier (client-initiated streams are odd).
public typealias HTTP2StreamID = Int32

/// HTTP/2 error codes (RFC 9113 §7) used on RST_STREAM and GOAWAY.
public struct HTTP2ErrorCode: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let noError = HTTP2ErrorCode(rawValue: 0x0)
    public static let protocolError = HTTP2ErrorCode(rawValue: 0x1)
    public static let internalError = HTTP2ErrorCode(rawValue: 0x2)
    public static let flowControlError = HTTP2ErrorCode(rawValue: 0x3)
    public static let refusedStream = HTTP2ErrorCode(rawValue: 0x7)
    public static let cancel = HTTP2ErrorCode(rawValue: 0x8)
    public static let enhanceYourCalm = HTTP2ErrorCode(rawValue: 0xb)
}

/// Connection settings the server advertises and enforces.
public struct HTTP2Settings: Sendable {
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    public var maxConcurrentStreams: UInt32 = 1000
    /// SETTINGS_INITIAL_WINDOW_SIZE: how much a client may send on one stream before we consume it.
    public var initialStreamWindowSize: UInt32 = 1 << 20
    /// Connection-level receive window (sent as a WINDOW_UPDATE on stream 0): bounds the unconsumed
    /// bytes buffered for all streams of one connection together.
    public var connectionWindowSize: UInt32 = 16 << 20
    /// SETTINGS_MAX_FRAME_SIZE we accept.
    public var maxFrameSize: UInt32 = 16384
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    public var maxHeaderListSize: UInt32 = 64 << 10
    /// Outbound bytes queued per stream above which the stream reports itself unwritable.
    public var streamWriteHighWater: Int = 1 << 20
    /// Queued outbound bytes under which an unwritable stream becomes writable again.
    public var streamWriteLowWater: Int = 256 << 10
    /// Incoming RST_STREAM token bucket (rapid-reset protection): burst and refill per second.
    /// nghttp2's defaults (1000, 33/s) are meant for browsers. A gateway resets its ext_proc stream
    /// whenever it is done with a request the picker has not finished (Envoy does so for every
    /// request when the response phases are not sent), so the budget must cover the request rate;
    /// it still stops a flood of reset streams.
    public var resetBurst: UInt64 = 100_000
    public var resetRate: UInt64 = 20_000

    public init() {}
}

/// Errors surfaced by the HTTP/2 session.
public struct HTTP2SessionError: Error, CustomStringConvertible, Sendable {
    public let code: Int32
    public let context: String
    init(_ code: Int32, _ context: String) {
        self.code = code
        self.context = context
    }
    public var description: String {
        "\(context): \(String(cString: nghttp2_strerror(code))) (\(code))"
    }
    /// The peer did not start with the HTTP/2 connection preface.
    public var isBadPreface: Bool { code == NGHTTP2_ERR_BAD_CLIENT_MAGIC.rawValue }
}
