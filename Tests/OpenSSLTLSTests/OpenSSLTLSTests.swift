import Foundation
import Logging
import NIOCore
import NIOPosix
import OpenSSLTLS
import XCTest

final class OpenSSLTLSTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!

    override func setUp() {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    }

    override func tearDown() {
        try? group.syncShutdownGracefully()
        group = nil
    }

    private func selfSignedServer(alpn: [String] = ["h2"], clientRoots: String? = nil) throws -> TLSContext {
        try TLSContext.selfSignedServer(
            commonName: "epp-test", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1", "::1"], alpn: alpn,
            clientCertificateTrustRootsPEM: clientRoots.map { Array($0.utf8) })
    }

    // MARK: Handshake, ALPN, data

    func testHandshakeNegotiatesH2AndEchoesSmallData() throws {
        let server = try selfSignedServer()
        let pem = try XCTUnwrap(server.certificatePEM)
        XCTAssertTrue(pem.hasPrefix("-----BEGIN CERTIFICATE-----"))
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }

        // The greeting is written in channelActive, before the handshake completes: it must be buffered.
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: try makeClientContext(trusting: pem),
            hostname: "localhost", expectedBytes: "hello, ".utf8.count + "world".utf8.count, greeting: "hello, ")
        XCTAssertEqual(try client.handshake.wait(seconds: 10), "h2")
        let written = client.channel.writeAndFlush(ByteBuffer(string: "world"))
        XCTAssertNoThrow(try written.wait(seconds: 10), "write promise completes once the ciphertext is written")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "hello, world")

        let channel = client.channel
        let (alpn, version) = try channel.eventLoop.submit {
            let handler = try channel.pipeline.syncOperations.handler(type: OpenSSLHandler.self)
            return (handler.negotiatedALPN, handler.negotiatedProtocolVersion)
        }.wait(seconds: 10)
        XCTAssertEqual(alpn, "h2")
        XCTAssertEqual(version, "TLSv1.3")
        XCTAssertEqual(recorder.handshakes.withLockedValue { $0 }, ["h2"])

        try client.channel.close().wait(seconds: 10)
        XCTAssertEqual(recorder.errors.withLockedValue { $0 }, [])
    }

    func testLargeEchoKeepsOrder() throws {
        try largeEcho(flushOnWritabilityChange: false)
    }

    func testLargeEchoWithReentrantFlushesKeepsOrder() throws {
        try largeEcho(flushOnWritabilityChange: true)
    }

    private func largeEcho(flushOnWritabilityChange: Bool) throws {
        let server = try selfSignedServer()
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }

        let chunkSize = 64 * 1024
        let chunkCount = 256  // 16 MiB
        // Every 64 KiB chunk: a pattern, stamped with its index at both ends (order check), built cheaply
        // (debug builds are slow at per-byte loops over 16 MiB).
        var pattern = [UInt8](repeating: 0, count: chunkSize)
        for i in pattern.indices { pattern[i] = UInt8(truncatingIfNeeded: i &* 7 &+ i >> 8) }
        func chunk(_ index: Int) -> ByteBuffer {
            var buffer = ByteBuffer(bytes: pattern)
            buffer.setInteger(UInt32(index), at: 0)
            buffer.setInteger(UInt32(index), at: chunkSize - 4)
            return buffer
        }
        let totalBytes = chunkSize * chunkCount

        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!,
            tls: try makeClientContext(trusting: server.certificatePEM), hostname: "localhost",
            expectedBytes: totalBytes, flushOnWritabilityChange: flushOnWritabilityChange)
        XCTAssertEqual(try client.handshake.wait(seconds: 10), "h2")
        var lastWrite: EventLoopFuture<Void>?
        for index in 0..<chunkCount {
            lastWrite = client.channel.write(chunk(index))
            if index % 16 == 15 { client.channel.flush() }
        }
        client.channel.flush()
        XCTAssertNoThrow(try lastWrite!.wait(seconds: 60))
        let received = try client.received.wait(seconds: 120)
        XCTAssertEqual(received.readableBytes, totalBytes)
        for index in 0..<chunkCount {
            let got = received.getSlice(at: received.readerIndex + index * chunkSize, length: chunkSize)
            guard got == chunk(index) else {
                XCTFail("echoed chunk \(index) differs (order or content)")
                break
            }
        }
        if flushOnWritabilityChange {
            let channel = client.channel
            let changes = try channel.eventLoop.submit {
                try channel.pipeline.syncOperations.handler(type: FlushOnWritabilityChange.self).changes
            }.wait(seconds: 10)
            XCTAssertGreaterThan(changes, 0, "the re-entrant path was exercised")
        }
        XCTAssertEqual(recorder.errors.withLockedValue { $0 }, [])
    }

    /// Many small writes in one flush are coalesced into few records: order is kept, every promise completes,
    /// and the ciphertext is close to the plaintext size (one record per write would add >= 22 bytes each).
    func testSmallWritesAreCoalescedInOrder() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        let counter = CiphertextCounter()
        let writes = (0..<2000).map { "<\($0)>" }
        let expected = writes.joined()
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: try makeClientContext(trusting: server.certificatePEM),
            hostname: "localhost", expectedBytes: expected.utf8.count, ciphertextCounter: counter)
        XCTAssertEqual(try client.handshake.wait(seconds: 10), "h2")
        let before = counter.bytesWritten.withLockedValue { $0 }
        let futures = writes.map { client.channel.write(ByteBuffer(string: $0)) }
        client.channel.flush()
        XCTAssertNoThrow(try EventLoopFuture.andAllSucceed(futures, on: client.channel.eventLoop).wait(seconds: 10))
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), expected)
        let ciphertext = counter.bytesWritten.withLockedValue { $0 } - before
        XCTAssertLessThan(ciphertext, expected.utf8.count + 20 * 22, "\(ciphertext) ciphertext bytes for \(expected.utf8.count) plaintext")
    }

    func testHandshakeAndRecordsSplitIntoTinyReads() throws {
        let server = try selfSignedServer()
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }
        let message = String(repeating: "fragmented ", count: 300)
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: try makeClientContext(trusting: server.certificatePEM),
            hostname: "localhost", expectedBytes: message.utf8.count, greeting: message, fragmentCiphertext: true)
        XCTAssertEqual(try client.handshake.wait(seconds: 20), "h2")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 20)), message)
        XCTAssertEqual(recorder.errors.withLockedValue { $0 }, [])
    }

    func testClientWithoutALPNIsAccepted() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!,
            tls: try makeClientContext(trusting: server.certificatePEM, alpn: []), hostname: "localhost",
            expectedBytes: 2, greeting: "hi")
        XCTAssertNil(try client.handshake.wait(seconds: 10))
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "hi")
    }

    func testALPNMismatchIsRefused() throws {
        let server = try selfSignedServer()
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!,
            tls: try makeClientContext(trusting: server.certificatePEM, alpn: ["http/1.1"]), hostname: "localhost")
        XCTAssertThrowsError(try client.handshake.wait(seconds: 10))
        let clientError = try client.firstError.wait(seconds: 10)
        XCTAssertTrue(clientError.contains("no application protocol"), clientError)
        XCTAssertNoThrow(try client.inactive.wait(seconds: 10))
        let serverError = try XCTUnwrap(recorder.waitForError())
        XCTAssertTrue(serverError.contains("TLS handshake failed"), serverError)
    }

    // MARK: Verification

    func testClientVerifiesIPAddressSAN() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!,
            tls: try makeClientContext(trusting: server.certificatePEM), hostname: "127.0.0.1",
            expectedBytes: 4, greeting: "ping")
        XCTAssertEqual(try client.handshake.wait(seconds: 10), "h2")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "ping")
        // The certificate also has IP SAN ::1 (the connection goes to 127.0.0.1; only the name check differs).
        for name in ["::1", "[::1]"] {
            let v6 = try connectTLSClient(
                group: group, port: listener.localAddress!.port!,
                tls: try makeClientContext(trusting: server.certificatePEM), hostname: name)
            XCTAssertEqual(try v6.handshake.wait(seconds: 10), "h2", name)
        }
    }

    func testWrongHostNameFails() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        for (hostname, expected) in [("example.com", "hostname mismatch"), ("127.0.0.2", "IP address mismatch")] {
            let client = try connectTLSClient(
                group: group, port: listener.localAddress!.port!,
                tls: try makeClientContext(trusting: server.certificatePEM), hostname: hostname)
            XCTAssertThrowsError(try client.handshake.wait(seconds: 10))
            let error = try client.firstError.wait(seconds: 10)
            XCTAssertTrue(error.contains(expected), error)
            XCTAssertNoThrow(try client.inactive.wait(seconds: 10))
        }
    }

    func testUntrustedCertificateFails() throws {
        let server = try selfSignedServer()
        let other = try SelfSignedCertificate.generate(commonName: "other", dnsNames: ["localhost"], ipAddresses: [])
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!,
            tls: try makeClientContext(trusting: other.certificatePEM), hostname: "localhost")
        XCTAssertThrowsError(try client.handshake.wait(seconds: 10))
        let error = try client.firstError.wait(seconds: 10)
        XCTAssertTrue(error.contains("certificate verify failed"), error)
        XCTAssertNotNil(recorder.waitForError(), "the server sees the client's alert")
    }

    func testInsecureSkipVerifyAcceptsAnything() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!,
            tls: try makeClientContext(trusting: nil, insecure: true), hostname: "not-the-name.example",
            expectedBytes: 2, greeting: "ok")
        XCTAssertEqual(try client.handshake.wait(seconds: 10), "h2")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "ok")
    }

    func testClientCertificateRequiredByServer() throws {
        let clientIdentity = try SelfSignedCertificate.generate(commonName: "client", dnsNames: ["client"], ipAddresses: [])
        let stranger = try SelfSignedCertificate.generate(commonName: "stranger", dnsNames: ["client"], ipAddresses: [])
        let server = try selfSignedServer(clientRoots: clientIdentity.certificatePEM)
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }
        let port = listener.localAddress!.port!

        let good = try connectTLSClient(
            group: group, port: port,
            tls: try makeClientContext(trusting: server.certificatePEM, clientCertificate: clientIdentity),
            hostname: "localhost", expectedBytes: 4, greeting: "mtls")
        XCTAssertEqual(try good.handshake.wait(seconds: 10), "h2")
        XCTAssertEqual(String(buffer: try good.received.wait(seconds: 10)), "mtls")
        XCTAssertEqual(recorder.errors.withLockedValue { $0 }, [])

        // Without a certificate, and with an untrusted one, the server refuses (TLS 1.3: the client learns it
        // from the alert after its own handshake finished, so only the close is certain on its side).
        for identity in [nil, stranger] as [SelfSignedCertificate?] {
            recorder.errors.withLockedValue { $0.removeAll() }
            let bad = try connectTLSClient(
                group: group, port: port,
                tls: try makeClientContext(trusting: server.certificatePEM, clientCertificate: identity),
                hostname: "localhost", expectedBytes: 4, greeting: "mtls")
            XCTAssertThrowsError(try bad.received.wait(seconds: 10))
            XCTAssertNoThrow(try bad.inactive.wait(seconds: 10))
            // The alert arrives before the close, so the client reports why.
            let clientError = try bad.firstError.wait(seconds: 10)
            XCTAssertTrue(clientError.contains(identity == nil ? "certificate required" : "unknown ca"), clientError)
            let serverError = try XCTUnwrap(recorder.waitForError())
            XCTAssertTrue(serverError.contains("TLS handshake failed"), serverError)
        }
    }

    // MARK: Robustness

    func testGarbageInsteadOfClientHelloClosesWithError() throws {
        let server = try selfSignedServer()
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }
        let port = listener.localAddress!.port!

        let plain = try connectTLSClient(group: group, port: port, tls: nil, hostname: nil)
        plain.channel.writeAndFlush(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + String(repeating: "\u{1}garbage", count: 100)),
                                    promise: nil)
        XCTAssertNoThrow(try plain.inactive.wait(seconds: 10), "the server closes the connection")
        let error = try XCTUnwrap(recorder.waitForError())
        XCTAssertTrue(error.contains("TLS handshake failed"), error)

        // The server (and the thread's OpenSSL error queue) is fine afterwards.
        let client = try connectTLSClient(
            group: group, port: port, tls: try makeClientContext(trusting: server.certificatePEM),
            hostname: "localhost", expectedBytes: 5, greeting: "after")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "after")
    }

    func testSilentClientHitsHandshakeTimeout() throws {
        let server = try selfSignedServer()
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder, handshakeTimeout: .milliseconds(200)) { server }
        defer { try? listener.close().wait() }
        let start = Date()
        let silent = try connectTLSClient(group: group, port: listener.localAddress!.port!, tls: nil, hostname: nil)
        XCTAssertNoThrow(try silent.inactive.wait(seconds: 10))
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), 0.19)
        let error = try XCTUnwrap(recorder.waitForError())
        XCTAssertTrue(error.contains("timed out"), error)

        // A completed handshake is not affected by the timer.
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: try makeClientContext(trusting: server.certificatePEM),
            hostname: "localhost", expectedBytes: 5, greeting: "alive")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "alive")
        usleep(400_000)
        XCTAssertTrue(client.channel.isActive)
        XCTAssertEqual(recorder.errors.withLockedValue { $0.count }, 1)
    }

    func testInvalidHostNameFailsCleanly() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: try makeClientContext(trusting: server.certificatePEM),
            hostname: String(repeating: "a", count: 300) + ".example")  // longer than SNI allows
        let error = try client.firstError.wait(seconds: 10)
        XCTAssertTrue(error.contains("invalid server host name"), error)
        XCTAssertNoThrow(try client.inactive.wait(seconds: 10))
    }

    func testContextRoleMismatchFailsCleanly() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(group: group, port: listener.localAddress!.port!, tls: server, hostname: "localhost")
        let error = try client.firstError.wait(seconds: 10)
        XCTAssertTrue(error.contains("server TLSContext used for a client connection"), error)
        XCTAssertNoThrow(try client.inactive.wait(seconds: 10))
    }

    func testCorruptedRecordAfterHandshakeClosesWithError() throws {
        let server = try selfSignedServer()
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: try makeClientContext(trusting: server.certificatePEM),
            hostname: "localhost", expectedBytes: 3, greeting: "one")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "one")
        // Inject an application-data record with a bogus tag below the TLS handler.
        var record = ByteBuffer(bytes: [0x17, 0x03, 0x03, 0x00, 0x20])
        record.writeBytes([UInt8](repeating: 0xAB, count: 0x20))
        let bogus = record
        let channel = client.channel
        try channel.eventLoop.submit {
            // Written from the TLS handler's context, so it bypasses encryption.
            let tlsContext = try channel.pipeline.syncOperations.context(handlerType: OpenSSLHandler.self)
            tlsContext.writeAndFlush(NIOAny(bogus), promise: nil)
        }.wait(seconds: 10)
        XCTAssertNoThrow(try client.inactive.wait(seconds: 10))
        let error = try XCTUnwrap(recorder.waitForError())
        XCTAssertTrue(error.contains("TLS read failed") && error.contains("bad record mac"), error)
    }

    func testCloseSendsCloseNotifyAndPeerCloses() throws {
        let server = try selfSignedServer()
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }
        let port = listener.localAddress!.port!

        // Server-initiated close: the client receives close_notify, answers and closes without an error.
        let client = try connectTLSClient(
            group: group, port: port, tls: try makeClientContext(trusting: server.certificatePEM), hostname: "localhost",
            expectedBytes: 100, greeting: "please close")
        XCTAssertNoThrow(try client.inactive.wait(seconds: 10))
        XCTAssertThrowsError(try client.firstError.wait(seconds: 10)) { XCTAssertTrue($0 is ConnectionClosed, "\($0)") }

        // Client-initiated close: the close promise succeeds, the server sees a clean close.
        let second = try connectTLSClient(
            group: group, port: port, tls: try makeClientContext(trusting: server.certificatePEM), hostname: "localhost",
            expectedBytes: 3, greeting: "bye")
        XCTAssertEqual(String(buffer: try second.received.wait(seconds: 10)), "bye")
        XCTAssertNoThrow(try second.channel.close().wait(seconds: 10))
        let deadline = Date().addingTimeInterval(10)
        while recorder.inactiveCount.withLockedValue({ $0 }) < 2 && Date() < deadline { usleep(10_000) }
        XCTAssertEqual(recorder.inactiveCount.withLockedValue { $0 }, 2)
        XCTAssertEqual(recorder.errors.withLockedValue { $0 }, [])
        // Writes after close fail instead of hanging.
        XCTAssertThrowsError(try second.channel.writeAndFlush(ByteBuffer(string: "late")).wait(seconds: 10))
    }

    func testAutoReadOffStillCompletesHandshakeAndReads() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        // The collector calls read() once at activation and then only after plaintext arrives: handshake-only
        // reads must be re-requested by the TLS handler or this stalls.
        let client = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: try makeClientContext(trusting: server.certificatePEM),
            hostname: "localhost", expectedBytes: 6, greeting: "manual", manualRead: true)
        XCTAssertEqual(try client.handshake.wait(seconds: 10), "h2")
        XCTAssertEqual(String(buffer: try client.received.wait(seconds: 10)), "manual")
    }

    // MARK: Contexts

    func testServerFromFilesWithChainAndErrors() throws {
        let dir = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let identity = try SelfSignedCertificate.generate(commonName: "files", dnsNames: ["localhost"], ipAddresses: [])
        try writeFile(dir + "/tls.crt", identity.certificatePEM)
        try writeFile(dir + "/tls.key", identity.privateKeyPEM)
        let context = try TLSContext.server(certificateChainFile: dir + "/tls.crt", privateKeyFile: dir + "/tls.key", alpn: ["h2"])
        XCTAssertEqual(context.certificatePEM, identity.certificatePEM)

        let other = try SelfSignedCertificate.generate(commonName: "other", dnsNames: [], ipAddresses: [])
        try writeFile(dir + "/other.key", other.privateKeyPEM)
        XCTAssertThrowsError(try TLSContext.server(certificateChainFile: dir + "/tls.crt", privateKeyFile: dir + "/other.key", alpn: [])) {
            XCTAssertTrue("\($0)".contains("mismatch"), "\($0)")
        }
        XCTAssertThrowsError(try TLSContext.server(certificateChainFile: dir + "/missing.crt", privateKeyFile: dir + "/tls.key", alpn: []))
        XCTAssertThrowsError(try TLSContext.client(
            trustRootsPEM: Array("not a certificate".utf8), trustRootsFile: nil, clientCertificatePEM: nil, clientKeyPEM: nil,
            insecureSkipVerify: false, alpn: []))
        XCTAssertThrowsError(try TLSContext.selfSignedServer(commonName: "x", dnsNames: [], ipAddresses: [], alpn: [String(repeating: "a", count: 300)]))
        // An encrypted key is refused (no password prompt on the terminal, no hang).
        let (status, output) = try runOpenSSL(["pkey", "-in", dir + "/tls.key", "-aes256", "-passout", "pass:secret", "-out", dir + "/enc.key"])
        XCTAssertEqual(status, 0, output)
        XCTAssertThrowsError(try TLSContext.server(certificateChainFile: dir + "/tls.crt", privateKeyFile: dir + "/enc.key", alpn: []))
        let encryptedPEM = try String(contentsOfFile: dir + "/enc.key", encoding: .utf8)
        XCTAssertTrue(encryptedPEM.contains("ENCRYPTED"))
        XCTAssertThrowsError(try TLSContext.server(
            certificateChainPEM: Array(identity.certificatePEM.utf8), privateKeyPEM: Array(encryptedPEM.utf8), alpn: []))
        // Trust roots from a file work like PEM bytes.
        XCTAssertNoThrow(try TLSContext.client(
            trustRootsPEM: nil, trustRootsFile: dir + "/tls.crt", clientCertificatePEM: nil, clientKeyPEM: nil,
            insecureSkipVerify: false, alpn: ["h2"]))
    }

    func testSelfSignedCertificateVerifiesWithOpenSSLCLI() throws {
        let dir = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let identity = try SelfSignedCertificate.generate(commonName: "cli", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"])
        try writeFile(dir + "/c.pem", identity.certificatePEM)
        let (status, output) = try runOpenSSL(["verify", "-x509_strict", "-CAfile", dir + "/c.pem", "-verify_hostname", "localhost", dir + "/c.pem"])
        XCTAssertEqual(status, 0, output)
        let (_, text) = try runOpenSSL(["x509", "-in", dir + "/c.pem", "-noout", "-text"])
        XCTAssertTrue(text.contains("DNS:localhost, IP Address:127.0.0.1"), text)
        XCTAssertTrue(text.contains("prime256v1"), text)
    }

    /// A CA-issued chain (root → intermediate → leaf) made with the openssl CLI: the server sends its intermediate
    /// from the chain file, the client sends its own from chain PEM bytes; each side trusts only the root.
    func testIntermediateChainsServerAndClient() throws {
        let dir = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func openssl(_ arguments: [String]) throws {
            let (status, output) = try runOpenSSL(arguments)
            XCTAssertEqual(status, 0, "openssl \(arguments.joined(separator: " ")): \(output)")
        }
        func newKeyAndCSR(_ name: String) throws {
            try openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "\(dir)/\(name).key",
                         "-out", "\(dir)/\(name).csr", "-subj", "/CN=\(name)"])
        }
        func sign(_ name: String, by issuer: String, extensions: String) throws {
            try writeFile("\(dir)/\(name).ext", extensions)
            try openssl(["x509", "-req", "-in", "\(dir)/\(name).csr", "-CA", "\(dir)/\(issuer).crt", "-CAkey", "\(dir)/\(issuer).key",
                         "-set_serial", "\(Int.random(in: 1000...1_000_000))", "-days", "2", "-out", "\(dir)/\(name).crt",
                         "-extfile", "\(dir)/\(name).ext"])
        }
        try openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "\(dir)/root.key",
                     "-out", "\(dir)/root.crt", "-subj", "/CN=test root", "-days", "2"])
        try newKeyAndCSR("intermediate")
        try sign("intermediate", by: "root", extensions: "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
        try newKeyAndCSR("server")
        try sign("server", by: "intermediate", extensions: "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        try newKeyAndCSR("client")
        try sign("client", by: "intermediate", extensions: "extendedKeyUsage=clientAuth\n")
        let read = { (name: String) throws -> String in try String(contentsOfFile: "\(dir)/\(name)", encoding: .utf8) }
        try writeFile("\(dir)/server-chain.crt", try read("server.crt") + read("intermediate.crt"))

        let server = try TLSContext.server(
            certificateChainFile: "\(dir)/server-chain.crt", privateKeyFile: "\(dir)/server.key", alpn: ["h2"],
            clientCertificateTrustRootsPEM: Array(try read("root.crt").utf8))
        XCTAssertEqual(server.certificatePEM, try read("server.crt"), "certificatePEM is the leaf")
        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { server }
        defer { try? listener.close().wait() }

        let client = try TLSContext.client(
            trustRootsPEM: nil, trustRootsFile: "\(dir)/root.crt",
            clientCertificatePEM: Array((try read("client.crt") + read("intermediate.crt")).utf8),
            clientKeyPEM: Array(try read("client.key").utf8), insecureSkipVerify: false, alpn: ["h2"])
        let connection = try connectTLSClient(
            group: group, port: listener.localAddress!.port!, tls: client, hostname: "localhost",
            expectedBytes: 5, greeting: "chain")
        XCTAssertEqual(try connection.handshake.wait(seconds: 10), "h2")
        XCTAssertEqual(String(buffer: try connection.received.wait(seconds: 10)), "chain")
        XCTAssertEqual(recorder.errors.withLockedValue { $0 }, [])
    }

    // MARK: Reloading

    func testReloadingContextPicksUpNewCertificateAndKeepsOldOnBrokenFiles() throws {
        let dir = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try SelfSignedCertificate.generate(commonName: "first", dnsNames: ["localhost"], ipAddresses: [])
        let second = try SelfSignedCertificate.generate(commonName: "second", dnsNames: ["localhost"], ipAddresses: [])
        try writeFile(dir + "/tls.crt", first.certificatePEM)
        try writeFile(dir + "/tls.key", first.privateKeyPEM)
        let reloading = try ReloadingTLSContext(directory: dir, alpn: ["h2"], interval: .milliseconds(50), logger: Logger(label: "test"))
        XCTAssertEqual(reloading.current.certificatePEM, first.certificatePEM)
        XCTAssertFalse(reloading.checkForChanges(), "unchanged files are not reloaded")

        let recorder = ServerRecorder()
        let listener = try startTLSServer(group: group, recorder: recorder) { reloading.current }
        defer { try? listener.close().wait() }
        let port = listener.localAddress!.port!
        func handshake(trusting identity: SelfSignedCertificate) throws -> String? {
            let client = try connectTLSClient(
                group: group, port: port, tls: try makeClientContext(trusting: identity.certificatePEM), hostname: "localhost")
            defer { client.channel.close(promise: nil) }
            return try client.handshake.wait(seconds: 10)
        }
        XCTAssertEqual(try handshake(trusting: first), "h2")

        try writeFile(dir + "/tls.crt", second.certificatePEM)
        try writeFile(dir + "/tls.key", second.privateKeyPEM)
        XCTAssertTrue(reloading.checkForChanges())
        XCTAssertEqual(reloading.current.certificatePEM, second.certificatePEM)
        XCTAssertEqual(try handshake(trusting: second), "h2")
        XCTAssertThrowsError(try handshake(trusting: first), "new connections get the new certificate")

        let good = reloading.current
        try writeFile(dir + "/tls.crt", "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        XCTAssertFalse(reloading.checkForChanges())
        XCTAssertTrue(reloading.current === good, "a broken file keeps the last good context")
        XCTAssertFalse(reloading.checkForChanges(), "the same broken state is not retried")
        XCTAssertEqual(try handshake(trusting: second), "h2")
        // A mismatching key is refused too.
        try writeFile(dir + "/tls.crt", first.certificatePEM)
        XCTAssertFalse(reloading.checkForChanges())
        XCTAssertTrue(reloading.current === good)
    }

    func testReloadingFollowsKubernetesSymlinkSwapWhilePolling() throws {
        // Layout of a Kubernetes secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>/
        let dir = try makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fm = FileManager.default
        let first = try SelfSignedCertificate.generate(commonName: "first", dnsNames: ["localhost"], ipAddresses: [])
        let second = try SelfSignedCertificate.generate(commonName: "second", dnsNames: ["localhost"], ipAddresses: [])
        for (version, identity) in [("..v1", first), ("..v2", second)] {
            try fm.createDirectory(atPath: dir + "/" + version, withIntermediateDirectories: false)
            try writeFile(dir + "/\(version)/tls.crt", identity.certificatePEM)
            try writeFile(dir + "/\(version)/tls.key", identity.privateKeyPEM)
        }
        try fm.createSymbolicLink(atPath: dir + "/..data", withDestinationPath: "..v1")
        try fm.createSymbolicLink(atPath: dir + "/tls.crt", withDestinationPath: "..data/tls.crt")
        try fm.createSymbolicLink(atPath: dir + "/tls.key", withDestinationPath: "..data/tls.key")

        let reloading = try ReloadingTLSContext(directory: dir, alpn: ["h2"], interval: .milliseconds(20), logger: Logger(label: "test"))
        XCTAssertEqual(reloading.current.certificatePEM, first.certificatePEM)
        reloading.start()
        defer { reloading.stop() }

        // Atomic swap as the kubelet does it: new link, then rename over ..data.
        try fm.createSymbolicLink(atPath: dir + "/..data_tmp", withDestinationPath: "..v2")
        XCTAssertEqual(rename(dir + "/..data_tmp", dir + "/..data"), 0)
        let deadline = Date().addingTimeInterval(10)
        while reloading.current.certificatePEM != second.certificatePEM && Date() < deadline { usleep(10_000) }
        XCTAssertEqual(reloading.current.certificatePEM, second.certificatePEM)
    }

    // MARK: Interop

    func testOpenSSLSClientNegotiatesH2() throws {
        let server = try selfSignedServer()
        let listener = try startTLSServer(group: group, recorder: ServerRecorder()) { server }
        defer { try? listener.close().wait() }
        let port = listener.localAddress!.port!
        let (status, output) = try runOpenSSL(["s_client", "-alpn", "h2", "-connect", "127.0.0.1:\(port)", "-servername", "localhost"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("ALPN protocol: h2"), output)
        XCTAssertTrue(output.contains("TLSv1.3"), output)

        let (status12, output12) = try runOpenSSL(["s_client", "-tls1_2", "-alpn", "h2", "-connect", "127.0.0.1:\(port)"])
        XCTAssertEqual(status12, 0, output12)
        XCTAssertTrue(output12.contains("ALPN protocol: h2"), output12)
        XCTAssertTrue(output12.contains("Protocol  : TLSv1.2"), output12)
        XCTAssertTrue(output12.contains("ECDHE"), output12)

        let (status11, output11) = try runOpenSSL(["s_client", "-tls1_1", "-connect", "127.0.0.1:\(port)"])
        XCTAssertNotEqual(status11, 0, "TLS 1.1 is refused: \(output11)")

        let (statusHTTP1, outputHTTP1) = try runOpenSSL(["s_client", "-alpn", "http/1.1", "-connect", "127.0.0.1:\(port)"])
        XCTAssertNotEqual(statusHTTP1, 0, outputHTTP1)
        XCTAssertTrue(outputHTTP1.contains("no application protocol"), outputHTTP1)
    }
}

/// Runs the openssl CLI with stdin at EOF (s_client then closes after the handshake); returns status and output.
func runOpenSSL(_ arguments: [String]) throws -> (Int32, String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
    process.arguments = arguments
    process.standardInput = FileHandle.nullDevice
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let killer = DispatchWorkItem { process.terminate() }
    DispatchQueue.global().asyncAfter(deadline: .now() + 20, execute: killer)
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    killer.cancel()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}
