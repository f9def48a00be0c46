import COpenSSL

/// A freshly generated self-signed certificate and its key, both PEM.
/// Used when no `--cert-path` is given, and handy for tests (write it to disk, trust `certificatePEM`).
public struct SelfSignedCertificate: Sendable {
    public let certificatePEM: String
    public let privateKeyPEM: String

    /// Generates an EC P-256 key and a self-signed X.509 v3 certificate (SHA-256) valid from one hour ago
    /// (clock skew) for `validityDays`, with subjectAltNames for `dnsNames` and `ipAddresses`
    /// (clients match SANs, not the CN) and extendedKeyUsage serverAuth+clientAuth.
    public static func generate(
        commonName: String, dnsNames: [String], ipAddresses: [String], validityDays: Int = 365
    ) throws -> SelfSignedCertificate {
        defer { ERR_clear_error() }
        for name in dnsNames + ipAddresses + [commonName] where name.contains(",") || name.contains("\0") {
            throw TLSError("invalid name for a certificate: \(name)")
        }
        guard let key = shim_EVP_EC_gen_P256() else { throw TLSError.drainingQueue("EC P-256 key generation failed") }
        defer { EVP_PKEY_free(key) }
        guard let cert = X509_new() else { throw TLSError.drainingQueue("X509_new failed") }
        defer { X509_free(cert) }

        guard X509_set_version(cert, 2) == 1 else { throw TLSError.drainingQueue("X509_set_version failed") }
        // Random positive 127-bit serial, as RFC 5280 recommends (no two certificates share one).
        guard let serial = BN_new() else { throw TLSError.drainingQueue("BN_new failed") }
        defer { BN_free(serial) }
        guard BN_rand(serial, 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) == 1,
              BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(cert)) != nil
        else { throw TLSError.drainingQueue("serial number generation failed") }
        guard X509_gmtime_adj(X509_getm_notBefore(cert), -3600) != nil,
              X509_gmtime_adj(X509_getm_notAfter(cert), validityDays * 86400) != nil
        else { throw TLSError.drainingQueue("setting the validity failed") }
        guard X509_set_pubkey(cert, key) == 1 else { throw TLSError.drainingQueue("X509_set_pubkey failed") }

        let name = X509_get_subject_name(cert)
        guard X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, commonName, -1, -1, 0) == 1,
              X509_set_issuer_name(cert, name) == 1
        else { throw TLSError.drainingQueue("setting the subject failed") }

        var v3 = X509V3_CTX()
        X509V3_set_ctx(&v3, cert, cert, nil, nil, 0)
        var extensions: [(Int32, String)] = [
            (NID_basic_constraints, "critical,CA:FALSE"),
            (NID_ext_key_usage, "serverAuth,clientAuth"),
            (NID_subject_key_identifier, "hash"),
            (NID_authority_key_identifier, "keyid:always"),
        ]
        let sans = dnsNames.map { "DNS:\($0)" } + ipAddresses.map { "IP:\($0)" }
        if !sans.isEmpty { extensions.append((NID_subject_alt_name, sans.joined(separator: ","))) }
        for (nid, value) in extensions {
            guard let ext = X509V3_EXT_conf_nid(nil, &v3, nid, value) else {
                throw TLSError.drainingQueue("invalid certificate extension \(value)")
            }
            defer { X509_EXTENSION_free(ext) }
            guard X509_add_ext(cert, ext, -1) == 1 else { throw TLSError.drainingQueue("X509_add_ext failed") }
        }
        guard X509_sign(cert, key, EVP_sha256()) > 0 else { throw TLSError.drainingQueue("signing the certificate failed") }

        guard let certPEM = pemString(certificate: cert), let keyPEM = pemString(privateKey: key) else {
            throw TLSError.drainingQueue("PEM encoding failed")
        }
        return SelfSignedCertificate(certificatePEM: certPEM, privateKeyPEM: keyPEM)
    }
}
