import Logging
import NIOCore

struct TLSUnavailable: Error, CustomStringConvertible {
    var description: String { "TLS serving is not wired in yet: run with --secure-serving=false" }
}

extension EPPApp {
    static func makeTLS(_ options: EPPCommand, logger: Logger) throws -> (@Sendable () throws -> any ChannelHandler)? {
        guard options.secureServing else { return nil }
        throw TLSUnavailable()
    }
}
