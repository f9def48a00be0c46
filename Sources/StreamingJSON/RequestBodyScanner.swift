/// Progress of a ``RequestBodyScanner`` after a chunk.
public enum ScanProgress: Equatable, Sendable {
    /// More input is needed; the top-level `model` string is not known yet.
    case incomplete
    /// The top-level `model` string is complete (``RequestBodyScanner/modelValue``) but the
    /// document is not finished: the caller may route now and keep feeding to validate.
    case modelAvailable
    /// The top-level object has closed. From `feed` this is provisional (trailing bytes
    /// must still be whitespace); from `finish` it is final.
    case complete
    /// The body is not valid JSON, or violates a policy (duplicate model, model too long).
    case invalid(JSONError)
}

/// An incremental, validating JSON scanner for OpenAI-style request bodies.
///
/// It exists so the router can pick a target as soon as the top-level `model` value has
/// streamed through, without buffering or re-serializing the body: it validates the whole
/// document per RFC 8259 chunk by chunk (any chunk boundary, even 1-byte chunks) and
/// captures only a few top-level fields. Memory stays bounded whatever the body size.
///
/// Lone UTF-16 surrogates in `\u` escapes are accepted (RFC 8259 grammar allows them) and
/// decode to U+FFFD in captured strings.
public struct RequestBodyScanner: Sendable {
    /// What to capture besides `model` and `stream`.
    public struct Configuration: Sendable {
        /// A top-level string field used as the sticky-split key (e.g. `user`), or nil.
        public var affinityField: String?
        /// Top-level keys whose presence is reported by ``RequestBodyScanner/hasKey(_:)``
        /// (at most 64).
        public var presenceKeys: [String]
        /// Maximum decoded length of `model` in bytes; longer → invalid "model too long".
        public var maxModelBytes: Int
        /// Maximum decoded length of the affinity value; longer values are truncated.
        public var maxAffinityBytes: Int
        /// Maximum nesting depth.
        public var maxDepth: Int

        public init(affinityField: String? = nil,
                    presenceKeys: [String] = ["prompt", "messages", "input"],
                    maxModelBytes: Int = 1024,
                    maxAffinityBytes: Int = 4096,
                    maxDepth: Int = 256) {
            self.affinityField = affinityField
            self.presenceKeys = Array(presenceKeys.prefix(64))
            self.maxModelBytes = maxModelBytes
            self.maxAffinityBytes = maxAffinityBytes
            self.maxDepth = min(maxDepth, 256)
        }
    }

    // MARK: Captured results

    /// Decoded top-level `model` string, available once its closing quote was scanned.
    public private(set) var modelValue: String?
    /// Absolute byte range of the raw `model` value including its quotes (string values
    /// only), so a caller can splice a replacement and keep every other byte identical.
    public private(set) var modelRange: Range<Int>?
    /// JSON type of the top-level `model` value, if the key is present.
    public private(set) var modelType: JSONValueType?
    /// Top-level `stream`, if it is a boolean.
    public private(set) var stream: Bool?
    /// Decoded value of the configured affinity field, if it is a string (maybe truncated).
    public private(set) var affinityValue: String?
    /// Bytes consumed so far.
    public private(set) var bytesScanned: Int = 0

    private let affinityField: String?
    private let maxModelBytes: Int
    private let maxAffinityBytes: Int
    private let maxDepth: Int
    private let maxKeyBytes: Int
    /// Bit i set = `presenceKeys[i]` seen at top level.
    public private(set) var presentKeyMask: UInt64 = 0
    /// Absolute offset where the value of the first top-level presence key (the prompt, messages
    /// or input) begins: the bytes prefix-cache affinity hashes.
    public private(set) var contentValueStart: Int?
    private let presenceKeyNames: [String]

    public init(configuration: Configuration = Configuration()) {
        // Keys stay Strings (compared as UTF-8 views) so that building a scanner per
        // request allocates nothing.
        presenceKeyNames = configuration.presenceKeys
        affinityField = configuration.affinityField
        maxModelBytes = configuration.maxModelBytes
        maxAffinityBytes = configuration.maxAffinityBytes
        maxDepth = configuration.maxDepth
        var longest = 6 // "stream"
        for k in presenceKeyNames { longest = max(longest, k.utf8.count) }
        if let a = affinityField { longest = max(longest, a.utf8.count) }
        maxKeyBytes = longest
    }

    /// Whether the given configured presence key occurred at top level.
    public func hasKey(_ name: String) -> Bool {
        guard let i = presenceKeyNames.firstIndex(of: name) else { return false }
        return presentKeyMask & (1 << UInt64(i)) != 0
    }

    // MARK: State

    private enum State: UInt8 {
        case start, objKeyOrEnd, objKey, colon, value, arrValueOrEnd, afterValue
        case string, escape, unicode, utf8
        case numMinus, numZero, numInt, numFracStart, numFrac, numExpStart, numExpSign, numExp
        case literal, done, failed
    }

    private enum Role: UInt8 { case skip, key, model, affinity }
    private enum Member: UInt8 { case other, model, stream, affinity, content }

    private var state: State = .start
    private var depth = 0
    private var stack: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0) // bit = 1: object
    private var stringIsKey = false
    private var role: Role = .skip
    private var member: Member = .other
    private var sawModelKey = false
    private var keyOverflow = false
    private var capture: [UInt8] = []
    private var captureStart = 0
    private var hexCount = 0
    private var hexValue: UInt32 = 0
    private var pendingHigh: UInt32 = 0
    private var utf8Remaining = 0
    private var utf8Low: UInt8 = 0x80
    private var utf8High: UInt8 = 0xBF
    private var literalBytes: UInt64 = 0
    private var literalIndex = 0
    private var literalLength = 0
    private var error: JSONError?

    // MARK: Feeding

    /// Scans the next chunk of the body.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer) -> ScanProgress {
        if state != .failed, let base = bytes.baseAddress, bytes.count > 0 {
            scan(base.assumingMemoryBound(to: UInt8.self), bytes.count)
        }
        return progress
    }

    /// Scans the next chunk of the body.
    public mutating func feed<C: Collection>(_ bytes: C) -> ScanProgress where C.Element == UInt8 {
        if let r = bytes.withContiguousStorageIfAvailable({ buf in feed(UnsafeRawBufferPointer(buf)) }) {
            return r
        }
        let a = Array(bytes)
        return a.withUnsafeBytes { feed($0) }
    }

    /// Signals the end of the body and returns the final verdict.
    public mutating func finish() -> ScanProgress {
        if state == .failed || state == .done { return progress }
        fail(bytesScanned, "unexpected end of input")
        return progress
    }

    /// The current progress without feeding.
    public var progress: ScanProgress {
        switch state {
        case .failed: return .invalid(error ?? JSONError(offset: bytesScanned, message: "invalid"))
        case .done: return .complete
        default: return modelValue != nil ? .modelAvailable : .incomplete
        }
    }

    // MARK: Scanner core

    private mutating func fail(_ offset: Int, _ message: String) {
        error = JSONError(offset: offset, message: message)
        state = .failed
    }

    @inline(__always)
    private func topIsObject() -> Bool {
        let d = depth - 1
        let word: UInt64
        switch d >> 6 {
        case 0: word = stack.0
        case 1: word = stack.1
        case 2: word = stack.2
        default: word = stack.3
        }
        return (word >> UInt64(d & 63)) & 1 == 1
    }

    @inline(__always)
    private mutating func push(isObject: Bool, at offset: Int) -> Bool {
        if depth >= maxDepth { fail(offset, "nesting too deep"); return false }
        let d = depth
        let bit: UInt64 = 1 << UInt64(d & 63)
        switch d >> 6 {
        case 0: stack.0 = isObject ? (stack.0 | bit) : (stack.0 & ~bit)
        case 1: stack.1 = isObject ? (stack.1 | bit) : (stack.1 & ~bit)
        case 2: stack.2 = isObject ? (stack.2 | bit) : (stack.2 & ~bit)
        default: stack.3 = isObject ? (stack.3 | bit) : (stack.3 & ~bit)
        }
        depth = d + 1
        return true
    }

    @inline(__always)
    private mutating func pop() {
        depth -= 1
        state = depth == 0 ? .done : .afterValue
    }

    @inline(__always)
    private mutating func valueEnded() {
        state = .afterValue
    }

    private mutating func scan(_ p: UnsafePointer<UInt8>, _ n: Int) {
        let base = bytesScanned
        var i = 0
        defer { bytesScanned = base + i }
        while i < n {
            let b = p[i]
            switch state {
            case .string:
                if role == .skip {
                    // Fast path: skip plain string content, ASCII 8 bytes at a time, complete
                    // UTF-8 sequences validated inline. Anything else takes the state machine.
                    fast: while true {
                        while i &+ 8 <= n {
                            let v = UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self)
                            if ByteClass.hasStringSpecial(v) { break }
                            i &+= 8
                        }
                        while i < n {
                            let c = p[i]
                            if c >= 0x20 && c < 0x80 && c != 0x22 && c != 0x5C { i &+= 1; continue }
                            if c >= 0x80 {
                                let len = ByteClass.validUTF8Length(p, i, n)
                                if len > 0 { i &+= len; continue fast }
                            }
                            break fast
                        }
                        break
                    }
                    if i >= n { return }
                    stringByte(p[i], at: base + i)
                } else if pendingHigh == 0 {
                    // Captured string: append plain runs in bulk.
                    var j = i
                    while j < n {
                        let c = p[j]
                        if c >= 0x20 && c < 0x80 && c != 0x22 && c != 0x5C { j &+= 1; continue }
                        if c >= 0x80 {
                            let len = ByteClass.validUTF8Length(p, j, n)
                            if len > 0 { j &+= len; continue }
                        }
                        break
                    }
                    if j > i {
                        appendRun(p + i, j &- i, at: base + i)
                        if state == .failed { i = j; return }
                        i = j
                        continue
                    }
                    stringByte(b, at: base + i)
                } else {
                    stringByte(b, at: base + i)
                }
                i &+= 1
            case .afterValue:
                switch b {
                case 0x20, 0x0A, 0x0D, 0x09: break
                case UInt8(ascii: ","):
                    state = topIsObject() ? .objKey : .value
                case UInt8(ascii: "}"):
                    if topIsObject() { pop() } else { fail(base + i, "unexpected '}'"); return }
                case UInt8(ascii: "]"):
                    if !topIsObject() { pop() } else { fail(base + i, "unexpected ']'"); return }
                default:
                    fail(base + i, topIsObject() ? "expected ',' or '}'" : "expected ',' or ']'"); return
                }
                i &+= 1
            case .value, .arrValueOrEnd:
                if ByteClass.isWhitespace(b) { i &+= 1; continue }
                if b == UInt8(ascii: "]") && state == .arrValueOrEnd { pop(); i &+= 1; continue }
                if b &- 0x30 < 10 || b == UInt8(ascii: "-") {
                    // Fast path: a number that ends within this chunk (e.g. token-id arrays).
                    let end = ByteClass.numberEnd(p, i, n)
                    if end > 0 {
                        if depth == 1 && member == .model { modelType = .number }
                        i = end
                        if p[i] == UInt8(ascii: ",") && !topIsObject() {
                            state = .value
                            i &+= 1
                        } else {
                            state = .afterValue
                        }
                        continue
                    }
                }
                startValue(b, at: base + i)
                if state == .failed { return }
                i &+= 1
            case .objKeyOrEnd, .objKey:
                if ByteClass.isWhitespace(b) { i &+= 1; continue }
                if b == 0x22 {
                    startString(isKey: true, at: base + i)
                } else if b == UInt8(ascii: "}") && state == .objKeyOrEnd {
                    pop()
                } else {
                    fail(base + i, state == .objKey ? "expected key after ','" : "expected string key or '}'"); return
                }
                i &+= 1
            case .colon:
                if ByteClass.isWhitespace(b) { i &+= 1; continue }
                if b == UInt8(ascii: ":") { state = .value } else { fail(base + i, "expected ':'"); return }
                i &+= 1
            case .escape, .unicode, .utf8:
                stringByte(b, at: base + i)
                if state == .failed { return }
                i &+= 1
            case .numInt, .numFrac, .numExp:
                // Fast path through digit runs.
                var j = i
                while j < n && p[j] &- 0x30 < 10 { j &+= 1 }
                if j >= n { i = j; continue }
                i = j
                if numberByte(p[i], at: base + i) { i &+= 1 } else if state == .failed { return }
            case .numMinus, .numZero, .numFracStart, .numExpStart, .numExpSign:
                if numberByte(b, at: base + i) { i &+= 1 } else if state == .failed { return }
                // else: the number ended; re-process `b` in .afterValue
            case .literal:
                let expected = UInt8(truncatingIfNeeded: literalBytes >> UInt64(literalIndex &* 8))
                if b != expected { fail(base + i, "invalid literal"); return }
                literalIndex &+= 1
                if literalIndex == literalLength { literalEnded() }
                i &+= 1
            case .start:
                if ByteClass.isWhitespace(b) { i &+= 1; continue }
                if b == UInt8(ascii: "{") {
                    _ = push(isObject: true, at: base + i)
                    state = .objKeyOrEnd
                } else {
                    fail(base + i, "top-level value must be an object"); return
                }
                i &+= 1
            case .done:
                if ByteClass.isWhitespace(b) { i &+= 1; continue }
                fail(base + i, "unexpected data after the top-level object"); return
            case .failed:
                return
            }
        }
    }

    @inline(__always)
    private mutating func startValue(_ b: UInt8, at offset: Int) {
        let top = depth == 1
        let m: Member = top ? member : .other
        if m == .content && contentValueStart == nil { contentValueStart = offset }
        switch b {
        case 0x22:
            if m == .model { modelType = .string }
            startString(isKey: false, at: offset)
        case UInt8(ascii: "{"):
            if m == .model { modelType = .object }
            if push(isObject: true, at: offset) { state = .objKeyOrEnd }
        case UInt8(ascii: "["):
            if m == .model { modelType = .array }
            if push(isObject: false, at: offset) { state = .arrValueOrEnd }
        case UInt8(ascii: "-"):
            if m == .model { modelType = .number }
            state = .numMinus
        case UInt8(ascii: "0"):
            if m == .model { modelType = .number }
            state = .numZero
        case UInt8(ascii: "1")...UInt8(ascii: "9"):
            if m == .model { modelType = .number }
            state = .numInt
        case UInt8(ascii: "t"):
            if m == .model { modelType = .bool }
            startLiteral(0x6575_7274, 4)
        case UInt8(ascii: "f"):
            if m == .model { modelType = .bool }
            startLiteral(0x65_736C_6166, 5)
        case UInt8(ascii: "n"):
            if m == .model { modelType = .null }
            startLiteral(0x6C6C_756E, 4)
        default:
            fail(offset, b == UInt8(ascii: "]") || b == UInt8(ascii: "}") ? "trailing comma or missing value" : "unexpected character")
        }
    }

    @inline(__always)
    private mutating func startLiteral(_ bytes: UInt64, _ length: Int) {
        literalBytes = bytes
        literalLength = length
        literalIndex = 1
        state = .literal
    }

    private mutating func literalEnded() {
        if depth == 1 && member == .stream {
            stream = literalBytes == 0x6575_7274 ? true : (literalBytes == 0x65_736C_6166 ? false : nil)
        }
        valueEnded()
    }

    /// Returns true if `b` was consumed as part of the number.
    @inline(__always)
    private mutating func numberByte(_ b: UInt8, at offset: Int) -> Bool {
        let isDigit = b &- 0x30 < 10
        switch state {
        case .numMinus:
            if b == 0x30 { state = .numZero; return true }
            if isDigit { state = .numInt; return true }
            fail(offset, "invalid number"); return false
        case .numZero:
            if b == UInt8(ascii: ".") { state = .numFracStart; return true }
            if b == UInt8(ascii: "e") || b == UInt8(ascii: "E") { state = .numExpStart; return true }
            if isDigit { fail(offset, "leading zero in number"); return false }
        case .numInt:
            if isDigit { return true }
            if b == UInt8(ascii: ".") { state = .numFracStart; return true }
            if b == UInt8(ascii: "e") || b == UInt8(ascii: "E") { state = .numExpStart; return true }
        case .numFracStart:
            if isDigit { state = .numFrac; return true }
            fail(offset, "invalid number"); return false
        case .numFrac:
            if isDigit { return true }
            if b == UInt8(ascii: "e") || b == UInt8(ascii: "E") { state = .numExpStart; return true }
        case .numExpStart:
            if isDigit { state = .numExp; return true }
            if b == UInt8(ascii: "+") || b == UInt8(ascii: "-") { state = .numExpSign; return true }
            fail(offset, "invalid number"); return false
        case .numExpSign:
            if isDigit { state = .numExp; return true }
            fail(offset, "invalid number"); return false
        case .numExp:
            if isDigit { return true }
        default:
            break
        }
        // A terminal number state followed by a delimiter: the number ended.
        valueEnded()
        return false
    }

    @inline(__always)
    private mutating func startString(isKey: Bool, at offset: Int) {
        stringIsKey = isKey
        state = .string
        if depth == 1 {
            if isKey {
                role = .key
                member = .other
                keyOverflow = false
                capture.removeAll(keepingCapacity: true)
                captureStart = offset
            } else if member == .model {
                role = .model
                capture.removeAll(keepingCapacity: true)
                captureStart = offset
            } else if member == .affinity {
                role = .affinity
                capture.removeAll(keepingCapacity: true)
            } else {
                role = .skip
            }
        } else {
            role = .skip
        }
        pendingHigh = 0
    }

    private mutating func stringByte(_ b: UInt8, at offset: Int) {
        switch state {
        case .string:
            if b == 0x22 {
                endString(at: offset)
            } else if b == 0x5C {
                state = .escape
            } else if b < 0x20 {
                fail(offset, "control character in string")
            } else if b < 0x80 {
                if role != .skip { appendDecoded(b, at: offset) }
            } else {
                // UTF-8 lead byte.
                switch b {
                case 0xC2...0xDF: utf8Remaining = 1; utf8Low = 0x80; utf8High = 0xBF
                case 0xE0: utf8Remaining = 2; utf8Low = 0xA0; utf8High = 0xBF
                case 0xE1...0xEC, 0xEE, 0xEF: utf8Remaining = 2; utf8Low = 0x80; utf8High = 0xBF
                case 0xED: utf8Remaining = 2; utf8Low = 0x80; utf8High = 0x9F
                case 0xF0: utf8Remaining = 3; utf8Low = 0x90; utf8High = 0xBF
                case 0xF1...0xF3: utf8Remaining = 3; utf8Low = 0x80; utf8High = 0xBF
                case 0xF4: utf8Remaining = 3; utf8Low = 0x80; utf8High = 0x8F
                default: fail(offset, "invalid UTF-8"); return
                }
                if role != .skip { appendDecoded(b, at: offset) }
                state = .utf8
            }
        case .utf8:
            if b < utf8Low || b > utf8High { fail(offset, "invalid UTF-8"); return }
            if role != .skip { appendDecoded(b, at: offset) }
            utf8Remaining -= 1
            utf8Low = 0x80; utf8High = 0xBF
            if utf8Remaining == 0 { state = .string }
        case .escape:
            let decoded: UInt8
            switch b {
            case 0x22, 0x5C, 0x2F: decoded = b
            case UInt8(ascii: "b"): decoded = 0x08
            case UInt8(ascii: "f"): decoded = 0x0C
            case UInt8(ascii: "n"): decoded = 0x0A
            case UInt8(ascii: "r"): decoded = 0x0D
            case UInt8(ascii: "t"): decoded = 0x09
            case UInt8(ascii: "u"):
                state = .unicode; hexCount = 0; hexValue = 0
                return
            default:
                fail(offset, "invalid escape"); return
            }
            state = .string
            if role != .skip { appendDecoded(decoded, at: offset) }
        case .unicode:
            guard let h = ByteClass.hexValue(b) else { fail(offset, "invalid \\u escape"); return }
            hexValue = hexValue << 4 | h
            hexCount += 1
            if hexCount == 4 {
                state = .string
                if role != .skip { appendEscapedScalar(hexValue, at: offset) }
            }
        default:
            break
        }
    }

    @inline(__always)
    private mutating func appendDecoded(_ b: UInt8, at offset: Int) {
        if pendingHigh != 0 { pendingHigh = 0; appendScalarBytes(0xFFFD, at: offset) }
        appendRaw(b, at: offset)
    }

    private mutating func appendEscapedScalar(_ cp: UInt32, at offset: Int) {
        if pendingHigh != 0 {
            if cp >= 0xDC00 && cp <= 0xDFFF {
                let scalar = 0x10000 + ((pendingHigh - 0xD800) << 10) + (cp - 0xDC00)
                pendingHigh = 0
                appendScalarBytes(scalar, at: offset)
                return
            }
            pendingHigh = 0
            appendScalarBytes(0xFFFD, at: offset)
        }
        if cp >= 0xD800 && cp <= 0xDBFF {
            pendingHigh = cp
        } else if cp >= 0xDC00 && cp <= 0xDFFF {
            appendScalarBytes(0xFFFD, at: offset)
        } else {
            appendScalarBytes(cp, at: offset)
        }
    }

    private mutating func appendScalarBytes(_ cp: UInt32, at offset: Int) {
        if cp < 0x80 {
            appendRaw(UInt8(cp), at: offset)
        } else if cp < 0x800 {
            appendRaw(UInt8(0xC0 | (cp >> 6)), at: offset)
            appendRaw(UInt8(0x80 | (cp & 0x3F)), at: offset)
        } else if cp < 0x10000 {
            appendRaw(UInt8(0xE0 | (cp >> 12)), at: offset)
            appendRaw(UInt8(0x80 | ((cp >> 6) & 0x3F)), at: offset)
            appendRaw(UInt8(0x80 | (cp & 0x3F)), at: offset)
        } else {
            appendRaw(UInt8(0xF0 | (cp >> 18)), at: offset)
            appendRaw(UInt8(0x80 | ((cp >> 12) & 0x3F)), at: offset)
            appendRaw(UInt8(0x80 | ((cp >> 6) & 0x3F)), at: offset)
            appendRaw(UInt8(0x80 | (cp & 0x3F)), at: offset)
        }
    }

    /// Bulk version of `appendRaw` for plain content (no pending surrogate).
    private mutating func appendRun(_ q: UnsafePointer<UInt8>, _ len: Int, at offset: Int) {
        let limit: Int
        switch role {
        case .key: limit = maxKeyBytes
        case .model: limit = maxModelBytes
        case .affinity: limit = maxAffinityBytes
        case .skip: return
        }
        let take = min(max(0, limit &- capture.count), len)
        if take > 0 {
            if capture.capacity == 0 { capture.reserveCapacity(64) }
            capture.append(contentsOf: UnsafeBufferPointer(start: q, count: take))
        }
        if take < len {
            if role == .key { keyOverflow = true } else if role == .model { fail(offset &+ take, "model too long") }
        }
    }

    @inline(__always)
    private mutating func appendRaw(_ b: UInt8, at offset: Int) {
        switch role {
        case .key:
            if capture.count < maxKeyBytes { capture.append(b) } else { keyOverflow = true }
        case .model:
            if capture.count < maxModelBytes { capture.append(b) } else { fail(offset, "model too long") }
        case .affinity:
            if capture.count < maxAffinityBytes { capture.append(b) }
        case .skip:
            break
        }
    }

    private mutating func endString(at offset: Int) {
        if pendingHigh != 0 && role != .skip {
            pendingHigh = 0
            appendScalarBytes(0xFFFD, at: offset)
            if state == .failed { return }
        }
        if stringIsKey {
            state = .colon
            if role == .key { classifyKey(keyStart: captureStart) }
        } else {
            switch role {
            case .model:
                modelValue = String(decoding: capture, as: UTF8.self)
                modelRange = captureStart..<(offset + 1)
            case .affinity:
                if capture.count >= maxAffinityBytes { ByteClass.trimIncompleteUTF8(&capture) }
                affinityValue = String(decoding: capture, as: UTF8.self)
            default:
                break
            }
            valueEnded()
        }
        role = .skip
    }

    /// Byte equality of a captured key and a name, without generic UTF-8 view iteration.
    @inline(__always)
    private static func equal(_ k: [UInt8], _ name: String) -> Bool {
        let u = name.utf8
        guard k.count == u.count else { return false }
        let fast = u.withContiguousStorageIfAvailable { nb in
            k.withUnsafeBufferPointer { kb in
                for i in 0..<kb.count where kb[i] != nb[i] { return false }
                return true
            }
        }
        return fast ?? k.elementsEqual(u)
    }

    private mutating func classifyKey(keyStart: Int) {
        member = .other
        if keyOverflow { return }
        let k = capture
        if k.count == 5 && k[0] == 0x6D && k[1] == 0x6F && k[2] == 0x64 && k[3] == 0x65 && k[4] == 0x6C { // model
            if sawModelKey { fail(keyStart, "duplicate top-level key model"); return }
            sawModelKey = true
            member = .model
        } else if Self.equal(k, "stream") {
            member = .stream
        } else if let a = affinityField, Self.equal(k, a) {
            member = .affinity
        }
        for idx in presenceKeyNames.indices where Self.equal(k, presenceKeyNames[idx]) {
            presentKeyMask |= 1 << UInt64(idx)
            if member == .other && contentValueStart == nil { member = .content }
        }
    }
}
