import GRPCServer
import NIOCore

/// Test-only service (`--enable-test-echo-service`): raw bytes, no protobuf. Exercises streaming,
/// flow control and limits of the gRPC layer from independent clients.
struct EchoService: GRPCService {
    var methods: [GRPCMethod] {
        [
            GRPCMethod(path: "/epp.test.Echo/Echo") { _ in EchoHandler() },
            .unary(path: "/epp.test.Echo/Unary") { message, stream in
                stream.send(message)
                stream.finish(.ok)
            },
        ]
    }
}

/// Echoes each message in order; when the reply queue is full it keeps the rest until the client
/// reads (the gRPC layer then stops returning window, so the client is slowed down).
private final class EchoHandler: GRPCStreamHandler {
    private var backlog: [ByteBuffer] = []
    private var ended = false

    func received(_ message: ByteBuffer, on stream: GRPCServerStream) {
        if !backlog.isEmpty || !stream.isWritable {
            backlog.append(message)
            return
        }
        stream.send(message)
    }

    func receivedEnd(on stream: GRPCServerStream) {
        ended = true
        if backlog.isEmpty { stream.finish(.ok) }
    }

    func writable(_ stream: GRPCServerStream) {
        while !backlog.isEmpty && stream.isWritable {
            stream.send(backlog.removeFirst())
        }
        if backlog.isEmpty && ended { stream.finish(.ok) }
    }

    func cancelled(_ stream: GRPCServerStream) { backlog.removeAll() }
}
