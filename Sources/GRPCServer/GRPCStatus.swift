/// A gRPC status: a code and an optional human-readable message (sent percent-encoded in
/// `grpc-message`).
public struct GRPCStatus: Error, Sendable, Equatable, CustomStringConvertible {
    public struct Code: RawRepresentable, Hashable, Sendable {
        public var rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        public static let ok = Code(rawValue: 0)
        public static let cancelled = Code(rawValue: 1)
        public static let unknown = Code(rawValue: 2)
        public static let invalidArgument = Code(rawValue: 3)
        public static let deadlineExceeded = Code(rawValue: 4)
        public static let notFound = Code(rawValue: 5)
        public static let alreadyExists = Code(rawValue: 6)
        public static let permissionDenied = Code(rawValue: 7)
        public static let resourceExhausted = Code(rawValue: 8)
        public static let failedPrecondition = Code(rawValue: 9)
        public static let aborted = Code(rawValue: 10)
        public static let outOfRange = Code(rawValue: 11)
        public static let unimplemented = Code(rawValue: 12)
        public static let `internal` = Code(rawValue: 13)
        public static let unavailable = Code(rawValue: 14)
        public static let dataLoss = Code(rawValue: 15)
        public static let unauthenticated = Code(rawValue: 16)
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String = "") {
        self.code = code
        self.message = message
    }

    public static let ok = GRPCStatus(.ok)

    public var description: String { "\(code.rawValue) \(message)" }

    /// `grpc-message` encoding (gRPC over HTTP/2 spec): printable ASCII except `%` as is,
    /// everything else as `%XX` of its UTF-8 bytes.
    static func percentEncode(_ message: String) -> String {
        var out = [UInt8]()
        out.reserveCapacity(message.utf8.count)
        let hex: [UInt8] = Array("0123456789ABCDEF".utf8)
        for b in message.utf8 {
            if b >= 0x20 && b <= 0x7E && b != UInt8(ascii: "%") {
                out.append(b)
            } else {
                out.append(UInt8(ascii: "%"))
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 0xF)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// Parses a `grpc-timeout` value ("100m", "5S", …: at most 8 digits and a unit) into nanoseconds.
func parseGRPCTimeout(_ value: UnsafeRawBufferPointer) -> Int64? {
    guard value.count >= 2, value.count <= 9 else { return nil }
    var amount: Int64 = 0
    for b in value.dropLast() {
        guard b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9") else { return nil }
        amount = amount * 10 + Int64(b - UInt8(ascii: "0"))
    }
    let perUnit: Int64
    switch value[value.count - 1] {
    case UInt8(ascii: "H"): perUnit = 3_600_000_000_000
    case UInt8(ascii: "M"): perUnit = 60_000_000_000
    case UInt8(ascii: "S"): perUnit = 1_000_000_000
    case UInt8(ascii: "m"): perUnit = 1_000_000
    case UInt8(ascii: "u"): perUnit = 1_000
    case UInt8(ascii: "n"): perUnit = 1
    default: return nil
    }
    let (product, overflow) = amount.multipliedReportingOverflow(by: perUnit)
    return overflow ? Int64.max : product
}
