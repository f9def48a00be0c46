import COpenSSL

// Small PEM/X509 helpers over OpenSSL. Every returned OpaquePointer is owned by the caller.

/// Parses every certificate in a PEM blob (in order). Throws if there is none or one is malformed.
func readCertificates(pem: [UInt8], what: String) throws -> [OpaquePointer] {
    try pem.withUnsafeBytes { raw -> [OpaquePointer] in
        guard let bio = BIO_new_mem_buf(raw.baseAddress, Int32(clamping: raw.count)) else {
            throw TLSError.drainingQueue("cannot allocate BIO for \(what)")
        }
        defer { BIO_free(bio) }
        var certs: [OpaquePointer] = []
        while let cert = PEM_read_bio_X509(bio, nil, noPasswordCallback, nil) {
            certs.append(cert)
        }
        // The loop ends with PEM_R_NO_START_LINE at end of input; anything else is a real parse error.
        let last = ERR_peek_last_error()
        let atEnd = last == 0 || ERR_GET_REASON(last) == PEM_R_NO_START_LINE
        if certs.isEmpty || !atEnd {
            certs.forEach { X509_free($0) }
            throw TLSError.drainingQueue(certs.isEmpty ? "no certificate found in \(what)" : "malformed certificate in \(what)")
        }
        ERR_clear_error()
        return certs
    }
}

/// Parses the first private key (PKCS#8, EC or RSA PEM) in a blob.
func readPrivateKey(pem: [UInt8], what: String) throws -> OpaquePointer {
    try pem.withUnsafeBytes { raw -> OpaquePointer in
        guard let bio = BIO_new_mem_buf(raw.baseAddress, Int32(clamping: raw.count)) else {
            throw TLSError.drainingQueue("cannot allocate BIO for \(what)")
        }
        defer { BIO_free(bio) }
        guard let key = PEM_read_bio_PrivateKey(bio, nil, noPasswordCallback, nil) else {
            throw TLSError.drainingQueue("no usable private key in \(what)")
        }
        return key
    }
}

/// Reads everything pending in a memory BIO as a String.
func drainToString(_ bio: OpaquePointer) -> String {
    let count = Int(BIO_ctrl_pending(bio))
    guard count > 0 else { return "" }
    var bytes = [UInt8](repeating: 0, count: count)
    let n = bytes.withUnsafeMutableBytes { BIO_read(bio, $0.baseAddress, Int32(count)) }
    return String(decoding: bytes.prefix(Int(max(n, 0))), as: UTF8.self)
}

func pemString(certificate: OpaquePointer) -> String? {
    guard let bio = BIO_new(BIO_s_mem()) else { return nil }
    defer { BIO_free(bio) }
    guard PEM_write_bio_X509(bio, certificate) == 1 else { ERR_clear_error(); return nil }
    return drainToString(bio)
}

func pemString(privateKey: OpaquePointer) -> String? {
    guard let bio = BIO_new(BIO_s_mem()) else { return nil }
    defer { BIO_free(bio) }
    guard PEM_write_bio_PrivateKey(bio, privateKey, nil, nil, 0, nil, nil) == 1 else { ERR_clear_error(); return nil }
    return drainToString(bio)
}
