/// Token usage reported by a backend (`usage` object); last seen values win.
public struct TokenUsage: Equatable, Sendable {
    public var promptTokens: Int?
    public var completionTokens: Int?
    public var totalTokens: Int?
    /// `usage.prompt_tokens_details.cached_tokens`.
    public var cachedTokens: Int?

    public init(promptTokens: Int? = nil, completionTokens: Int? = nil, totalTokens: Int? = nil, cachedTokens: Int? = nil) {
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.totalTokens = totalTokens
        self.cachedTokens = cachedTokens
    }
}

/// A piece of rewriter output: either a range of the chunk just processed (no copy)
/// or replacement/held bytes.
public enum OutputSegment: Equatable, Sendable {
    case input(Range<Int>)
    case bytes([UInt8])
}

/// Streaming response transformer that restores the client's model alias.
///
/// Why: backends answer with the rewritten (internal) model name; clients must see the name
/// they asked for, whatever the chunking (the reference's per-chunk byte replace misses names
/// split across chunks). Works on a JSON body or on SSE (`data:` events, `\n` / `\r\n`,
/// comments, `[DONE]`), replacing only the value of the top-level `"model"` key of each JSON
/// document. Output is prompt: only the bytes of a top-level model string value are ever held
/// across chunks. Anything unexpected falls back to pass-through; bytes are never dropped.
public struct ResponseModelRewriter: Sendable {
    /// Body framing.
    public enum Mode: Sendable, Equatable {
        case json
        case sse
        /// Emit everything unchanged, observe nothing.
        case passthrough
    }

    /// The framing for a `content-type` header value (nil/unknown → pass-through).
    public static func mode(forContentType contentType: String?) -> Mode {
        guard let ct = contentType?.lowercased() else { return .passthrough }
        if ct.contains("text/event-stream") { return .sse }
        if ct.contains("json") { return .json }
        return .passthrough
    }

    /// Last original (backend) top-level model value seen.
    /// Decoded on demand: the picker itself never needs it on the request path.
    public var observedModel: String? {
        lastModelRaw.count >= 2 ? JSONStringDecoding.decode(lastModelRaw[1..<(lastModelRaw.count - 1)]) : nil
    }
    /// Number of model values replaced.
    public private(set) var replacements = 0
    /// Token usage, last seen values win.
    public private(set) var usage = TokenUsage()
    public let mode: Mode

    private let replacement: [UInt8]?
    private let maxHeldBytes: Int

    public init(mode: Mode, replacement: String?, maxHeldBytes: Int = 4096) {
        self.init(mode: mode, quotedReplacement: replacement.map { JSONStringEncoding.quoted($0) }, maxHeldBytes: maxHeldBytes)
    }

    /// `quotedReplacement` is the replacement already encoded as a JSON string literal, quotes included.
    public init(mode: Mode, quotedReplacement: [UInt8]?, maxHeldBytes: Int = 4096) {
        self.mode = mode
        self.replacement = quotedReplacement
        self.maxHeldBytes = maxHeldBytes
        self.passthrough = mode == .passthrough
        if mode != .passthrough {
            // Keys and the model value are captured here: one allocation each instead of regrowth.
            raw.reserveCapacity(128)
            lastModelRaw.reserveCapacity(128)
        }
    }

    // MARK: State

    private enum Line: UInt8 { case lineStart, field, afterColon, data, skip, afterCR }
    private enum Doc: UInt8 { case start, inDoc, ignore }
    private enum Lex: UInt8 { case normal, string, stringEscape, number }
    private enum Cap: UInt8 { case none, key, model }

    private var passthrough: Bool
    private var line: Line = .lineStart
    private var fieldIndex = 0
    private var doc: Doc = .start
    private var lex: Lex = .normal
    private var depth = 0
    private var objectBits: UInt64 = 0
    private var expectKey = false
    private var isKey = false
    private var m1: UInt8 = 0, m2: UInt8 = 0, m3: UInt8 = 0
    private var cap: Cap = .none
    private var capOverflow = false
    private var raw: [UInt8] = []
    private var lastModelRaw: [UInt8] = []
    private var holding = false
    private var numTarget: UInt8 = 0
    private var numValue = 0
    private var numValid = false
    private var numDigits = 0

    // MARK: Processing

    /// Processes one chunk, appending output segments (ranges refer to `chunk`).
    public mutating func process(_ chunk: UnsafeRawBufferPointer, into out: inout [OutputSegment]) {
        let n = chunk.count
        guard n > 0, let base = chunk.baseAddress else { return }
        if passthrough && !holding { out.append(.input(0..<n)); return }
        let p = base.assumingMemoryBound(to: UInt8.self)
        var segStart = holding ? -1 : 0
        var i = 0
        while i < n {
            let b = p[i]
            if mode == .sse {
                switch line {
                case .data:
                    if b == 0x0A || b == 0x0D {
                        dataLineEnded(&segStart, i, &out)
                        line = b == 0x0D ? .afterCR : .lineStart
                    } else {
                        if lex == .string {
                            let j = stringRun(p, i, n, stopAtNewline: true, &segStart, &out)
                            if j > i { i = j; continue }
                        } else if lex == .normal {
                            let j = skipRun(p, i, n, stopAtNewline: true)
                            if j > i { i = j; continue }
                        }
                        jsonByte(b, i, &segStart, &out)
                    }
                case .afterCR:
                    if b == 0x0A { line = .lineStart; i &+= 1; continue }
                    line = .lineStart
                    continue // re-process as line start
                case .lineStart:
                    switch b {
                    case 0x0A: eventEnded(&segStart, i, &out)
                    case 0x0D: eventEnded(&segStart, i, &out); line = .afterCR
                    case UInt8(ascii: "d"): line = .field; fieldIndex = 1
                    default: line = .skip
                    }
                case .field:
                    if b == 0x0A || b == 0x0D {
                        line = b == 0x0D ? .afterCR : .lineStart
                    } else if fieldIndex < 4 && b == Self.dataField(fieldIndex) {
                        fieldIndex += 1
                    } else if fieldIndex == 4 && b == UInt8(ascii: ":") {
                        line = .afterColon
                    } else {
                        line = .skip
                    }
                case .afterColon:
                    line = .data
                    if b == 0x20 { i &+= 1; continue }
                    continue // re-process as data
                case .skip:
                    if b == 0x0A { line = .lineStart } else if b == 0x0D { line = .afterCR }
                }
            } else {
                if lex == .string {
                    let j = stringRun(p, i, n, stopAtNewline: false, &segStart, &out)
                    if j > i { i = j; continue }
                    if passthrough && !holding { break }
                } else if lex == .normal {
                    let j = skipRun(p, i, n, stopAtNewline: false)
                    if j > i { i = j; continue }
                }
                jsonByte(b, i, &segStart, &out)
                if passthrough && !holding { break } // gave up: the rest goes out unchanged
            }
            i &+= 1
        }
        // While holding, this chunk's model bytes are already in `raw`.
        if !holding && segStart >= 0 && segStart < n {
            out.append(.input(segStart..<n))
        }
    }

    /// Processes one chunk given as bytes.
    public mutating func process(_ chunk: [UInt8], into out: inout [OutputSegment]) {
        chunk.withUnsafeBytes { process($0, into: &out) }
    }

    /// Flushes anything held at end of stream.
    public mutating func finish(into out: inout [OutputSegment]) {
        if holding {
            out.append(.bytes(raw))
            holding = false
            raw.removeAll()
        }
        cap = .none
    }

    /// Fast path between tokens: skips bytes that cannot change the tracked state
    /// (whitespace, literals, and numbers outside `usage`). Returns the end of the run.
    @inline(__always)
    private func skipRun(_ p: UnsafePointer<UInt8>, _ i: Int, _ n: Int, stopAtNewline: Bool) -> Int {
        var j = i
        switch doc {
        case .inDoc:
            let numbersMatter = m1 == 2 && depth >= 2
            while j < n {
                let c = p[j]
                switch c {
                case 0x22, 0x7B, 0x7D, 0x5B, 0x5D, 0x3A, 0x2C: return j  // " { } [ ] : ,
                case 0x0A, 0x0D: if stopAtNewline { return j }
                case 0x30...0x39, 0x2D: if numbersMatter { return j }
                default: break
                }
                j &+= 1
            }
        case .ignore:
            if stopAtNewline {
                while j < n && p[j] != 0x0A && p[j] != 0x0D { j &+= 1 }
            } else {
                j = n
            }
        case .start:
            break
        }
        return j
    }

    /// Fast path through plain string content starting at `i` (no quote, backslash or line
    /// break): captures it in bulk when needed. Returns the end of the run (`i` if none, or if
    /// the held value grew too long and the document was abandoned at `i`).
    @inline(__always)
    private mutating func stringRun(_ p: UnsafePointer<UInt8>, _ i: Int, _ n: Int, stopAtNewline: Bool,
                                    _ segStart: inout Int, _ out: inout [OutputSegment]) -> Int {
        var j = i
        if stopAtNewline {
            while j < n {
                let c = p[j]
                if c == 0x22 || c == 0x5C || c == 0x0A || c == 0x0D { break }
                j &+= 1
            }
        } else {
            while j < n {
                let c = p[j]
                if c == 0x22 || c == 0x5C { break }
                j &+= 1
            }
        }
        if j == i || cap == .none { return j }
        let len = j - i
        switch cap {
        case .key:
            if raw.count + len <= 64 { raw.append(contentsOf: UnsafeBufferPointer(start: p + i, count: len)) } else { capOverflow = true }
        case .model:
            if raw.count + len > maxHeldBytes {
                abandonHold(&segStart, i, &out)
                ignoreDoc()
                return i
            }
            raw.append(contentsOf: UnsafeBufferPointer(start: p + i, count: len))
        case .none:
            break
        }
        return j
    }

    // MARK: SSE helpers

    @inline(__always)
    private static func dataField(_ i: Int) -> UInt8 {
        UInt8(truncatingIfNeeded: UInt32(0x6174_6164) >> UInt32(i * 8)) // "data"
    }

    private mutating func dataLineEnded(_ segStart: inout Int, _ i: Int, _ out: inout [OutputSegment]) {
        // A JSON string cannot contain a raw newline: a document broken here is ignored.
        if lex == .string || lex == .stringEscape {
            abandonHold(&segStart, i, &out)
            ignoreDoc()
        } else if lex == .number {
            endNumber()
        }
    }

    private mutating func eventEnded(_ segStart: inout Int, _ i: Int, _ out: inout [OutputSegment]) {
        abandonHold(&segStart, i, &out)
        resetDoc()
    }

    private mutating func resetDoc() {
        doc = .start
        lex = .normal
        depth = 0
        objectBits = 0
        expectKey = false
        m1 = 0; m2 = 0; m3 = 0
        cap = .none
        numTarget = 0
    }

    private mutating func ignoreDoc() {
        if mode == .json { passthrough = true }
        resetDoc()
        doc = .ignore
    }

    /// Emits held bytes unchanged and resumes normal output at index `i`.
    private mutating func abandonHold(_ segStart: inout Int, _ i: Int, _ out: inout [OutputSegment]) {
        if holding {
            out.append(.bytes(raw))
            raw.removeAll(keepingCapacity: true)
            holding = false
            segStart = i
        }
        if cap == .model { cap = .none }
    }

    // MARK: JSON tracking

    @inline(__always)
    private var topIsObject: Bool { depth > 0 && depth <= 64 && (objectBits >> UInt64(depth - 1)) & 1 == 1 }

    private mutating func jsonByte(_ b: UInt8, _ i: Int, _ segStart: inout Int, _ out: inout [OutputSegment]) {
        switch doc {
        case .ignore:
            return
        case .start:
            if ByteClass.isWhitespace(b) { return }
            if b == UInt8(ascii: "{") {
                doc = .inDoc
                depth = 1
                objectBits = 1
                expectKey = true
                m1 = 0
            } else {
                ignoreDoc()
            }
            return
        case .inDoc:
            break
        }
        switch lex {
        case .string, .stringEscape:
            if cap != .none {
                if cap == .model && raw.count >= maxHeldBytes {
                    abandonHold(&segStart, i, &out)
                    ignoreDoc()
                    return
                }
                if raw.count < 64 || cap == .model { raw.append(b) } else { capOverflow = true }
            }
            if lex == .stringEscape { lex = .string; return }
            if b == 0x5C { lex = .stringEscape; return }
            if b == 0x22 { stringEnded(i, &segStart, &out) }
            return
        case .number:
            if b &- 0x30 < 10 {
                if numValid {
                    if numValue > (Int.max - 9) / 10 { numValid = false } else { numValue = numValue * 10 + Int(b &- 0x30); numDigits += 1 }
                }
                return
            }
            if b == UInt8(ascii: ".") || b == UInt8(ascii: "e") || b == UInt8(ascii: "E") || b == UInt8(ascii: "+") || b == UInt8(ascii: "-") {
                numValid = false
                return
            }
            endNumber()
        case .normal:
            break
        }
        switch b {
        case UInt8(ascii: "{"):
            if depth >= 64 { ignoreDoc(); return }
            depth += 1
            objectBits |= 1 << UInt64(depth - 1)
            expectKey = true
            if depth == 2 { m2 = 0 } else if depth == 3 { m3 = 0 }
        case UInt8(ascii: "["):
            if depth >= 64 { ignoreDoc(); return }
            depth += 1
            objectBits &= ~(1 << UInt64(depth - 1))
            expectKey = false
        case UInt8(ascii: "}"), UInt8(ascii: "]"):
            depth -= 1
            expectKey = false
            if depth == 0 { resetDoc() }
        case UInt8(ascii: ":"):
            expectKey = false
        case UInt8(ascii: ","):
            expectKey = topIsObject
        case 0x22:
            isKey = topIsObject && expectKey
            lex = .string
            cap = .none
            if isKey {
                if depth == 1 || (depth == 2 && m1 == 2) || (depth == 3 && m1 == 2 && m2 == 4) {
                    cap = .key
                    capOverflow = false
                    raw.removeAll(keepingCapacity: true)
                }
            } else if depth == 1 && m1 == 1 {
                cap = .model
                raw.removeAll(keepingCapacity: true)
                raw.append(b)
                if replacement != nil {
                    if segStart >= 0 && segStart < i { out.append(.input(segStart..<i)) }
                    segStart = -1
                    holding = true
                }
            }
        case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"):
            numTarget = 0
            if topIsObject {
                if depth == 2 && m1 == 2 && m2 >= 1 && m2 <= 3 { numTarget = m2 }
                else if depth == 3 && m1 == 2 && m2 == 4 && m3 == 1 { numTarget = 4 }
            }
            if numTarget == 0 { return } // only usage numbers are tracked
            lex = .number
            numValid = b != UInt8(ascii: "-")
            numValue = numValid ? Int(b &- 0x30) : 0
            numDigits = numValid ? 1 : 0
        default:
            break
        }
    }

    private mutating func endNumber() {
        lex = .normal
        if numTarget != 0 && numValid && numDigits > 0 {
            switch numTarget {
            case 1: usage.promptTokens = numValue
            case 2: usage.completionTokens = numValue
            case 3: usage.totalTokens = numValue
            default: usage.cachedTokens = numValue
            }
        }
        numTarget = 0
    }

    private mutating func stringEnded(_ i: Int, _ segStart: inout Int, _ out: inout [OutputSegment]) {
        lex = .normal
        let c = cap
        cap = .none
        switch c {
        case .none:
            return
        case .key:
            raw.removeLast() // closing quote
            let id: UInt8 = capOverflow ? 0 : keyID(depth)
            switch depth {
            case 1: m1 = id; m2 = 0; m3 = 0
            case 2: m2 = id; m3 = 0
            default: m3 = id
            }
        case .model:
            swap(&raw, &lastModelRaw)  // keep the value's bytes; reuse the other buffer for the next capture
            if holding, let r = replacement {
                out.append(.bytes(r))
                replacements += 1
                holding = false
                segStart = i + 1
            }
            raw.removeAll(keepingCapacity: true)
        }
    }

    private func keyID(_ depth: Int) -> UInt8 {
        if raw.contains(0x5C) { return Self.keyID(Array(JSONStringDecoding.decode(raw).utf8), depth) }
        return Self.keyID(raw, depth)
    }

    private static func keyID(_ k: [UInt8], _ depth: Int) -> UInt8 {
        switch depth {
        case 1:
            if equal(k, "model") { return 1 }
            if equal(k, "usage") { return 2 }
        case 2:
            if equal(k, "prompt_tokens") { return 1 }
            if equal(k, "completion_tokens") { return 2 }
            if equal(k, "total_tokens") { return 3 }
            if equal(k, "prompt_tokens_details") { return 4 }
        default:
            if equal(k, "cached_tokens") { return 1 }
        }
        return 0
    }

    @inline(__always)
    private static func equal(_ k: [UInt8], _ s: StaticString) -> Bool {
        let n = s.utf8CodeUnitCount
        guard k.count == n else { return false }
        let q = s.utf8Start
        for i in 0..<n where k[i] != q[i] { return false }
        return true
    }
}
