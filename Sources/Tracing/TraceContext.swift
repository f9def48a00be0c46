import Foundation

/// A 128-bit W3C trace id.
public struct TraceID: Hashable, Sendable {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    public var isValid: Bool { high != 0 || low != 0 }

    /// 16 bytes, big-endian, as OTLP carries it.
    public var bytes: [UInt8] { bigEndianBytes(high) + bigEndianBytes(low) }
}

/// The W3C Trace Context of one span (`traceparent`: version-traceid-parentid-flags).
public struct TraceContext: Hashable, Sendable {
    public var traceID: TraceID
    public var spanID: UInt64
    public var sampled: Bool

    public init(traceID: TraceID, spanID: UInt64, sampled: Bool) {
        self.traceID = traceID
        self.spanID = spanID
        self.sampled = sampled
    }

    /// Parses a `traceparent` header value; nil when it is not a valid one (the W3C rules: two
    /// lower-case hex digits of version other than `ff`, non-zero ids, and for version 00 nothing
    /// after the flags; a later version may append `-` and more, which is ignored).
    public init?(traceparent value: some Collection<UInt8>) {
        let b = Array(value.prefix(56))
        guard b.count >= 55, b[2] == UInt8(ascii: "-"), b[35] == UInt8(ascii: "-"), b[52] == UInt8(ascii: "-"),
              let version = hexValue(b[0..<2]), version != 0xff,
              let high = hexValue(b[3..<19]), let low = hexValue(b[19..<35]),
              let span = hexValue(b[36..<52]), let flags = hexValue(b[53..<55]) else { return nil }
        if version == 0 {
            guard value.count == 55 else { return nil }
        } else if value.count > 55 {
            guard b.count > 55, b[55] == UInt8(ascii: "-") else { return nil }
        }
        let id = TraceID(high: high, low: low)
        guard id.isValid, span != 0 else { return nil }
        self.init(traceID: id, spanID: span, sampled: flags & 1 == 1)
    }

    /// The `traceparent` header value naming this span as the parent.
    public var traceparent: String {
        var out = [UInt8]()
        out.reserveCapacity(55)
        out.append(contentsOf: "00-".utf8)
        appendHex(traceID.high, to: &out)
        appendHex(traceID.low, to: &out)
        out.append(UInt8(ascii: "-"))
        appendHex(spanID, to: &out)
        out.append(contentsOf: (sampled ? "-01" : "-00").utf8)
        return String(decoding: out, as: UTF8.self)
    }
}

/// Lower-case hex only, as W3C requires.
private func hexValue(_ digits: ArraySlice<UInt8>) -> UInt64? {
    var v: UInt64 = 0
    for d in digits {
        let n: UInt8
        switch d {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): n = d - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): n = d - UInt8(ascii: "a") + 10
        default: return nil
        }
        v = v << 4 | UInt64(n)
    }
    return v
}

private func appendHex(_ v: UInt64, to out: inout [UInt8]) {
    let digits: StaticString = "0123456789abcdef"
    for shift in stride(from: 60, through: 0, by: -4) {
        out.append(digits.utf8Start[Int((v >> UInt64(shift)) & 0xf)])
    }
}

func bigEndianBytes(_ v: UInt64) -> [UInt8] {
    (0..<8).map { UInt8(truncatingIfNeeded: v >> UInt64(56 - 8 * $0)) }
}

/// Wall-clock time for span timestamps (read once per traced request; durations come from the
/// monotonic clock).
public enum WallClock {
    public static var unixNanoseconds: UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}
