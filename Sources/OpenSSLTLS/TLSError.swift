import COpenSSL

/// A TLS failure. Carries OpenSSL's error queue text, because "handshake failed" alone rarely says why
/// (wrong host name, untrusted chain, no shared ALPN protocol, garbage instead of a ClientHello, ...).
public struct TLSError: Error, CustomStringConvertible, Sendable {
    /// What failed, in this library's words.
    public let reason: String
    /// OpenSSL's error queue at the time of the failure, oldest first
    /// (e.g. `error:0A000086:SSL routines::certificate verify failed`).
    public let openSSLErrors: [String]

    public init(_ reason: String, openSSLErrors: [String] = []) {
        self.reason = reason
        self.openSSLErrors = openSSLErrors
    }

    public var description: String {
        openSSLErrors.isEmpty ? "TLSError: \(reason)" : "TLSError: \(reason) (\(openSSLErrors.joined(separator: "; ")))"
    }

    /// Builds an error from the calling thread's OpenSSL error queue and empties that queue,
    /// so stale entries cannot leak into the next operation (another connection) on this thread.
    static func drainingQueue(_ reason: String) -> TLSError {
        TLSError(reason, openSSLErrors: drainOpenSSLErrorQueue())
    }
}

/// Pops every entry of this thread's OpenSSL error queue as text (and so clears it).
func drainOpenSSLErrorQueue() -> [String] {
    var errors: [String] = []
    while true {
        let code = ERR_get_error()
        if code == 0 { break }
        var text = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &text, text.count)
        errors.append(String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }
    ERR_clear_error()
    return errors
}
