import NGHTTP2Server
import NIOCore

/// A minimal HTTP/2 client for layer tests: builds frames by hand (HPACK literals without
/// indexing or Huffman, which every decoder must accept) and parses what the server writes, so the
/// server is exercised byte for byte without sockets.
struct HTTP2TestPeer {
    struct Frame {
        var type: UInt8
        var flags: UInt8
        var stream: Int32
        var payload: ByteBuffer
        var endStream: Bool { flags & 0x1 != 0 }
    }

    static let data: UInt8 = 0, headers: UInt8 = 1, rstStream: UInt8 = 3, settings: UInt8 = 4, goAway: UInt8 = 7, windowUpdate: UInt8 = 8

    var allocator = ByteBufferAllocator()
    private var inbound = ByteBuffer()
    let decoder = try! HPACKDecoder()

    func preface() -> ByteBuffer {
        var b = allocator.buffer(capacity: 64)
        b.writeString("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        var settings = frame(type: Self.settings, flags: 0, stream: 0, payload: allocator.buffer(capacity: 0))
        b.writeBuffer(&settings)
        return b
    }

    func settingsAck() -> ByteBuffer {
        var f = frame(type: Self.settings, flags: 0x1, stream: 0, payload: allocator.buffer(capacity: 0))
        var b = allocator.buffer(capacity: 9)
        b.writeBuffer(&f)
        return b
    }

    func frame(type: UInt8, flags: UInt8, stream: Int32, payload: ByteBuffer) -> ByteBuffer {
        var p = payload
        var b = allocator.buffer(capacity: 9 + p.readableBytes)
        let n = p.readableBytes
        b.writeInteger(UInt8(n >> 16))
        b.writeInteger(UInt16(n & 0xFFFF))
        b.writeInteger(type)
        b.writeInteger(flags)
        b.writeInteger(UInt32(stream))
        b.writeBuffer(&p)
        return b
    }

    func headersFrame(stream: Int32, _ fields: [(String, String)], endStream: Bool = false) -> ByteBuffer {
        var block = allocator.buffer(capacity: 256)
        for (name, value) in fields {
            block.writeInteger(UInt8(0))  // literal without indexing, new name
            Self.writeString(name, into: &block)
            Self.writeString(value, into: &block)
        }
        return frame(type: Self.headers, flags: 0x4 | (endStream ? 0x1 : 0), stream: stream, payload: block)
    }

    static func writeString(_ s: String, into b: inout ByteBuffer) {
        let bytes = Array(s.utf8)
        // 7-bit prefix integer (RFC 7541 §5.1), no Huffman.
        if bytes.count < 127 {
            b.writeInteger(UInt8(bytes.count))
        } else {
            b.writeInteger(UInt8(127))
            var rest = bytes.count - 127
            while rest >= 128 {
                b.writeInteger(UInt8(rest % 128 + 128))
                rest /= 128
            }
            b.writeInteger(UInt8(rest))
        }
        b.writeBytes(bytes)
    }

    func grpcRequest(stream: Int32, path: String, extra: [(String, String)] = []) -> ByteBuffer {
        headersFrame(stream: stream, [
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "test"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ] + extra)
    }

    func dataFrame(stream: Int32, _ bytes: ByteBuffer, endStream: Bool = false) -> ByteBuffer {
        frame(type: Self.data, flags: endStream ? 0x1 : 0, stream: stream, payload: bytes)
    }

    func grpcMessage(_ payload: [UInt8], compressed: Bool = false, declaredLength: Int? = nil) -> ByteBuffer {
        var b = allocator.buffer(capacity: 5 + payload.count)
        b.writeInteger(UInt8(compressed ? 1 : 0))
        b.writeInteger(UInt32(declaredLength ?? payload.count))
        b.writeBytes(payload)
        return b
    }

    func rstStream(stream: Int32, code: UInt32 = 8) -> ByteBuffer {
        var p = allocator.buffer(capacity: 4)
        p.writeInteger(code)
        return frame(type: Self.rstStream, flags: 0, stream: stream, payload: p)
    }

    /// Parses every complete frame in `bytes` (plus what was left over before).
    mutating func parse(_ bytes: ByteBuffer) -> [Frame] {
        var bytes = bytes
        inbound.writeBuffer(&bytes)
        var frames: [Frame] = []
        while inbound.readableBytes >= 9 {
            let length = Int(inbound.getInteger(at: inbound.readerIndex, as: UInt8.self)!) << 16
                | Int(inbound.getInteger(at: inbound.readerIndex + 1, as: UInt16.self)!)
            guard inbound.readableBytes >= 9 + length else { break }
            inbound.moveReaderIndex(forwardBy: 3)
            let type = inbound.readInteger(as: UInt8.self)!
            let flags = inbound.readInteger(as: UInt8.self)!
            let stream = Int32(inbound.readInteger(as: UInt32.self)! & 0x7FFF_FFFF)
            frames.append(Frame(type: type, flags: flags, stream: stream, payload: inbound.readSlice(length: length)!))
        }
        inbound.discardReadBytes()
        return frames
    }

    func headers(of frame: Frame) -> [String: String] {
        var out: [String: String] = [:]
        for (n, v) in try! decoder.decode(frame.payload) { out[n] = v }
        return out
    }
}
