import Logging
import NIOCore
extension EPPApp {
    static func makeTLS(_ options: EPPCommand, logger: Logger) throws -> (@Sendable () throws -> any ChannelHandler)? { nil }
}
