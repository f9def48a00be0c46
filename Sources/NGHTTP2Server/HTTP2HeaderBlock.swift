import CNGHTTP2

/// Outgoing header fields in one contiguous allocation.
///
/// Constant fields (`StaticString`) are handed to nghttp2 without a copy; dynamic ones are kept in
/// one byte array so a whole block costs at most one allocation, and nghttp2 copies them while
/// submitting.
public struct HTTP2HeaderBlock: Sendable {
    @usableFromInline enum Part: Sendable {
        case constant(StaticString, StaticString)
        case owned(nameStart: Int, nameCount: Int, valueStart: Int, valueCount: Int)
    }
    @usableFromInline var parts: [Part] = []
    @usableFromInline var storage: [UInt8] = []

    public init() {}

    public init(_ fields: [(StaticString, StaticString)]) {
        parts.reserveCapacity(fields.count)
        for (n, v) in fields { parts.append(.constant(n, v)) }
    }

    public var count: Int { parts.count }

    public mutating func add(_ name: StaticString, _ value: StaticString) {
        parts.append(.constant(name, value))
    }

    /// Adds a field with a dynamic value; the name must already be lower case.
    public mutating func add(name: String, value: String) {
        let ns = storage.count
        storage.append(contentsOf: name.utf8)
        let vs = storage.count
        storage.append(contentsOf: value.utf8)
        parts.append(.owned(nameStart: ns, nameCount: vs - ns, valueStart: vs, valueCount: storage.count - vs))
    }

    public mutating func add(name: StaticString, value: String) {
        add(name: name.description, value: value)
    }

    /// Calls `body` with an nghttp2 name/value array valid for the duration of the call.
    func withNVArray<R>(_ body: (UnsafePointer<nghttp2_nv>, Int) -> R) -> R {
        storage.withUnsafeBufferPointer { bytes in
            let base = UnsafeMutablePointer(mutating: bytes.baseAddress)
            return withUnsafeTemporaryAllocation(of: nghttp2_nv.self, capacity: max(parts.count, 1)) { nva in
                for (i, part) in parts.enumerated() {
                    switch part {
                    case .constant(let n, let v):
                        nva[i] = nghttp2_nv(
                            name: UnsafeMutablePointer(mutating: n.utf8Start), value: UnsafeMutablePointer(mutating: v.utf8Start),
                            namelen: n.utf8CodeUnitCount, valuelen: v.utf8CodeUnitCount,
                            flags: UInt8(NGHTTP2_NV_FLAG_NO_COPY_NAME.rawValue | NGHTTP2_NV_FLAG_NO_COPY_VALUE.rawValue))
                    case .owned(let ns, let nc, let vs, let vc):
                        // An empty value still needs a valid pointer.
                        let np = base.map { $0 + ns } ?? UnsafeMutablePointer(mutating: StaticString("").utf8Start)
                        let vp = base.map { $0 + vs } ?? UnsafeMutablePointer(mutating: StaticString("").utf8Start)
                        nva[i] = nghttp2_nv(name: np, value: vp, namelen: nc, valuelen: vc, flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue))
                    }
                }
                return body(UnsafePointer(nva.baseAddress!), parts.count)
            }
        }
    }
}
