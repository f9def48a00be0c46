/// A JSON syntax or policy error at an absolute byte offset of the body.
///
/// Messages are static strings so that reporting an error never allocates.
public struct JSONError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Absolute byte offset (from the start of the body) of the offending byte,
    /// or the body length for "unexpected end of input".
    public var offset: Int
    public var message: String

    public init(offset: Int, message: String) {
        self.offset = offset
        self.message = message
    }

    public var description: String { "\(message) at byte \(offset)" }
}

/// The JSON type of a value; used to report a `model` that is not a string.
public enum JSONValueType: String, Sendable, Equatable {
    case string, number, object, array, bool, null
}

/// Minimal JSON string encoding, used to splice a rewritten `model` value into a body.
public enum JSONStringEncoding {
    /// Returns `s` as a JSON string literal including the quotes. Only `"`, `\` and
    /// control characters are escaped; everything else is copied as UTF-8.
    public static func quoted(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(s.utf8.count + 2)
        out.append(0x22)
        // Model names rarely need escaping: copy them whole.
        if !s.utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }) {
            out.append(contentsOf: s.utf8)
            out.append(0x22)
            return out
        }
        @inline(__always) func hex(_ v: UInt8) -> UInt8 { v < 10 ? 0x30 + v : 0x57 + v }
        for b in s.utf8 {
            switch b {
            case 0x22: out.append(0x5C); out.append(0x22)
            case 0x5C: out.append(0x5C); out.append(0x5C)
            case 0x0A: out.append(0x5C); out.append(UInt8(ascii: "n"))
            case 0x0D: out.append(0x5C); out.append(UInt8(ascii: "r"))
            case 0x09: out.append(0x5C); out.append(UInt8(ascii: "t"))
            case 0x08: out.append(0x5C); out.append(UInt8(ascii: "b"))
            case 0x0C: out.append(0x5C); out.append(UInt8(ascii: "f"))
            case 0x00..<0x20:
                out.append(0x5C); out.append(UInt8(ascii: "u")); out.append(0x30); out.append(0x30)
                out.append(hex(b >> 4)); out.append(hex(b & 0xF))
            default: out.append(b)
            }
        }
        out.append(0x22)
        return out
    }
}

/// Shared helpers over raw bytes (no Foundation).
@usableFromInline
enum ByteClass {
    @inline(__always) @usableFromInline
    static func isWhitespace(_ b: UInt8) -> Bool {
        b == 0x20 || b == 0x0A || b == 0x0D || b == 0x09
    }

    @inline(__always) @usableFromInline
    static func hexValue(_ b: UInt8) -> UInt32? {
        switch b {
        case 0x30...0x39: return UInt32(b &- 0x30)
        case 0x41...0x46: return UInt32(b &- 0x41 &+ 10)
        case 0x61...0x66: return UInt32(b &- 0x61 &+ 10)
        default: return nil
        }
    }

    /// Appends the UTF-8 encoding of a scalar value (assumed valid, not a surrogate).
    @inline(__always)
    static func appendUTF8(_ cp: UInt32, to out: inout [UInt8]) {
        if cp < 0x80 {
            out.append(UInt8(cp))
        } else if cp < 0x800 {
            out.append(UInt8(0xC0 | (cp >> 6)))
            out.append(UInt8(0x80 | (cp & 0x3F)))
        } else if cp < 0x10000 {
            out.append(UInt8(0xE0 | (cp >> 12)))
            out.append(UInt8(0x80 | ((cp >> 6) & 0x3F)))
            out.append(UInt8(0x80 | (cp & 0x3F)))
        } else {
            out.append(UInt8(0xF0 | (cp >> 18)))
            out.append(UInt8(0x80 | ((cp >> 12) & 0x3F)))
            out.append(UInt8(0x80 | ((cp >> 6) & 0x3F)))
            out.append(UInt8(0x80 | (cp & 0x3F)))
        }
    }

    /// Drops a trailing incomplete UTF-8 sequence (after truncation at a byte cap).
    static func trimIncompleteUTF8(_ bytes: inout [UInt8]) {
        var i = bytes.count - 1
        var seen = 0
        while i >= 0 && seen < 4 {
            let b = bytes[i]
            seen += 1
            if b & 0xC0 == 0x80 { i -= 1; continue }   // continuation
            let need: Int
            if b < 0x80 { need = 1 } else if b >= 0xF0 { need = 4 } else if b >= 0xE0 { need = 3 } else { need = 2 }
            if need > seen { bytes.removeSubrange(i...) }
            return
        }
    }

    /// Length of the valid, complete UTF-8 sequence starting at `p[i]` (a byte ≥ 0x80),
    /// or 0 if it is invalid or does not fit before `n`.
    @inline(__always) @usableFromInline
    static func validUTF8Length(_ p: UnsafePointer<UInt8>, _ i: Int, _ n: Int) -> Int {
        let c = p[i]
        if c < 0xC2 { return 0 }
        if c < 0xE0 {
            return i &+ 1 < n && p[i &+ 1] & 0xC0 == 0x80 ? 2 : 0
        }
        if c < 0xF0 {
            guard i &+ 2 < n else { return 0 }
            let c1 = p[i &+ 1]
            let lo: UInt8 = c == 0xE0 ? 0xA0 : 0x80
            let hi: UInt8 = c == 0xED ? 0x9F : 0xBF
            return c1 >= lo && c1 <= hi && p[i &+ 2] & 0xC0 == 0x80 ? 3 : 0
        }
        if c < 0xF5 {
            guard i &+ 3 < n else { return 0 }
            let c1 = p[i &+ 1]
            let lo: UInt8 = c == 0xF0 ? 0x90 : 0x80
            let hi: UInt8 = c == 0xF4 ? 0x8F : 0xBF
            return c1 >= lo && c1 <= hi && p[i &+ 2] & 0xC0 == 0x80 && p[i &+ 3] & 0xC0 == 0x80 ? 4 : 0
        }
        return 0
    }

    /// End index (the delimiter) of a valid JSON number starting at `p[i]` that is terminated
    /// before `n`, or 0 if invalid or not known to be complete (the caller falls back).
    @inline(__always) @usableFromInline
    static func numberEnd(_ p: UnsafePointer<UInt8>, _ i: Int, _ n: Int) -> Int {
        var j = i
        if p[j] == UInt8(ascii: "-") { j &+= 1; if j >= n { return 0 } }
        let first = p[j]
        if first == UInt8(ascii: "0") {
            j &+= 1
        } else if first &- 0x31 < 9 {
            j &+= 1
            while j < n && p[j] &- 0x30 < 10 { j &+= 1 }
        } else {
            return 0
        }
        if j >= n { return 0 }
        if p[j] == UInt8(ascii: ".") {
            j &+= 1
            if j >= n || p[j] &- 0x30 >= 10 { return 0 }
            while j < n && p[j] &- 0x30 < 10 { j &+= 1 }
            if j >= n { return 0 }
        }
        if p[j] | 0x20 == UInt8(ascii: "e") {
            j &+= 1
            if j < n && (p[j] == UInt8(ascii: "+") || p[j] == UInt8(ascii: "-")) { j &+= 1 }
            if j >= n || p[j] &- 0x30 >= 10 { return 0 }
            while j < n && p[j] &- 0x30 < 10 { j &+= 1 }
            if j >= n { return 0 }
        }
        if p[j] &- 0x30 < 10 { return 0 } // leading zero: let the state machine report it
        return j
    }

    /// Word with every byte set to `b` (SWAR helpers).
    @inline(__always) @usableFromInline
    static func splat(_ b: UInt8) -> UInt64 { 0x0101_0101_0101_0101 &* UInt64(b) }

    /// True if any byte of `v` is `"`, `\`, a control character, or non-ASCII:
    /// the bytes a string fast path must stop at.
    @inline(__always) @usableFromInline
    static func hasStringSpecial(_ v: UInt64) -> Bool {
        let lo: UInt64 = 0x0101_0101_0101_0101
        let hi: UInt64 = 0x8080_8080_8080_8080
        let q = v ^ 0x2222_2222_2222_2222
        let bs = v ^ 0x5C5C_5C5C_5C5C_5C5C
        let ctl = (v &- 0x2020_2020_2020_2020) & ~v
        let zq = (q &- lo) & ~q
        let zb = (bs &- lo) & ~bs
        return ((ctl | zq | zb | v) & hi) != 0
    }
}

/// Decodes the content of a JSON string literal (without its quotes), leniently:
/// invalid escapes are kept verbatim, lone surrogates become U+FFFD.
enum JSONStringDecoding {
    static func decode<C: Collection>(_ raw: C) -> String where C.Element == UInt8, C.Index == Int {
        if !raw.contains(0x5C) { return String(decoding: raw, as: UTF8.self) }
        var out: [UInt8] = []
        out.reserveCapacity(raw.count)
        var i = raw.startIndex
        var pendingHigh: UInt32 = 0
        func flush(_ out: inout [UInt8]) {
            if pendingHigh != 0 { ByteClass.appendUTF8(0xFFFD, to: &out); pendingHigh = 0 }
        }
        while i < raw.endIndex {
            let b = raw[i]
            if b != 0x5C || i + 1 >= raw.endIndex {
                flush(&out); out.append(b); i += 1; continue
            }
            let e = raw[i + 1]
            var simple: UInt8? = nil
            switch e {
            case 0x22, 0x5C, 0x2F: simple = e
            case UInt8(ascii: "b"): simple = 0x08
            case UInt8(ascii: "f"): simple = 0x0C
            case UInt8(ascii: "n"): simple = 0x0A
            case UInt8(ascii: "r"): simple = 0x0D
            case UInt8(ascii: "t"): simple = 0x09
            case UInt8(ascii: "u"):
                var cp: UInt32 = 0
                var ok = i + 6 <= raw.endIndex
                if ok {
                    for k in 0..<4 {
                        guard let h = ByteClass.hexValue(raw[i + 2 + k]) else { ok = false; break }
                        cp = cp << 4 | h
                    }
                }
                if !ok { flush(&out); out.append(b); i += 1; continue }
                i += 6
                if pendingHigh != 0 {
                    if cp >= 0xDC00 && cp <= 0xDFFF {
                        ByteClass.appendUTF8(0x10000 + ((pendingHigh - 0xD800) << 10) + (cp - 0xDC00), to: &out)
                        pendingHigh = 0
                        continue
                    }
                    flush(&out)
                }
                if cp >= 0xD800 && cp <= 0xDBFF { pendingHigh = cp }
                else if cp >= 0xDC00 && cp <= 0xDFFF { ByteClass.appendUTF8(0xFFFD, to: &out) }
                else { ByteClass.appendUTF8(cp, to: &out) }
                continue
            default: break
            }
            flush(&out)
            if let s = simple { out.append(s); i += 2 } else { out.append(b); i += 1 }
        }
        flush(&out)
        return String(decoding: out, as: UTF8.self)
    }
}
