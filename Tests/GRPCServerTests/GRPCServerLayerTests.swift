import Logging
import NGHTTP2Server
import NIOCore
import NIOEmbedded
import XCTest

@testable import GRPCServer

/// Echoes every message; records cancellation.
final class RecordingEcho: GRPCStreamHandler {
    nonisolated(unsafe) static var cancellations = 0
    func received(_ message: ByteBuffer, on stream: GRPCServerStream) { stream.send(message) }
    func receivedEnd(on stream: GRPCServerStream) { stream.finish(.ok) }
    func cancelled(_ stream: GRPCServerStream) { Self.cancellations += 1 }
}

struct TestEchoService: GRPCService {
    var methods: [GRPCMethod] { [GRPCMethod(path: "/test.Echo/Echo") { _ in RecordingEcho() }] }
}

/// Drives the nghttp2 wrapper and the gRPC layer through an EmbeddedChannel, byte for byte.
final class GRPCServerLayerTests: XCTestCase {
    var channel: EmbeddedChannel!
    var peer = HTTP2TestPeer()
    let health = HealthStatusStore(["": .serving, "readiness": .notServing])

    override func setUp() {
        RecordingEcho.cancellations = 0
        let router = GRPCRouter(services: [HealthService(store: health), TestEchoService()])
        let app = GRPCConnection(router: router, maxMessageBytes: 1024, logger: Logger(label: "test"))
        channel = EmbeddedChannel(handler: HTTP2ServerConnectionHandler(settings: HTTP2Settings(), application: app))
        XCTAssertNoThrow(try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait())
        send(peer.preface())
        send(peer.settingsAck())
    }

    override func tearDown() {
        _ = try? channel.finish()
    }

    func send(_ bytes: ByteBuffer) {
        XCTAssertNoThrow(try channel.writeInbound(bytes))
        channel.embeddedEventLoop.run()
    }

    /// Everything the server wrote since the last call, as frames; header blocks decoded in order.
    func received() -> [(HTTP2TestPeer.Frame, [String: String])] {
        var out: [(HTTP2TestPeer.Frame, [String: String])] = []
        while let bytes = try? channel.readOutbound(as: ByteBuffer.self) {
            for f in peer.parse(bytes) {
                out.append((f, f.type == HTTP2TestPeer.headers ? peer.headers(of: f) : [:]))
            }
        }
        return out
    }

    func trailers(_ frames: [(HTTP2TestPeer.Frame, [String: String])], stream: Int32) -> [String: String]? {
        frames.last { $0.0.stream == stream && $0.0.type == HTTP2TestPeer.headers && $0.0.endStream }?.1
    }

    func healthRequest(_ service: String) -> [UInt8] {
        // HealthCheckRequest{service}: field 1, length-delimited.
        service.isEmpty ? [] : [0x0A, UInt8(service.utf8.count)] + Array(service.utf8)
    }

    func testServerSendsSettingsFirst() {
        // setUp consumed nothing yet from the outbound side.
        let frames = received()
        XCTAssertEqual(frames.first?.0.type, HTTP2TestPeer.settings)
        XCTAssertTrue(frames.contains { $0.0.type == HTTP2TestPeer.windowUpdate && $0.0.stream == 0 },
                      "connection window is raised with a WINDOW_UPDATE on stream 0")
    }

    func testUnaryHealthCheck() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/grpc.health.v1.Health/Check"))
        send(peer.dataFrame(stream: 1, peer.grpcMessage(healthRequest("")), endStream: true))
        let frames = received()
        let response = frames.first { $0.0.stream == 1 && $0.0.type == HTTP2TestPeer.headers }
        XCTAssertEqual(response?.1[":status"], "200")
        XCTAssertEqual(response?.1["content-type"], "application/grpc")
        let data = frames.filter { $0.0.stream == 1 && $0.0.type == HTTP2TestPeer.data }.map(\.0.payload)
        XCTAssertEqual(data.reduce(0) { $0 + $1.readableBytes }, 7, "prefix + HealthCheckResponse{status: SERVING}")
        XCTAssertEqual(data.first.flatMap { Array($0.readableBytesView) }, [0, 0, 0, 0, 2, 0x08, 0x01])
        XCTAssertEqual(trailers(frames, stream: 1)?["grpc-status"], "0")
    }

    func testUnknownServiceIsNotFound() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/grpc.health.v1.Health/Check"))
        send(peer.dataFrame(stream: 1, peer.grpcMessage(healthRequest("nope")), endStream: true))
        XCTAssertEqual(trailers(received(), stream: 1)?["grpc-status"], "5")
    }

    func testUnknownMethodIsTrailersOnlyUnimplemented() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/nope.Service/Method"))
        let frames = received()
        XCTAssertEqual(frames.filter { $0.0.stream == 1 }.count, 1, "a single HEADERS frame ends the stream")
        let t = trailers(frames, stream: 1)
        XCTAssertEqual(t?[":status"], "200")
        XCTAssertEqual(t?["grpc-status"], "12")
    }

    func testMessageReassembledFromOneByteFrames() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/test.Echo/Echo"))
        var message = peer.grpcMessage(Array("hello, world".utf8))
        while let byte = message.readSlice(length: 1) {
            send(peer.dataFrame(stream: 1, byte))
        }
        send(peer.dataFrame(stream: 1, ByteBuffer(), endStream: true))
        let frames = received()
        var echoed = ByteBuffer()
        for var f in frames where f.0.stream == 1 && f.0.type == HTTP2TestPeer.data { echoed.writeBuffer(&f.0.payload) }
        XCTAssertEqual(echoed.getInteger(at: 1, as: UInt32.self), 12)
        XCTAssertEqual(echoed.getString(at: 5, length: 12), "hello, world")
        XCTAssertEqual(trailers(frames, stream: 1)?["grpc-status"], "0")
    }

    func testOversizeMessageIsResourceExhaustedAndConnectionLives() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/test.Echo/Echo"))
        send(peer.dataFrame(stream: 1, peer.grpcMessage([], declaredLength: 100 << 20)))
        let t = trailers(received(), stream: 1)
        XCTAssertEqual(t?["grpc-status"], "8")
        XCTAssertTrue(t?["grpc-message"]?.contains("exceeds") ?? false)
        // Same connection, next stream still served.
        send(peer.grpcRequest(stream: 3, path: "/grpc.health.v1.Health/Check"))
        send(peer.dataFrame(stream: 3, peer.grpcMessage([]), endStream: true))
        XCTAssertEqual(trailers(received(), stream: 3)?["grpc-status"], "0")
    }

    func testCompressedMessageWithoutEncodingIsUnimplemented() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/test.Echo/Echo"))
        send(peer.dataFrame(stream: 1, peer.grpcMessage([1, 2, 3], compressed: true)))
        let t = trailers(received(), stream: 1)
        XCTAssertEqual(t?["grpc-status"], "12")
        XCTAssertTrue(t?["grpc-message"]?.contains("compressed") ?? false)
    }

    func testUnsupportedEncodingHeaderIsUnimplemented() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/test.Echo/Echo", extra: [("grpc-encoding", "gzip")]))
        let t = trailers(received(), stream: 1)
        XCTAssertEqual(t?["grpc-status"], "12")
        XCTAssertEqual(t?["grpc-accept-encoding"], "identity")
    }

    func testInvalidProtobufIsInvalidArgument() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/grpc.health.v1.Health/Check"))
        send(peer.dataFrame(stream: 1, peer.grpcMessage([0xFF, 0xFF, 0xFF]), endStream: true))
        XCTAssertEqual(trailers(received(), stream: 1)?["grpc-status"], "3")
    }

    func testDeadlineIsEnforcedByTheServer() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/test.Echo/Echo", extra: [("grpc-timeout", "50m")]))
        XCTAssertNil(trailers(received(), stream: 1))
        channel.embeddedEventLoop.advanceTime(by: .milliseconds(60))
        channel.embeddedEventLoop.run()
        XCTAssertEqual(trailers(received(), stream: 1)?["grpc-status"], "4")
        XCTAssertEqual(RecordingEcho.cancellations, 1)
    }

    func testClientResetCancelsTheHandler() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/test.Echo/Echo"))
        send(peer.rstStream(stream: 1))
        XCTAssertEqual(RecordingEcho.cancellations, 1)
    }

    func testWrongContentTypeIs415() {
        _ = received()
        send(peer.headersFrame(stream: 1, [(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Echo"),
                                           (":authority", "x"), ("content-type", "text/plain")]))
        XCTAssertEqual(trailers(received(), stream: 1)?[":status"], "415")
    }

    func testHealthWatchSendsChanges() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/grpc.health.v1.Health/Watch"))
        send(peer.dataFrame(stream: 1, peer.grpcMessage(healthRequest("readiness")), endStream: true))
        var data = received().filter { $0.0.stream == 1 && $0.0.type == HTTP2TestPeer.data }
        XCTAssertEqual(data.last.flatMap { Array($0.0.payload.readableBytesView) }, [0, 0, 0, 0, 2, 0x08, 0x02], "NOT_SERVING first")
        health.set("readiness", .serving)
        channel.embeddedEventLoop.run()
        data = received().filter { $0.0.stream == 1 && $0.0.type == HTTP2TestPeer.data }
        XCTAssertEqual(data.last.flatMap { Array($0.0.payload.readableBytesView) }, [0, 0, 0, 0, 2, 0x08, 0x01], "then SERVING")
        health.set("readiness", .serving)
        channel.embeddedEventLoop.run()
        XCTAssertTrue(received().isEmpty, "no message without a change")
    }

    func testGarbagePrefaceClosesTheConnection() throws {
        let router = GRPCRouter(services: [HealthService(store: health)])
        let app = GRPCConnection(router: router, maxMessageBytes: 1024, logger: Logger(label: "test"))
        let ch = EmbeddedChannel(handler: HTTP2ServerConnectionHandler(settings: HTTP2Settings(), application: app))
        try ch.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try ch.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        ch.embeddedEventLoop.run()
        XCTAssertFalse(ch.isActive)
    }

    func testGracefulShutdownSendsGoAwayAndLetsStreamsFinish() {
        _ = received()
        send(peer.grpcRequest(stream: 1, path: "/test.Echo/Echo"))
        channel.pipeline.fireUserInboundEventTriggered(HTTP2GracefulShutdownEvent())
        channel.embeddedEventLoop.run()
        XCTAssertTrue(received().contains { $0.0.type == HTTP2TestPeer.goAway })
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        XCTAssertTrue(channel.isActive, "the open stream keeps the connection")
        send(peer.dataFrame(stream: 1, peer.grpcMessage([7]), endStream: true))
        let frames = received()
        XCTAssertEqual(trailers(frames, stream: 1)?["grpc-status"], "0")
        channel.embeddedEventLoop.run()
        XCTAssertFalse(channel.isActive, "closed once the last stream is done")
    }
}

final class GRPCWireFormatTests: XCTestCase {
    func testTimeoutParsing() {
        func parse(_ s: String) -> Int64? { Array(s.utf8).withUnsafeBytes { parseGRPCTimeout($0) } }
        XCTAssertEqual(parse("100m"), 100_000_000)
        XCTAssertEqual(parse("5S"), 5_000_000_000)
        XCTAssertEqual(parse("1H"), 3_600_000_000_000)
        XCTAssertEqual(parse("7n"), 7)
        XCTAssertNil(parse("123456789S"), "at most 8 digits")
        XCTAssertNil(parse("10x"))
        XCTAssertNil(parse("S"))
    }

    func testGrpcMessagePercentEncoding() {
        XCTAssertEqual(GRPCStatus.percentEncode("plain text"), "plain text")
        XCTAssertEqual(GRPCStatus.percentEncode("100%\n"), "100%25%0A")
        XCTAssertEqual(GRPCStatus.percentEncode("é"), "%C3%A9")
    }

    func testRouterMatchesBytes() {
        let router = GRPCRouter(services: [TestEchoService()])
        XCTAssertEqual(Array("/test.Echo/Echo".utf8).withUnsafeBytes { router.route($0) }, 0)
        XCTAssertNil(Array("/test.Echo/Ech0".utf8).withUnsafeBytes { router.route($0) })
    }
}
