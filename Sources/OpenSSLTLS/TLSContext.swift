import COpenSSL

/// Immutable SSL_CTX wrapper, shareable across event loops.
///
/// `@unchecked Sendable` because an SSL_CTX is never mutated after the factory returns; OpenSSL makes
/// concurrent `SSL_new` and session-cache use on one SSL_CTX thread-safe.
/// Every `OpenSSLHandler` keeps its context alive (the ALPN callback points into it).
public final class TLSContext: @unchecked Sendable {
    let ctx: OpaquePointer
    /// Whether this is a server context; a handler whose role does not match fails its channel with a clear error.
    let isServer: Bool
    /// Client only: whether the peer chain and host name are verified.
    let verifiesPeer: Bool
    /// Server only: ALPN preference list in wire format, referenced by the SSL_CTX callback.
    private let alpnList: ALPNList?

    /// The served leaf certificate (PEM) when known: servers and clients with a client certificate.
    public let certificatePEM: String?

    private init(ctx: OpaquePointer, isServer: Bool, verifiesPeer: Bool, alpnList: ALPNList?, certificatePEM: String?) {
        self.ctx = ctx
        self.isServer = isServer
        self.verifiesPeer = verifiesPeer
        self.alpnList = alpnList
        self.certificatePEM = certificatePEM
    }

    deinit { SSL_CTX_free(ctx) }

    // MARK: Servers

    /// Server from PEM files (`certificateChainFile`: leaf first, then intermediates; `privateKeyFile`: its key).
    /// `alpn`: protocols in preference order (e.g. `["h2"]`); a client offering ALPN without any of them is refused
    /// with `no_application_protocol`, a client offering no ALPN at all is accepted. TLS 1.2 minimum.
    /// `clientCertificateTrustRootsPEM`: when set, clients must present a certificate chaining to these roots (mTLS).
    public static func server(
        certificateChainFile: String, privateKeyFile: String, alpn: [String],
        clientCertificateTrustRootsPEM: [UInt8]? = nil
    ) throws -> TLSContext {
        try makeServer(alpn: alpn, clientRoots: clientCertificateTrustRootsPEM) { ctx in
            guard SSL_CTX_use_certificate_chain_file(ctx, certificateChainFile) == 1 else {
                throw TLSError.drainingQueue("cannot load certificate chain \(certificateChainFile)")
            }
            guard SSL_CTX_use_PrivateKey_file(ctx, privateKeyFile, SSL_FILETYPE_PEM) == 1 else {
                throw TLSError.drainingQueue("cannot load private key \(privateKeyFile)")
            }
        }
    }

    /// Server from in-memory PEM (chain: leaf first, then intermediates). Same semantics as the file variant.
    public static func server(
        certificateChainPEM: [UInt8], privateKeyPEM: [UInt8], alpn: [String],
        clientCertificateTrustRootsPEM: [UInt8]? = nil
    ) throws -> TLSContext {
        try makeServer(alpn: alpn, clientRoots: clientCertificateTrustRootsPEM) { ctx in
            try useIdentity(ctx, certificateChainPEM: certificateChainPEM, privateKeyPEM: privateKeyPEM)
        }
    }

    /// Server with a freshly generated self-signed certificate (in memory: EC P-256, valid ~1 year, SANs for the
    /// given DNS names and IPs). `certificatePEM` exposes it so clients and tests can trust it.
    public static func selfSignedServer(
        commonName: String, dnsNames: [String], ipAddresses: [String], alpn: [String],
        clientCertificateTrustRootsPEM: [UInt8]? = nil
    ) throws -> TLSContext {
        let generated = try SelfSignedCertificate.generate(commonName: commonName, dnsNames: dnsNames, ipAddresses: ipAddresses)
        return try server(
            certificateChainPEM: Array(generated.certificatePEM.utf8), privateKeyPEM: Array(generated.privateKeyPEM.utf8),
            alpn: alpn, clientCertificateTrustRootsPEM: clientCertificateTrustRootsPEM)
    }

    private static func makeServer(
        alpn: [String], clientRoots: [UInt8]?, loadIdentity: (OpaquePointer) throws -> Void
    ) throws -> TLSContext {
        defer { ERR_clear_error() }
        let ctx = try makeBaseContext(server: true)
        do {
            try loadIdentity(ctx)
            guard SSL_CTX_check_private_key(ctx) == 1 else {
                throw TLSError.drainingQueue("private key does not match the certificate")
            }
            // Required for session resumption once client certificates are verified; harmless otherwise.
            let sid: StaticString = "swift-epp"
            _ = SSL_CTX_set_session_id_context(ctx, sid.utf8Start, UInt32(sid.utf8CodeUnitCount))
            if let clientRoots {
                try addTrustRoots(ctx, pem: clientRoots, what: "client certificate trust roots")
                SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
            }
            var alpnList: ALPNList?
            if !alpn.isEmpty {
                let list = try ALPNList(alpn)
                SSL_CTX_set_alpn_select_cb(ctx, alpnSelectCallback, Unmanaged.passUnretained(list).toOpaque())
                alpnList = list
            }
            let leaf = SSL_CTX_get0_certificate(ctx).flatMap { pemString(certificate: $0) }
            return TLSContext(ctx: ctx, isServer: true, verifiesPeer: clientRoots != nil, alpnList: alpnList, certificatePEM: leaf)
        } catch {
            SSL_CTX_free(ctx)
            throw error
        }
    }

    // MARK: Clients

    /// Client context. Verifies the server's chain against `trustRootsPEM` and/or `trustRootsFile`
    /// (both nil: OpenSSL's system default paths) and its host name (see `TLSRole.client`), unless
    /// `insecureSkipVerify`. Optionally presents a client certificate (chain PEM + key PEM).
    /// `alpn`: protocols to offer (may be empty).
    public static func client(
        trustRootsPEM: [UInt8]?, trustRootsFile: String?, clientCertificatePEM: [UInt8]?, clientKeyPEM: [UInt8]?,
        insecureSkipVerify: Bool, alpn: [String]
    ) throws -> TLSContext {
        defer { ERR_clear_error() }
        let ctx = try makeBaseContext(server: false)
        do {
            if !insecureSkipVerify {
                if let trustRootsPEM {
                    try addTrustRoots(ctx, pem: trustRootsPEM, what: "trust roots")
                }
                if let trustRootsFile {
                    guard SSL_CTX_load_verify_locations(ctx, trustRootsFile, nil) == 1 else {
                        throw TLSError.drainingQueue("cannot load trust roots from \(trustRootsFile)")
                    }
                }
                if trustRootsPEM == nil && trustRootsFile == nil {
                    guard SSL_CTX_set_default_verify_paths(ctx) == 1 else {
                        throw TLSError.drainingQueue("cannot load the system trust roots")
                    }
                }
                SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nil)
            } else {
                SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nil)
            }
            var leaf: String?
            switch (clientCertificatePEM, clientKeyPEM) {
            case let (cert?, key?):
                try useIdentity(ctx, certificateChainPEM: cert, privateKeyPEM: key)
                guard SSL_CTX_check_private_key(ctx) == 1 else {
                    throw TLSError.drainingQueue("client private key does not match the client certificate")
                }
                leaf = SSL_CTX_get0_certificate(ctx).flatMap { pemString(certificate: $0) }
            case (nil, nil):
                break
            default:
                throw TLSError("a client certificate needs both the certificate and the key")
            }
            if !alpn.isEmpty {
                let wire = try ALPNList.encode(alpn)
                // Note: SSL_CTX_set_alpn_protos returns 0 on success.
                guard SSL_CTX_set_alpn_protos(ctx, wire, UInt32(wire.count)) == 0 else {
                    throw TLSError.drainingQueue("cannot set the ALPN protocols")
                }
            }
            return TLSContext(ctx: ctx, isServer: false, verifiesPeer: !insecureSkipVerify, alpnList: nil, certificatePEM: leaf)
        } catch {
            SSL_CTX_free(ctx)
            throw error
        }
    }

    // MARK: Shared setup

    /// TLS 1.2 minimum, no compression, no renegotiation, forward-secret AEAD suites only for TLS 1.2
    /// (TLS 1.3 suites are all AEAD already).
    private static func makeBaseContext(server: Bool) throws -> OpaquePointer {
        guard let ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method()) else {
            throw TLSError.drainingQueue("SSL_CTX_new failed")
        }
        guard shim_SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) == 1,
              SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL") == 1
        else {
            SSL_CTX_free(ctx)
            throw TLSError.drainingQueue("cannot configure TLS versions/ciphers")
        }
        shim_SSL_CTX_set_default_options(ctx)
        // Encrypted key files fail cleanly instead of OpenSSL prompting on the terminal.
        SSL_CTX_set_default_passwd_cb(ctx, noPasswordCallback)
        return ctx
    }

    private static func useIdentity(_ ctx: OpaquePointer, certificateChainPEM: [UInt8], privateKeyPEM: [UInt8]) throws {
        var certs = try readCertificates(pem: certificateChainPEM, what: "certificate chain")
        let leaf = certs.removeFirst()
        defer { X509_free(leaf) }
        guard SSL_CTX_use_certificate(ctx, leaf) == 1 else {
            certs.forEach { X509_free($0) }
            throw TLSError.drainingQueue("cannot use the certificate")
        }
        for (index, intermediate) in certs.enumerated() {
            // add0 takes ownership on success.
            guard shim_SSL_CTX_add0_chain_cert(ctx, intermediate) == 1 else {
                certs[index...].forEach { X509_free($0) }
                throw TLSError.drainingQueue("cannot add an intermediate certificate")
            }
        }
        let key = try readPrivateKey(pem: privateKeyPEM, what: "private key")
        defer { EVP_PKEY_free(key) }
        guard SSL_CTX_use_PrivateKey(ctx, key) == 1 else { throw TLSError.drainingQueue("cannot use the private key") }
    }

    private static func addTrustRoots(_ ctx: OpaquePointer, pem: [UInt8], what: String) throws {
        let certs = try readCertificates(pem: pem, what: what)
        defer { certs.forEach { X509_free($0) } }
        guard let store = SSL_CTX_get_cert_store(ctx) else { throw TLSError.drainingQueue("no certificate store") }
        for cert in certs {
            // add_cert takes its own reference; a duplicate is not an error worth failing for.
            if X509_STORE_add_cert(store, cert) != 1 { ERR_clear_error() }
        }
    }
}

/// Password callback that supplies none: encrypted PEM keys are refused, never prompted for.
let noPasswordCallback: @convention(c) (UnsafeMutablePointer<CChar>?, Int32, Int32, UnsafeMutableRawPointer?) -> Int32 = {
    _, _, _, _ in 0
}

/// An ALPN protocol list in wire format (length-prefixed names), owned by a server TLSContext and
/// handed to the C select callback as its argument.
final class ALPNList {
    let bytes: UnsafeMutableBufferPointer<UInt8>

    init(_ protocols: [String]) throws {
        let wire = try ALPNList.encode(protocols)
        bytes = .allocate(capacity: wire.count)
        _ = bytes.initialize(from: wire)
    }

    deinit { bytes.deallocate() }

    static func encode(_ protocols: [String]) throws -> [UInt8] {
        var wire: [UInt8] = []
        for name in protocols {
            let utf8 = Array(name.utf8)
            guard (1...255).contains(utf8.count) else { throw TLSError("invalid ALPN protocol name \"\(name)\"") }
            wire.append(UInt8(utf8.count))
            wire.append(contentsOf: utf8)
        }
        return wire
    }
}

/// Server ALPN selection: first of our protocols (in our preference order) that the client offers;
/// no overlap → fatal `no_application_protocol` alert (RFC 7301).
private func alpnSelectCallback(
    _ ssl: OpaquePointer?, _ out: UnsafeMutablePointer<UnsafePointer<UInt8>?>?, _ outlen: UnsafeMutablePointer<UInt8>?,
    _ clientList: UnsafePointer<UInt8>?, _ clientLength: UInt32, _ arg: UnsafeMutableRawPointer?
) -> Int32 {
    guard let arg, let out, let outlen, let clientList else { return SSL_TLSEXT_ERR_ALERT_FATAL }
    let ours = Unmanaged<ALPNList>.fromOpaque(arg).takeUnretainedValue().bytes
    var chosen: UnsafeMutablePointer<UInt8>?
    let rc = SSL_select_next_proto(&chosen, outlen, ours.baseAddress, UInt32(ours.count), clientList, clientLength)
    guard rc == OPENSSL_NPN_NEGOTIATED, let chosen else { return SSL_TLSEXT_ERR_ALERT_FATAL }
    out.pointee = UnsafePointer(chosen)
    return SSL_TLSEXT_ERR_OK
}
