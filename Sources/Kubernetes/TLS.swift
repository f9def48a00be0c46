import NIOCore
import OpenSSLTLS

/// Builds the TLS handler factory for a connection (nil for plain http). The context is built per
/// connection so a rotated CA file is picked up; the server is verified against the CA and its host name
/// or IP SAN (`tls-server-name` overrides the name), unless `insecure-skip-tls-verify`.
func tlsHandlerFactory(config: ClusterConfig) throws -> (@Sendable () -> any ChannelHandler)? {
    guard config.usesTLS else { return nil }
    let context: TLSContext
    do {
        context = try TLSContext.client(trustRootsPEM: config.certificateAuthorityPEM,
                                        trustRootsFile: config.certificateAuthorityPEM == nil ? config.certificateAuthorityFile : nil,
                                        clientCertificatePEM: config.clientCertificatePEM, clientKeyPEM: config.clientKeyPEM,
                                        insecureSkipVerify: config.insecureSkipTLSVerify, alpn: [])
    } catch {
        throw KubernetesError.configuration("TLS client setup for \(config.serverURL): \(error)")
    }
    let name = config.tlsServerName ?? config.host
    return { OpenSSLHandler(context: context, role: .client(serverHostname: name)) }
}
