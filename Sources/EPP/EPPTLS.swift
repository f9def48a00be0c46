import Foundation
import Logging
import NIOCore
import OpenSSLTLS

extension EPPApp {
    static func makeTLS(_ options: EPPCommand, logger: Logger) throws -> (@Sendable () throws -> any ChannelHandler)? {
        guard options.secureServing else { return nil }
        if let dir = options.certPath {
            let reloading = try ReloadingTLSContext(directory: dir, alpn: ["h2"], interval: .seconds(1), logger: logger)
            reloading.start()
            logger.info("serving TLS from certificate directory", metadata: ["cert-path": "\(dir)"])
            return { OpenSSLHandler(context: reloading.current, role: .server) }
        }
        let host = ProcessInfo.processInfo.hostName
        let context = try TLSContext.selfSignedServer(
            commonName: "swift-epp", dnsNames: ["localhost", host], ipAddresses: ["127.0.0.1", "::1"], alpn: ["h2"])
        logger.info("serving TLS with a generated self-signed certificate")
        return { OpenSSLHandler(context: context, role: .server) }
    }

}
