import Foundation
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
        var common = ProtoWriter()
        if !changes.isEmpty {
            var mutation = ProtoWriter()
            for (key, value) in changes.setHeaders {
                var header = ProtoWriter()
                header.string(1, key)
                header.string(3, value)  // raw_value
                var option = ProtoWriter()
                option.message(1, header)
                option.varint(3, 2)  // OVERWRITE_IF_EXISTS_OR_ADD
                mutation.message(1, option)
            }
            for name in changes.removeHeaders { mutation.string(2, name) }
            common.message(2, mutation)
        }
        if clearRouteCache { common.varint(5, 1) }
        var headers = ProtoWriter()
        headers.message(1, common)
        var response = ProtoWriter()
        response.message(request ? 1 : 2, headers)
        if let destination {
            var value = ProtoWriter()
            value.string(3, destination)  // string_value
            var inner = ProtoWriter()
            inner.mapEntry(1, key: WireNames.destinationHeader, value: value)
            var outerValue = ProtoWriter()
            outerValue.message(5, inner)  // struct_value
            var outer = ProtoWriter()
            outer.mapEntry(1, key: WireNames.destinationMetadataNamespace, value: outerValue)
            response.message(8, outer)  // dynamic_metadata
        }
        return response.framed()
    }

    /// A FULL_DUPLEX_STREAMED body piece: ProcessingResponse{request_body|response_body{response{
    /// body_mutation{streamed_response{body, end_of_stream}}}}}. The body is copied once, into the frame.
    static func streamedBody(_ body: ByteBuffer, endOfStream: Bool, request: Bool) -> ByteBuffer {
        let count = body.readableBytes
        let bodyField = count == 0 ? 0 : 1 + varintSize(count) + count
        let streamed = bodyField + (endOfStream ? 2 : 0)
        let mutation = 1 + varintSize(streamed) + streamed
        let common = 1 + varintSize(mutation) + mutation
        let bodyResponse = 1 + varintSize(common) + common
        let total = 1 + varintSize(bodyResponse) + bodyResponse
        var b = ProtobufAllocator.allocator.buffer(capacity: 5 + total)
        b.writeInteger(UInt8(0))
        b.writeInteger(UInt32(total))
        b.writeInteger(UInt8(request ? 0x1A : 0x22))  // field 3 / 4, length-delimited
        writeVarint(&b, bodyResponse)
        b.writeInteger(UInt8(0x0A))  // BodyResponse.response
        writeVarint(&b, common)
        b.writeInteger(UInt8(0x1A))  // CommonResponse.body_mutation
        writeVarint(&b, mutation)
        b.writeInteger(UInt8(0x1A))  // BodyMutation.streamed_response
        writeVarint(&b, streamed)
        if count > 0 {
            var body = body
            b.writeInteger(UInt8(0x0A))  // StreamedBodyResponse.body
            writeVarint(&b, count)
            b.writeBuffer(&body)
        }
        if endOfStream {
            b.writeInteger(UInt8(0x10))  // StreamedBodyResponse.end_of_stream
            b.writeInteger(UInt8(1))
        }
        return b
    }

    static func varintSize(_ v: Int) -> Int {
        var v = UInt64(v), n = 1
        while v >= 0x80 { v >>= 7; n += 1 }
        return n
    }

    static func writeVarint(_ b: inout ByteBuffer, _ v: Int) {
        var v = UInt64(v)
        while v >= 0x80 {
            b.writeInteger(UInt8(v & 0x7F | 0x80))
            v >>= 7
        }
        b.writeInteger(UInt8(v))
    }
}

enum ProtobufAllocator {
    static let allocator = ByteBufferAllocator()
}

/// Appends protobuf fields to a byte array; nested messages are built first, then embedded.
struct ProtoWriter {
    private(set) var bytes: [UInt8] = []

    mutating func key(_ field: Int, _ wireType: UInt8) { appendVarint(UInt64(field << 3) | UInt64(wireType)) }

    mutating func appendVarint(_ v: UInt64) {
        var v = v
        while v >= 0x80 {
            bytes.append(UInt8(v & 0x7F | 0x80))
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    mutating func varint(_ field: Int, _ value: UInt64) {
        key(field, 0)
        appendVarint(value)
    }

    mutating func string(_ field: Int, _ value: String) {
        key(field, 2)
        appendVarint(UInt64(value.utf8.count))
        bytes.append(contentsOf: value.utf8)
    }

    mutating func message(_ field: Int, _ inner: ProtoWriter) {
        key(field, 2)
        appendVarint(UInt64(inner.bytes.count))
        bytes.append(contentsOf: inner.bytes)
    }

    /// A `map<string, Message>` entry.
    mutating func mapEntry(_ field: Int, key entryKey: String, value: ProtoWriter) {
        var entry = ProtoWriter()
        entry.string(1, entryKey)
        entry.message(2, value)
        message(field, entry)
    }

    /// The bytes as one gRPC message (5-byte prefix + payload).
    func framed() -> ByteBuffer {
        var b = ProtobufAllocator.allocator.buffer(capacity: 5 + bytes.count)
        b.writeInteger(UInt8(0))
        b.writeInteger(UInt32(bytes.count))
        b.writeBytes(bytes)
        return b
    }
}
