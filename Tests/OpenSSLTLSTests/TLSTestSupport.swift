import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import OpenSSLTLS
import XCTest

struct TestTimeout: Error {}
struct ConnectionClosed: Error {}

extension EventLoopFuture where Value: Sendable {
    /// `wait()` that cannot hang a test run.
    func wait(seconds: Int64) throws -> Value {
        let promise = eventLoop.makePromise(of: Value.self)
        cascade(to: promise)
        let timeout = eventLoop.scheduleTask(in: .seconds(seconds)) { promise.fail(TestTimeout()) }
        defer { timeout.cancel() }
        return try promise.futureResult.wait()
    }
}

/// What the server side saw, readable from the test thread.
final class ServerRecorder: Sendable {
    let errors = NIOLockedValueBox<[String]>([])
    let handshakes = NIOLockedValueBox<[String?]>([])
    let inactiveCount = NIOLockedValueBox<Int>(0)

    func waitForError(seconds: Double = 10) -> String? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let first = errors.withLockedValue({ $0.first }) { return first }
            usleep(10_000)
        }
        return nil
    }
}

/// Server application handler: echoes plaintext (flushing once per read batch) and records events.
final class EchoServerHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let recorder: ServerRecorder
    let echo: Bool

    init(recorder: ServerRecorder, echo: Bool) {
        self.recorder = recorder
        self.echo = echo
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        if buffer.readableBytesView.elementsEqual("please close".utf8) {
            context.close(promise: nil)
            return
        }
        if echo { context.write(data, promise: nil) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let done = event as? TLSHandshakeCompleted {
            recorder.handshakes.withLockedValue { $0.append(done.negotiatedALPN) }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        recorder.errors.withLockedValue { $0.append("\(error)") }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        recorder.inactiveCount.withLockedValue { $0 += 1 }
        context.fireChannelInactive()
    }
}

func startTLSServer(
    group: EventLoopGroup, recorder: ServerRecorder, echo: Bool = true, handshakeTimeout: TimeAmount? = .seconds(10),
    tls: (@Sendable () -> TLSContext)?
) throws -> Channel {
    try ServerBootstrap(group: group)
        .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                if let tls {
                    try channel.pipeline.syncOperations.addHandler(OpenSSLHandler(context: tls(), role: .server, handshakeTimeout: handshakeTimeout))
                }
                try channel.pipeline.syncOperations.addHandler(EchoServerHandler(recorder: recorder, echo: echo))
            }
        }
        .bind(host: "127.0.0.1", port: 0).wait(seconds: 10)
}

/// Client application handler: optional greeting written in channelActive (before the handshake completes,
/// like HTTP/2 SETTINGS), collects plaintext up to `expectedBytes`, reports handshake, errors and close.
final class ClientCollector: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let handshake: EventLoopPromise<String?>
    let received: EventLoopPromise<ByteBuffer>
    let firstError: EventLoopPromise<String>
    let inactive: EventLoopPromise<Void>
    let expectedBytes: Int
    let greeting: ByteBuffer?
    let manualRead: Bool
    var collected = ByteBuffer()

    init(loop: EventLoop, expectedBytes: Int, greeting: ByteBuffer?, manualRead: Bool) {
        handshake = loop.makePromise()
        received = loop.makePromise()
        firstError = loop.makePromise()
        inactive = loop.makePromise()
        self.expectedBytes = expectedBytes
        self.greeting = greeting
        self.manualRead = manualRead
    }

    func channelActive(context: ChannelHandlerContext) {
        if let greeting { context.writeAndFlush(wrapOutboundOut(greeting), promise: nil) }
        if manualRead { context.read() }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        collected.writeBuffer(&buffer)
        if collected.readableBytes >= expectedBytes { received.succeed(collected) }
        // autoRead off: ask for more only after plaintext arrived; the TLS handler must cover handshake-only reads.
        if manualRead { context.read() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let done = event as? TLSHandshakeCompleted { handshake.succeed(done.negotiatedALPN) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        firstError.succeed("\(error)")
        handshake.fail(error)
        received.fail(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshake.fail(ConnectionClosed())
        received.fail(ConnectionClosed())
        firstError.fail(ConnectionClosed())
        inactive.succeed()
    }
}

struct ClientConnection {
    let channel: Channel
    let handshake: EventLoopFuture<String?>
    let received: EventLoopFuture<ByteBuffer>
    let firstError: EventLoopFuture<String>
    let inactive: EventLoopFuture<Void>
}

func connectTLSClient(
    group: EventLoopGroup, port: Int, tls: TLSContext?, hostname: String?, expectedBytes: Int = 0,
    greeting: String? = nil, manualRead: Bool = false, flushOnWritabilityChange: Bool = false,
    ciphertextCounter: CiphertextCounter? = nil, fragmentCiphertext: Bool = false
) throws -> ClientConnection {
    let loop = group.next()
    let collector = try loop.submit {
        NIOLoopBound(
            ClientCollector(
                loop: loop, expectedBytes: expectedBytes, greeting: greeting.map { ByteBuffer(string: $0) },
                manualRead: manualRead),
            eventLoop: loop)
    }.wait(seconds: 10)
    let futures = try loop.submit {
        let c = collector.value
        return (c.handshake.futureResult, c.received.futureResult, c.firstError.futureResult, c.inactive.futureResult)
    }.wait(seconds: 10)
    let channel = try ClientBootstrap(group: loop)
        .channelOption(ChannelOptions.autoRead, value: !manualRead)
        .channelOption(
            ChannelOptions.writeBufferWaterMark,
            value: flushOnWritabilityChange ? .init(low: 1024, high: 4096) : .init(low: 32 * 1024, high: 64 * 1024))
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                if fragmentCiphertext {
                    try channel.pipeline.syncOperations.addHandler(FragmentingHandler())
                }
                if let ciphertextCounter {
                    try channel.pipeline.syncOperations.addHandler(CiphertextCountingHandler(counter: ciphertextCounter))
                }
                if let tls {
                    try channel.pipeline.syncOperations.addHandler(
                        OpenSSLHandler(context: tls, role: .client(serverHostname: hostname)))
                }
                if flushOnWritabilityChange {
                    try channel.pipeline.syncOperations.addHandler(FlushOnWritabilityChange())
                }
                try channel.pipeline.syncOperations.addHandler(collector.value)
            }
        }
        .connect(host: "127.0.0.1", port: port).wait(seconds: 10)
    return ClientConnection(channel: channel, handshake: futures.0, received: futures.1, firstError: futures.2, inactive: futures.3)
}

func makeClientContext(
    trusting pem: String?, insecure: Bool = false, alpn: [String] = ["h2"],
    clientCertificate: SelfSignedCertificate? = nil
) throws -> TLSContext {
    try TLSContext.client(
        trustRootsPEM: pem.map { Array($0.utf8) }, trustRootsFile: nil,
        clientCertificatePEM: clientCertificate.map { Array($0.certificatePEM.utf8) },
        clientKeyPEM: clientCertificate.map { Array($0.privateKeyPEM.utf8) },
        insecureSkipVerify: insecure, alpn: alpn)
}

func makeTemporaryDirectory() throws -> String {
    let path = NSTemporaryDirectory() + "openssltls-test-" + UUID().uuidString
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

func writeFile(_ path: String, _ contents: String) throws {
    try contents.write(toFile: path, atomically: true, encoding: .utf8)
}

/// Flushes whenever writability changes, like HTTP/2 layers do. NIO fires the change synchronously from inside a
/// downstream write, so this re-enters the TLS handler's flush while it is encrypting.
final class FlushOnWritabilityChange: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    private(set) var changes = 0

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        changes += 1
        context.flush()
        context.fireChannelWritabilityChanged()
    }
}

final class CiphertextCounter: Sendable {
    let bytesWritten = NIOLockedValueBox(0)
}

/// Sits below the TLS handler and counts the ciphertext bytes it writes.
final class CiphertextCountingHandler: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer
    let counter: CiphertextCounter
    init(counter: CiphertextCounter) { self.counter = counter }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let count = unwrapOutboundIn(data).readableBytes
        counter.bytesWritten.withLockedValue { $0 += count }
        context.write(data, promise: promise)
    }
}

/// Sits below the TLS handler and sends its ciphertext in 3-byte writes, each flushed: the peer sees records
/// (and the handshake) split across many reads.
final class FragmentingHandler: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        var buffer = unwrapOutboundIn(data)
        while buffer.readableBytes > 3, let piece = buffer.readSlice(length: 3) {
            context.writeAndFlush(wrapOutboundOut(piece), promise: nil)
        }
        context.write(wrapOutboundOut(buffer), promise: promise)
    }
}
