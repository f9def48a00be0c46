import Foundation
import GRPCServer
import NIOCore

/// Wire encoding of the replies sent for every request, written straight into the gRPC frame.
///
/// swift-protobuf's generic encoder walks nested messages twice (size, then bytes) through
/// visitors and dictionaries; for these few fixed shapes that was a fifth of the picker's CPU per
/// request. The field numbers are those of envoy/service/ext_proc/v3/external_processor.proto;
/// `ReplyEncodingTests` decodes every shape with swift-protobuf and compares it with the message
/// built the ordinary way (`Replies`).
enum ReplyEncoding {
    /// Header fields set with `raw_value` and OVERWRITE_IF_EXISTS_OR_ADD, and names to remove.
    struct HeaderChanges {
        var setHeaders: [(String, String)] = []
        var removeHeaders: [String] = []
        var isEmpty: Bool { setHeaders.isEmpty && removeHeaders.isEmpty }
    }

    /// `request_headers` (or `response_headers`) reply with an optional mutation, optional
    /// `clear_route_cache`, and the `envoy.lb` destination metadata when `destination` is set.
    static func headersReply(request: Bool, changes: HeaderChanges, clearRouteCache: Bool, destination: String?) -> ByteBuffer {
        // Sizes bottom-up, then one pass writing into a single buffer.
        func field(_ n: Int) -> Int { 1 + varintSize(n) + n }
        // (HeaderValue, HeaderValueOption) sizes of a set header; computed again when writing
        // rather than kept in an array (an allocation per reply).
        func sizes(_ key: String, _ value: String) -> (header: Int, option: Int) {
            let header = field(key.utf8.count) + field(value.utf8.count)
            return (header, field(header) + 2)
        }
        var mutation = 0
        for (key, value) in changes.setHeaders { mutation += field(sizes(key, value).option) }
        for name in changes.removeHeaders { mutation += field(name.utf8.count) }
        let common = (changes.isEmpty ? 0 : field(mutation)) + (clearRouteCache ? 2 : 0)
        let headers = field(common)
        var metadataSizes = (value: 0, entry: 0, inner: 0, outerValue: 0, outerEntry: 0, outer: 0)
        var total = field(headers)
        if let destination {
            metadataSizes.value = field(destination.utf8.count)
            metadataSizes.entry = field(WireNames.destinationHeader.utf8.count) + field(metadataSizes.value)
            metadataSizes.inner = field(metadataSizes.entry)
            metadataSizes.outerValue = field(metadataSizes.inner)
            metadataSizes.outerEntry = field(WireNames.destinationMetadataNamespace.utf8.count) + field(metadataSizes.outerValue)
            metadataSizes.outer = field(metadataSizes.outerEntry)
            total += field(metadataSizes.outer)
        }

        var buffer = ProtobufAllocator.allocator.buffer(capacity: 5 + total)
        buffer.writeProto(messageLength: total, partLength: total) { w in
        w.open(request ? 1 : 2, headers)       // ProcessingResponse.request_headers / response_headers
        w.open(1, common)                      // HeadersResponse.response
        if !changes.isEmpty {
            w.open(2, mutation)                // CommonResponse.header_mutation
            for (k, v) in changes.setHeaders {
                let size = sizes(k, v)
                w.open(1, size.option)         // HeaderMutation.set_headers
                w.open(1, size.header)         // HeaderValueOption.header
                w.string(1, k)                 // HeaderValue.key
                w.string(3, v)                 // HeaderValue.raw_value
                w.byte(0x18)                   // HeaderValueOption.append_action
                w.byte(2)                      // OVERWRITE_IF_EXISTS_OR_ADD
            }
            for name in changes.removeHeaders { w.string(2, name) }  // HeaderMutation.remove_headers
        }
        if clearRouteCache {
            w.byte(0x28)                       // CommonResponse.clear_route_cache
            w.byte(1)
        }
        if let destination {
            w.open(8, metadataSizes.outer)     // ProcessingResponse.dynamic_metadata (Struct)
            w.open(1, metadataSizes.outerEntry)  // Struct.fields entry
            w.string(1, WireNames.destinationMetadataNamespace)
            w.open(2, metadataSizes.outerValue)  // Value
            w.open(5, metadataSizes.inner)     // Value.struct_value
            w.open(1, metadataSizes.entry)     // Struct.fields entry
            w.string(1, WireNames.destinationHeader)
            w.open(2, metadataSizes.value)     // Value
            w.string(3, destination)           // Value.string_value
        }
        }
        return buffer
    }

    /// A FULL_DUPLEX_STREAMED body piece: ProcessingResponse{request_body|response_body{response{
    /// body_mutation{streamed_response{body, end_of_stream}}}}}, as one buffer (tests, small bodies).
    static func streamedBody(_ body: ByteBuffer, endOfStream: Bool, request: Bool) -> ByteBuffer {
        var sink = JoinedParts()
        streamedBody(count: body.readableBytes, endOfStream: endOfStream, request: request, into: &sink) { $0.write(body) }
        return sink.joined
    }

    /// The same reply handed to `sink` as consecutive parts of one gRPC message: the prefix and
    /// protobuf fields, then the body that `writeBody` writes (exactly `count` bytes), then
    /// `end_of_stream`. Short body pieces (a JSON key, a replaced model name, a small response)
    /// are copied after the fields; longer ones go out as the slices of the received chunks they
    /// are. The HTTP/2 layer copies those straight into its output buffer, or sends them as they
    /// are from 8 KiB, so a body never gets a reply buffer of its own: for a 1 KB body that was a
    /// 2 KiB allocation (past glibc's small bins, so it also consolidated the fast bins) and a copy
    /// per reply; for 62,000-byte chunks, a 64 KiB allocation and copy each (~11% of the CPU of a
    /// 256 KiB body).
    static func streamedBody<Sink: ReplyPartSink>(count: Int, endOfStream: Bool, request: Bool, into sink: inout Sink,
                                                  writeBody: (inout BodyParts<Sink>) -> Void) {
        let bodyField = count == 0 ? 0 : 1 + varintSize(count) + count
        let streamed = bodyField + (endOfStream ? 2 : 0)
        let mutation = 1 + varintSize(streamed) + streamed
        let common = 1 + varintSize(mutation) + mutation
        let bodyResponse = 1 + varintSize(common) + common
        let total = 1 + varintSize(bodyResponse) + bodyResponse
        let head = total - count - (endOfStream ? 2 : 0)  // everything before the body bytes
        // Room for the fields, the short pieces and end_of_stream: under 512 bytes, a small-bin size.
        var parts = BodyParts(capacity: 5 + head + min(count, BodyParts<Sink>.copyLimit) + 2, sink: sink)
        parts.current.writeProto(messageLength: total, partLength: head) { w in
            w.open(request ? 3 : 4, bodyResponse)  // ProcessingResponse.request_body / response_body
            w.open(1, common)                      // BodyResponse.response
            w.open(3, mutation)                    // CommonResponse.body_mutation
            w.open(3, streamed)                    // BodyMutation.streamed_response
            if count > 0 { w.open(1, count) }      // StreamedBodyResponse.body
        }
        if count > 0 { writeBody(&parts) }
        precondition(parts.written == count, "body of \(parts.written) bytes, \(count) announced")
        if endOfStream {
            if parts.current.writableBytes >= 2 {
                parts.current.writeInteger(UInt16(0x1001))  // StreamedBodyResponse.end_of_stream = true
            } else {
                parts.flush()
                parts.current = endOfStreamField
            }
        }
        parts.flush()
        sink = parts.sink
    }

    /// StreamedBodyResponse.end_of_stream = true, shared by every reply whose last part it is.
    private static let endOfStreamField: ByteBuffer = {
        var b = ProtobufAllocator.allocator.buffer(capacity: 2)
        b.writeInteger(UInt16(0x1001))
        return b
    }()

    /// Where a streamed reply's body is written: see `streamedBody(count:endOfStream:request:into:writeBody:)`.
    /// Generic over the sink rather than holding a closure: a stored closure's context is a heap
    /// allocation per reply.
    struct BodyParts<Sink: ReplyPartSink>: BodySink {
        /// Pieces up to this size are copied (when they fit); longer ones are passed on as slices.
        static var copyLimit: Int { 256 }
        fileprivate var current: ByteBuffer
        fileprivate var sink: Sink
        fileprivate(set) var written = 0

        fileprivate init(capacity: Int, sink: Sink) {
            self.current = ProtobufAllocator.allocator.buffer(capacity: capacity)
            self.sink = sink
        }

        /// Appends a piece of a received buffer (a slice keeps it alive until it is sent).
        mutating func write(_ piece: ByteBuffer) {
            let n = piece.readableBytes
            guard n > 0 else { return }
            written += n
            if n <= Self.copyLimit && n <= current.writableBytes {
                var piece = piece
                current.writeBuffer(&piece)
            } else {
                flush()
                sink.emit(piece)
            }
        }

        /// Appends bytes of our own (a replacement model name): copied.
        mutating func write(bytes: [UInt8]) {
            guard !bytes.isEmpty else { return }
            written += bytes.count
            if bytes.count > current.writableBytes {
                flush()
                current = ProtobufAllocator.allocator.buffer(capacity: bytes.count)
            }
            current.writeBytes(bytes)
        }

        fileprivate mutating func flush() {
            if current.readableBytes > 0 { sink.emit(current) }
            current = ByteBuffer()
        }
    }

    static func varintSize(_ v: Int) -> Int {
        var v = UInt64(v), n = 1
        while v >= 0x80 { v >>= 7; n += 1 }
        return n
    }
}

/// Writes the small protobuf parts of a reply straight into the frame's ByteBuffer: a byte here is
/// a bounds check and a store, where `ByteBuffer.writeInteger` pays a uniqueness check and a memmove
/// per byte (once 8% of a request's CPU) and an intermediate array costs an allocation and a copy.
struct ProtoWriter {
    private let base: UnsafeMutableRawBufferPointer
    private(set) var count = 0

    init(_ base: UnsafeMutableRawBufferPointer) { self.base = base }

    @inline(__always) mutating func byte(_ b: UInt8) {
        precondition(count < base.count, "reply larger than its computed size")
        base[count] = b
        count &+= 1
    }

    mutating func varint(_ v: Int) {
        var v = UInt64(v)
        while v >= 0x80 {
            byte(UInt8(truncatingIfNeeded: v) & 0x7F | 0x80)
            v >>= 7
        }
        byte(UInt8(v))
    }

    /// Key and length of a length-delimited field whose contents follow.
    mutating func open(_ field: Int, _ size: Int) {
        byte(UInt8(field << 3 | 2))
        varint(size)
    }

    mutating func string(_ field: Int, _ s: String) {
        var s = s
        s.withUTF8 { utf8 in
            open(field, utf8.count)
            precondition(count + utf8.count <= base.count, "reply larger than its computed size")
            UnsafeMutableRawBufferPointer(rebasing: base[count...]).copyMemory(from: UnsafeRawBufferPointer(utf8))
            count += utf8.count
        }
    }
}

extension ByteBuffer {
    /// Appends the gRPC frame header of an uncompressed message of `messageLength` bytes, then the
    /// `partLength` bytes `body` writes (checked: exactly that many).
    mutating func writeProto(messageLength: Int, partLength: Int, _ body: (inout ProtoWriter) -> Void) {
        writeInteger(UInt8(0))
        writeInteger(UInt32(messageLength))
        writeWithUnsafeMutableBytes(minimumWritableBytes: partLength) { raw in
            var w = ProtoWriter(UnsafeMutableRawBufferPointer(rebasing: raw[..<partLength]))
            body(&w)
            precondition(w.count == partLength, "reply size \(w.count) differs from the computed \(partLength)")
            return partLength
        }
    }
}

/// Where the parts of a reply go, in order (a stream, or a buffer in tests).
protocol ReplyPartSink {
    mutating func emit(_ part: ByteBuffer)
}

/// Parts sent on a stream as they come (the HTTP/2 layer queues them in order).
struct StreamParts: ReplyPartSink {
    let stream: GRPCServerStream
    func emit(_ part: ByteBuffer) { stream.sendFramed(part) }
}

/// Parts joined into one buffer.
struct JoinedParts: ReplyPartSink {
    var joined = ByteBuffer()
    mutating func emit(_ part: ByteBuffer) {
        if joined.readableBytes == 0 { joined = part; return }
        var part = part
        joined.writeBuffer(&part)
    }
}

/// Something a body is written into piece by piece: a reply's parts, or one joined buffer.
protocol BodySink {
    mutating func write(_ piece: ByteBuffer)
    mutating func write(bytes: [UInt8])
}

extension ByteBuffer: BodySink {
    mutating func write(_ piece: ByteBuffer) {
        var piece = piece
        writeBuffer(&piece)
    }

    mutating func write(bytes: [UInt8]) {
        writeBytes(bytes)
    }
}

enum ProtobufAllocator {
    static let allocator = ByteBufferAllocator()
}

