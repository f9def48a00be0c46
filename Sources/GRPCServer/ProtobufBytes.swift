import NIOCore
import SwiftProtobuf

/// Lets swift-protobuf decode straight from a `ByteBuffer` and encode straight into a buffer that
/// already has room for the 5-byte gRPC message prefix, so no intermediate arrays are made.
struct ProtobufBytes: SwiftProtobufContiguousBytes {
    static let allocator = ByteBufferAllocator()
    /// Readable bytes are the message; when built for encoding, 5 bytes before the reader index
    /// are reserved for the prefix.
    var buffer: ByteBuffer

    init(_ buffer: ByteBuffer) { self.buffer = buffer }

    init(repeating: UInt8, count: Int) {
        var b = Self.allocator.buffer(capacity: count + 5)
        b.writeRepeatingByte(0, count: 5)
        b.writeRepeatingByte(repeating, count: count)
        b.moveReaderIndex(forwardBy: 5)
        buffer = b
    }

    init<S: Sequence>(_ sequence: S) where S.Element == UInt8 {
        var b = Self.allocator.buffer(capacity: 5 + sequence.underestimatedCount)
        b.writeRepeatingByte(0, count: 5)
        b.writeBytes(Array(sequence))
        b.moveReaderIndex(forwardBy: 5)
        buffer = b
    }

    var count: Int { buffer.readableBytes }

    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try buffer.withUnsafeReadableBytes(body)
    }

    mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try buffer.withUnsafeMutableReadableBytes(body)
    }

    /// The framed message (prefix + payload), for buffers made by `init(repeating:count:)`.
    consuming func framed() -> ByteBuffer {
        let length = buffer.readableBytes
        buffer.moveReaderIndex(to: buffer.readerIndex - 5)
        buffer.setInteger(UInt8(0), at: buffer.readerIndex)
        buffer.setInteger(UInt32(length), at: buffer.readerIndex + 1)
        return buffer
    }
}
