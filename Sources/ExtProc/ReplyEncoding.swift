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
        // Sizes bottom-up, then one pass writing into a single buffer.
        func field(_ n: Int) -> Int { 1 + varintSize(n) + n }
        var optionSizes: [(Int, Int)] = []  // (HeaderValue, HeaderValueOption) sizes
        optionSizes.reserveCapacity(changes.setHeaders.count)
        var mutation = 0
        for (key, value) in changes.setHeaders {
            let header = field(key.utf8.count) + field(value.utf8.count)
            let option = field(header) + 2
            optionSizes.append((header, option))
            mutation += field(option)
        }
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

        var b = ProtobufAllocator.allocator.buffer(capacity: 5 + total)
        b.writeInteger(UInt8(0))
        b.writeInteger(UInt32(total))
        func key(_ field: Int) { b.writeInteger(UInt8(field << 3 | 2)) }
        func bytes(_ field: Int, _ s: String) {
            key(field)
            writeVarint(&b, s.utf8.count)
            b.writeString(s)
        }
        func open(_ field: Int, _ size: Int) {
            key(field)
            writeVarint(&b, size)
        }
        open(request ? 1 : 2, headers)       // ProcessingResponse.request_headers / response_headers
        open(1, common)                      // HeadersResponse.response
        if !changes.isEmpty {
            open(2, mutation)                // CommonResponse.header_mutation
            for (i, (k, v)) in changes.setHeaders.enumerated() {
                open(1, optionSizes[i].1)    // HeaderMutation.set_headers
                open(1, optionSizes[i].0)    // HeaderValueOption.header
                bytes(1, k)                  // HeaderValue.key
                bytes(3, v)                  // HeaderValue.raw_value
                b.writeInteger(UInt8(0x18))  // HeaderValueOption.append_action
                b.writeInteger(UInt8(2))     // OVERWRITE_IF_EXISTS_OR_ADD
            }
            for name in changes.removeHeaders { bytes(2, name) }  // HeaderMutation.remove_headers
        }
        if clearRouteCache {
            b.writeInteger(UInt8(0x28))      // CommonResponse.clear_route_cache
            b.writeInteger(UInt8(1))
        }
        if let destination {
            open(8, metadataSizes.outer)     // ProcessingResponse.dynamic_metadata (Struct)
            open(1, metadataSizes.outerEntry)  // Struct.fields entry
            bytes(1, WireNames.destinationMetadataNamespace)
            open(2, metadataSizes.outerValue)  // Value
            open(5, metadataSizes.inner)     // Value.struct_value
            open(1, metadataSizes.entry)     // Struct.fields entry
            bytes(1, WireNames.destinationHeader)
            open(2, metadataSizes.value)     // Value
            bytes(3, destination)            // Value.string_value
        }
        assert(b.readableBytes == 5 + total)
        return b
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

