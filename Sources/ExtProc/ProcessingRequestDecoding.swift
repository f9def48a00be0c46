import Foundation
import GRPCServer
import NIOCore

/// A decoded `envoy.service.ext_proc.v3.ProcessingRequest`, as views into the received buffer.
///
/// Every request through the gateway brings four to six of these; decoding them with the generic
/// swift-protobuf machinery made a String and a Data per header and copied every body chunk. This
/// reader walks the wire format once and hands out slices. Field numbers are those of
/// external_processor.proto; unknown fields are skipped, as protobuf requires, and when a field
/// repeats the last occurrence wins (Envoy never repeats these). `ProcessingRequestDecodingTests`
/// checks it against swift-protobuf.
struct ExtProcRequest {
    enum Phase: Int {
        case requestHeaders = 2, responseHeaders, requestBody, responseBody, requestTrailers, responseTrailers
    }

    var phase: Phase?
    /// The HttpHeaders, HttpBody or HttpTrailers message of the phase.
    var payload = ByteBuffer()
    /// `metadata_context` (envoy.config.core.v3.Metadata), undecoded.
    var metadataContext: ByteBuffer?
    /// `protocol_config` body modes (BodySendMode raw values), when present.
    var requestBodyMode: Int?
    var responseBodyMode: Int?

    init(decoding message: ByteBuffer) throws {
        try message.forEachProtoField { field, wireType, reader in
            switch (field, wireType) {
            case (2...7, 2):
                phase = Phase(rawValue: field)
                payload = message.slice(try reader.lengthDelimited())
            case (8, 2):
                metadataContext = message.slice(try reader.lengthDelimited())
            case (11, 2):
                requestBodyMode = 0
                responseBodyMode = 0
                var config = try reader.nested()
                try config.forEachField { f, w, config in
                    switch (f, w) {
                    case (1, 0): requestBodyMode = Int(truncatingIfNeeded: try config.varint())
                    case (2, 0): responseBodyMode = Int(truncatingIfNeeded: try config.varint())
                    default: try config.skip(w)
                    }
                }
            default:
                try reader.skip(wireType)
            }
        }
    }
}

/// Reads one string from an `envoy.config.core.v3.Metadata`: `filter_metadata[namespace]`
/// (a Struct) → `fields[key]` → `string_value`; nil when absent or not a string. Walks the wire
/// format without decoding the rest (the gateway forwards this with every response).
func metadataString(_ metadata: ByteBuffer, namespace: StaticString, key: StaticString) throws -> String? {
    var found: String?
    try metadata.forEachProtoField { f, w, reader in
        guard f == 1, w == 2 else { return try reader.skip(w) }  // filter_metadata entry
        guard var fields = try reader.mapEntry(named: namespace) else { return }
        try fields.forEachField { sf, sw, fields in
            guard sf == 1, sw == 2 else { return try fields.skip(sw) }  // Struct.fields entry
            guard var value = try fields.mapEntry(named: key) else { return }
            var string: String?
            try value.forEachField { vf, vw, v in
                if vf == 3, vw == 2 {
                    string = String(decoding: v.bytes(in: try v.lengthDelimited()), as: UTF8.self)
                } else {
                    string = nil  // the last kind set wins
                    try v.skip(vw)
                }
            }
            found = string
        }
    }
    return found
}

/// `HttpHeaders` / `HttpTrailers` view: iterate the header fields without materialising them.
struct HeadersView {
    private let headerMap: ByteBuffer?
    let endOfStream: Bool

    /// Parses HttpHeaders (`headers` = 1, `end_of_stream` = 3) or HttpTrailers (`trailers` = 1).
    init(_ payload: ByteBuffer) throws {
        var map: ByteBuffer?
        var eos = false
        try payload.forEachProtoField { f, w, reader in
            switch (f, w) {
            case (1, 2): map = payload.slice(try reader.lengthDelimited())
            case (3, 0): eos = try reader.varint() != 0
            default: try reader.skip(w)
            }
        }
        headerMap = map
        endOfStream = eos
    }

    /// Calls `body` with each field's name and value (`raw_value`, or `value` when that is empty).
    /// The pointers are valid only during the call.
    func forEach(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Void) throws {
        guard let headerMap else { return }
        // One pass over the bytes by index: a ByteBuffer slice per field cost a retain and release
        // each, for the dozen headers of every request.
        try headerMap.forEachProtoField { f, w, map in
            guard f == 1, w == 2 else { return try map.skip(w) }
            var entry = try map.nested()
            var key = 0..<0, value = 0..<0, raw = 0..<0
            try entry.forEachField { ef, ew, entry in
                switch (ef, ew) {
                case (1, 2): key = try entry.lengthDelimited()
                case (2, 2): value = try entry.lengthDelimited()
                case (3, 2): raw = try entry.lengthDelimited()
                default: try entry.skip(ew)
                }
            }
            try body(entry.bytes(in: key), entry.bytes(in: raw.isEmpty ? value : raw))
        }
    }

    /// The value of the first field named `name` (lower case), as a String.
    func value(of name: StaticString) throws -> String? {
        var found: String?
        try forEach { k, v in
            if found == nil && k.equals(name) { found = String(decoding: v, as: UTF8.self) }
        }
        return found
    }
}

/// `HttpBody` view: the chunk as a slice of the received buffer.
struct BodyView {
    var body = ByteBuffer()
    var endOfStream = false

    init(_ payload: ByteBuffer) throws {
        try payload.forEachProtoField { f, w, reader in
            switch (f, w) {
            case (1, 2): body = payload.slice(try reader.lengthDelimited())
            case (2, 0): endOfStream = try reader.varint() != 0
            default: try reader.skip(w)
            }
        }
    }
}

struct ProtoDecodingError: Error, CustomStringConvertible {
    let description: String
}

/// Protobuf wire-format reader over bytes in memory, by index: length-delimited fields come out
/// as ranges of `bytes` (no ByteBuffer slice per field, so no reference counting per field).
struct IndexedProtoReader {
    private let bytes: UnsafeRawBufferPointer
    private var index: Int
    private let end: Int

    init(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) {
        precondition(range.lowerBound >= 0 && range.upperBound <= bytes.count)
        self.bytes = bytes
        index = range.lowerBound
        end = range.upperBound
    }

    /// Calls `body` for each field until the end; `body` must consume (or skip) the field's value.
    mutating func forEachField(_ body: (_ field: Int, _ wireType: UInt8, _ reader: inout IndexedProtoReader) throws -> Void) throws {
        while let (field, wireType) = try nextKey() { try body(field, wireType, &self) }
    }

    /// A reader over the next length-delimited field (an embedded message).
    mutating func nested() throws -> IndexedProtoReader {
        IndexedProtoReader(bytes, try lengthDelimited())
    }

    /// Reads the next field as a protobuf map entry (`key` = 1, a string; `value` = 2, a message):
    /// a reader over the value when the key is `name`, else nil.
    mutating func mapEntry(named name: StaticString) throws -> IndexedProtoReader? {
        var entry = try nested()
        var key = 0..<0, value: Range<Int>?
        try entry.forEachField { f, w, entry in
            switch (f, w) {
            case (1, 2): key = try entry.lengthDelimited()
            case (2, 2): value = try entry.lengthDelimited()
            default: try entry.skip(w)
            }
        }
        guard let value, entry.bytes(in: key).equals(name) else { return nil }
        return IndexedProtoReader(bytes, value)
    }

    /// The bytes of a range this reader reported; valid as long as the reader's bytes are.
    func bytes(in range: Range<Int>) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: bytes[range])
    }

    mutating func nextKey() throws -> (Int, UInt8)? {
        guard index < end else { return nil }
        let key = try varint()
        let field = Int(truncatingIfNeeded: key >> 3)
        guard field > 0 else { throw ProtoDecodingError(description: "field number 0") }
        return (field, UInt8(key & 7))
    }

    mutating func varint() throws -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while index < end && shift < 64 {
            let byte = bytes[index]
            index += 1
            result |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return result }
            shift += 7
        }
        throw ProtoDecodingError(description: "malformed varint")
    }

    mutating func lengthDelimited() throws -> Range<Int> {
        let length = try varint()
        guard length <= UInt64(end - index) else {
            throw ProtoDecodingError(description: "truncated length-delimited field")
        }
        let range = index..<(index + Int(length))
        index = range.upperBound
        return range
    }

    mutating func skip(_ wireType: UInt8) throws {
        switch wireType {
        case 0: _ = try varint()
        case 1: try advance(8)
        case 2: _ = try lengthDelimited()
        case 5: try advance(4)
        default: throw ProtoDecodingError(description: "unsupported wire type \(wireType)")
        }
    }

    private mutating func advance(_ n: Int) throws {
        guard end - index >= n else { throw ProtoDecodingError(description: "truncated fixed-width field") }
        index += n
    }
}

extension ByteBuffer {
    /// Walks the fields of the protobuf message in the readable bytes (see `IndexedProtoReader.forEachField`).
    func forEachProtoField(_ body: (_ field: Int, _ wireType: UInt8, _ reader: inout IndexedProtoReader) throws -> Void) throws {
        try withUnsafeReadableBytes { bytes in
            var reader = IndexedProtoReader(bytes, 0..<bytes.count)
            try reader.forEachField(body)
        }
    }

    /// The slice for a range of the readable bytes, as `IndexedProtoReader` reports them.
    func slice(_ range: Range<Int>) -> ByteBuffer {
        getSlice(at: readerIndex + range.lowerBound, length: range.count)!
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func equals(_ bytes: [UInt8]) -> Bool {
        count == bytes.count && bytes.withUnsafeBytes { count == 0 || memcmp(baseAddress!, $0.baseAddress!, count) == 0 }
    }
}
