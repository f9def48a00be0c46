import XCTest
@testable import StreamingJSON

struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Everything a scan produced, for comparing chunkings.
struct ScanResult: Equatable {
    var final: ScanProgress
    var model: String?
    var range: Range<Int>?
    var type: JSONValueType?
    var stream: Bool?
    var affinity: String?
    var keys: UInt64
    var firstModelAvailableAt: Int?
}

func scan(_ bytes: [UInt8], chunks: [Int]? = nil, config: RequestBodyScanner.Configuration = .init(affinityField: "user")) -> ScanResult {
    var s = RequestBodyScanner(configuration: config)
    var pos = 0
    var early: Int?
    var sizes = chunks ?? [bytes.count]
    if sizes.isEmpty { sizes = [bytes.count] }
    var k = 0
    while pos < bytes.count {
        let n = min(sizes[k % sizes.count], bytes.count - pos)
        k += 1
        let p = bytes[pos..<(pos + n)].withUnsafeBytes { s.feed($0) }
        pos += n
        if early == nil, p == .modelAvailable || (p == .complete && s.modelValue != nil) { early = pos }
        if case .invalid = p { break }
    }
    let f = s.finish()
    return ScanResult(final: f, model: s.modelValue, range: s.modelRange, type: s.modelType, stream: s.stream,
                      affinity: s.affinityValue, keys: s.presentKeyMask, firstModelAvailableAt: nil)
}

func randomChunks(_ total: Int, _ rng: inout SplitMix64) -> [Int] {
    var out: [Int] = []
    var left = total
    while left > 0 {
        let n = Int.random(in: 1...max(1, min(left, 17)), using: &rng)
        out.append(n)
        left -= n
    }
    return out
}

final class RequestBodyScannerTests: XCTestCase {
    let bodies: [String] = [
        #"{"model":"llama","messages":[{"role":"user","content":"hi \"there\" \\ \/ \u00e9 \ud83d\ude00"}],"stream":true,"user":"alice"}"#,
        #"{ "mod\u0065l" : "m\u00fcnchen-\u4e2d" , "prompt": "x", "stream": false, "n": -1.5e+10, "a": [1, 0, 0.5, -0, 2E3, true, false, null, {}, []] }"#,
        #"{"input":["a","b"],"nested":{"model":"inner","deep":[{"model":"deeper"}]},"model":"outer"}"#,
        "{\"model\":\"é漢字😀\",\"user\":\"b\u{00F6}b\"}\r\n\t ",
        #"{"model":123,"stream":"yes","user":7}"#,
        #"{"model":null}"#,
        #"{"model":{"x":"y"}}"#,
        #"{}"#,
        #"{"a":"\ud800x","model":"lone\udc00\ud800"}"#,
    ]

    func testOneByteAndRandomChunkingsAgree() {
        var rng = SplitMix64(seed: 42)
        for body in bodies {
            let bytes = Array(body.utf8)
            let whole = scan(bytes)
            XCTAssertEqual(scan(bytes, chunks: [1]), whole, body)
            for _ in 0..<50 {
                XCTAssertEqual(scan(bytes, chunks: randomChunks(bytes.count, &rng)), whole, body)
            }
        }
    }

    func testCapturesFields() {
        var r = scan(Array(bodies[0].utf8))
        XCTAssertEqual(r.final, .complete)
        XCTAssertEqual(r.model, "llama")
        XCTAssertEqual(r.stream, true)
        XCTAssertEqual(r.affinity, "alice")
        XCTAssertEqual(r.type, .string)

        r = scan(Array(bodies[1].utf8))
        XCTAssertEqual(r.final, .complete)
        XCTAssertEqual(r.model, "münchen-中")
        XCTAssertEqual(r.stream, false)

        r = scan(Array(bodies[2].utf8))
        XCTAssertEqual(r.model, "outer")

        r = scan(Array(bodies[3].utf8))
        XCTAssertEqual(r.final, .complete)
        XCTAssertEqual(r.model, "é漢字😀")
        XCTAssertEqual(r.affinity, "böb")

        r = scan(Array(bodies[4].utf8))
        XCTAssertEqual(r.final, .complete)
        XCTAssertNil(r.model)
        XCTAssertEqual(r.type, .number)
        XCTAssertNil(r.stream)
        XCTAssertNil(r.affinity)

        XCTAssertEqual(scan(Array(bodies[5].utf8)).type, .null)
        XCTAssertEqual(scan(Array(bodies[6].utf8)).type, .object)
        XCTAssertNil(scan(Array(bodies[7].utf8)).type)
        XCTAssertEqual(scan(Array(bodies[8].utf8)).model, "lone\u{FFFD}\u{FFFD}")
    }

    func testSurrogatePairDecoding() {
        let r = scan(Array(#"{"model":"a\uD83D\uDE00b"}"#.utf8))
        XCTAssertEqual(r.model, "a😀b")
    }

    func testPresenceKeys() {
        var s = RequestBodyScanner()
        _ = s.feed(Array(#"{"model":"m","messages":[],"x":{"prompt":1}}"#.utf8))
        XCTAssertEqual(s.finish(), .complete)
        XCTAssertTrue(s.hasKey("messages"))
        XCTAssertFalse(s.hasKey("prompt"))
        XCTAssertFalse(s.hasKey("input"))
    }

    func testContentValueStartIsTheFirstTopLevelPromptLikeValue() {
        func start(_ body: String, chunk: Int = 1) -> Int? {
            var s = RequestBodyScanner(configuration: .init(affinityField: "user"))
            let bytes = Array(body.utf8)
            var pos = 0
            while pos < bytes.count {
                let n = min(chunk, bytes.count - pos)
                _ = s.feed(bytes[pos..<(pos + n)])
                pos += n
            }
            _ = s.finish()
            return s.contentValueStart
        }
        let completion = #"{"model":"m", "prompt" :  "hello", "max_tokens":3}"#
        XCTAssertEqual(start(completion), Array(completion.utf8).firstIndex(of: UInt8(ascii: "h"))! - 1)
        let chat = #"{"x":{"prompt":"nested"},"messages":[{"role":"user"}],"input":"later","model":"m"}"#
        XCTAssertEqual(start(chat, chunk: 3), Array(chat.utf8).firstIndex(of: UInt8(ascii: "["))!)
        XCTAssertNil(start(#"{"model":"m","user":"u"}"#))
        // The affinity field is not content even when named like one.
        var s = RequestBodyScanner(configuration: .init(affinityField: "input"))
        let body = #"{"input":"a","prompt":"b"}"#
        _ = s.feed(Array(body.utf8))
        XCTAssertEqual(s.contentValueStart, Array(body.utf8).lastIndex(of: UInt8(ascii: "b"))! - 1)
    }

    func testModelAvailableEarlyAfterHugePrompt() {
        let prompt = String(repeating: "lorem ipsum \\\" é ", count: 65_536) // > 1 MiB
        let head = Array(#"{"prompt":""#.utf8) + Array(prompt.utf8) + Array(#"","model":"big","#.utf8)
        let tail = Array(#""max_tokens":5}"#.utf8)
        var s = RequestBodyScanner()
        var p = head.withUnsafeBytes { s.feed($0) }
        XCTAssertEqual(p, .modelAvailable)
        XCTAssertEqual(s.modelValue, "big")
        let range = s.modelRange!
        XCTAssertEqual(Array(head[range]), Array(#""big""#.utf8))
        p = tail.withUnsafeBytes { s.feed($0) }
        XCTAssertEqual(p, .complete)
        XCTAssertEqual(s.finish(), .complete)
        XCTAssertGreaterThan(head.count, 1 << 20)
    }

    func testModelAvailableBeforeDocumentEnds() {
        var s = RequestBodyScanner()
        XCTAssertEqual(s.feed(Array(#"{"model":"ab"#.utf8)), .incomplete)
        XCTAssertNil(s.modelValue)
        XCTAssertEqual(s.feed(Array(#"c","x":["#.utf8)), .modelAvailable)
        XCTAssertEqual(s.modelValue, "abc")
        XCTAssertEqual(s.modelRange, 9..<14)
        XCTAssertEqual(s.feed(Array("]".utf8)), .modelAvailable)
        XCTAssertEqual(s.finish(), .invalid(JSONError(offset: 21, message: "unexpected end of input")))
    }

    func testSplicingKeepsOtherBytes() {
        let body = Array(#"{ "temperature" : 0.50, "model" : "internal\/x" ,"messages":[{"content":"\u00e9"}] }"#.utf8)
        let r = scan(body)
        let range = try! XCTUnwrap(r.range)
        var spliced = Array(body[..<range.lowerBound])
        spliced += JSONStringEncoding.quoted("alias \"q\"\n")
        spliced += body[range.upperBound...]
        XCTAssertEqual(String(decoding: spliced, as: UTF8.self),
                       #"{ "temperature" : 0.50, "model" : "alias \"q\"\n" ,"messages":[{"content":"\u00e9"}] }"#)
        let r2 = scan(spliced)
        XCTAssertEqual(r2.model, "alias \"q\"\n")
        XCTAssertEqual(r2.final, .complete)
    }

    func testQuotedEncoding() {
        XCTAssertEqual(String(decoding: JSONStringEncoding.quoted("a\u{01}\t\\é"), as: UTF8.self), #""a\u0001\t\\é""#)
    }

    func invalid(_ s: String, _ offset: Int, _ message: String? = nil, file: StaticString = #filePath, line: UInt = #line) {
        let bytes = Array(s.utf8)
        let whole = scan(bytes)
        guard case .invalid(let e) = whole.final else {
            return XCTFail("expected invalid for \(s), got \(whole.final)", file: file, line: line)
        }
        XCTAssertEqual(e.offset, offset, "\(s): \(e)", file: file, line: line)
        if let m = message { XCTAssertEqual(e.message, m, file: file, line: line) }
        XCTAssertEqual(scan(bytes, chunks: [1]).final, whole.final, s, file: file, line: line)
        XCTAssertEqual(scan(bytes, chunks: [3, 1, 2]).final, whole.final, s, file: file, line: line)
    }

    func testInvalidDocuments() {
        invalid(#"{"a":1,}"#, 7)
        invalid(#"{"a":[1,2,]}"#, 10)
        invalid(#"{"model":"abc"#, 13, "unexpected end of input")
        invalid(#"{"a":"\x"}"#, 7, "invalid escape")
        invalid(#"{"a":"\u12G4"}"#, 10)
        invalid(#"[1,2]"#, 0, "top-level value must be an object")
        invalid(#""str""#, 0)
        invalid(#"{"a":1} x"#, 8, "unexpected data after the top-level object")
        invalid(#"{"a":1}{}"#, 7)
        invalid(#"{"a":01}"#, 6, "leading zero in number")
        invalid(#"{"a":1.}"#, 7)
        invalid(#"{"a":-}"#, 6)
        invalid(#"{"a":1e}"#, 7)
        invalid(#"{"a":tru}"#, 8)
        invalid(#"{"a":nul"#, 8)
        invalid("{\"a\":\"x\ny\"}", 7, "control character in string")
        invalid(#"{"a" 1}"#, 5)
        invalid(#"{a:1}"#, 1)
        invalid(#"{"model":"a","model":"b"}"#, 13, "duplicate top-level key model")
        invalid(#"{"model":"a","mod\u0065l":1}"#, 13, "duplicate top-level key model")
        invalid("", 0, "unexpected end of input")
        invalid("   ", 3, "unexpected end of input")
        let bomb = "{\"a\":" + String(repeating: "[", count: 300) + String(repeating: "]", count: 300) + "}"
        invalid(bomb, 5 + 255, "nesting too deep")
        let ok = "{\"a\":" + String(repeating: "[", count: 255) + String(repeating: "]", count: 255) + "}"
        XCTAssertEqual(scan(Array(ok.utf8)).final, .complete)
        invalid("{\"model\":\"" + String(repeating: "m", count: 1025) + "\"}", 10 + 1024, "model too long")
        XCTAssertEqual(scan(Array(("{\"model\":\"" + String(repeating: "m", count: 1024) + "\"}").utf8)).final, .complete)
    }

    func testInvalidUTF8() {
        func bad(_ bytes: [UInt8], _ offset: Int) {
            let body = Array(#"{"a":""#.utf8) + bytes + Array(#""}"#.utf8)
            XCTAssertEqual(scan(body).final, .invalid(JSONError(offset: 6 + offset, message: "invalid UTF-8")), "\(bytes)")
            XCTAssertEqual(scan(body, chunks: [1]).final, scan(body).final)
        }
        bad([0xC0, 0x80], 0)           // overlong
        bad([0xE0, 0x80, 0x80], 1)     // overlong 3-byte
        bad([0xED, 0xA0, 0x80], 1)     // UTF-16 surrogate
        bad([0xF4, 0x90, 0x80, 0x80], 1) // > U+10FFFF
        bad([0xFF], 0)
        bad([0x80], 0)                 // lone continuation
        bad([0xE2, 0x82], 2)           // truncated, then quote
        XCTAssertEqual(scan([0x7B, 0x7D, 0xC3]).final, .invalid(JSONError(offset: 2, message: "unexpected data after the top-level object")))
    }

    func testAffinityTruncatedAtCharacterBoundary() {
        let value = String(repeating: "é", count: 3000) // 6000 bytes
        let body = Array(("{\"" + String(repeating: "k", count: 100) + "\":1,\"user\":\"a" + value + "\",\"model\":\"m\"}").utf8)
        let r = scan(body)
        XCTAssertEqual(r.final, .complete)
        XCTAssertEqual(r.affinity, "a" + String(repeating: "é", count: 2047))
        XCTAssertEqual(r.model, "m")
        var rng = SplitMix64(seed: 9)
        XCTAssertEqual(scan(body, chunks: [1]), r)
        for _ in 0..<20 { XCTAssertEqual(scan(body, chunks: randomChunks(body.count, &rng)), r) }
    }

    func testLargeRandomDocumentChunkings() {
        var rng = SplitMix64(seed: 7)
        var body = #"{"messages":["#
        for i in 0..<200 {
            body += #"{"role":"user","content":"msg \#(i) \u00e9\ud83d\ude00 \"q\" é😀","n":\#(i).5e-3},"#
        }
        body += #"{}],"model":"final-model","stream":true}"#
        let bytes = Array(body.utf8)
        let whole = scan(bytes)
        XCTAssertEqual(whole.final, .complete)
        XCTAssertEqual(whole.model, "final-model")
        for _ in 0..<20 {
            XCTAssertEqual(scan(bytes, chunks: randomChunks(bytes.count, &rng)), whole)
        }
    }
}
