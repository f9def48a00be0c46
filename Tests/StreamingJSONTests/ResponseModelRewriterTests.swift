import XCTest
import Foundation
@testable import StreamingJSON

/// Runs a rewriter over `bytes` split as `chunks`; checks promptness; returns output + rewriter.
func rewrite(_ bytes: [UInt8], mode: ResponseModelRewriter.Mode, replacement: String?, chunks: [Int]? = nil,
             file: StaticString = #filePath, line: UInt = #line) -> ([UInt8], ResponseModelRewriter) {
    var rw = ResponseModelRewriter(mode: mode, replacement: replacement)
    var out: [UInt8] = []
    var pos = 0
    var k = 0
    let sizes = chunks ?? [max(bytes.count, 1)]
    while pos < bytes.count {
        let n = min(sizes[k % sizes.count], bytes.count - pos)
        k += 1
        let chunk = Array(bytes[pos..<(pos + n)])
        var segs: [OutputSegment] = []
        rw.process(chunk, into: &segs)
        for s in segs {
            switch s {
            case .input(let r):
                XCTAssertTrue(r.lowerBound >= 0 && r.upperBound <= chunk.count, file: file, line: line)
                out += chunk[r]
            case .bytes(let b): out += b
            }
        }
        pos += n
    }
    var segs: [OutputSegment] = []
    rw.finish(into: &segs)
    for s in segs {
        if case .bytes(let b) = s { out += b } else { XCTFail("finish emits only bytes", file: file, line: line) }
    }
    return (out, rw)
}

final class ResponseModelRewriterTests: XCTestCase {
    let json = #"{"id":"x","object":"chat.completion","model":"internal\/llama-8b","choices":[{"message":{"role":"assistant","content":"the \"model\": \"internal\""},"model":"nested"}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"prompt_tokens_details":{"cached_tokens":8}}}"#
    var jsonExpected: String { json.replacingOccurrences(of: #""model":"internal\/llama-8b""#, with: #""model":"my-alias""#) }

    func testJSONRewriteAnyChunking() {
        var rng = SplitMix64(seed: 1)
        let bytes = Array(json.utf8)
        for round in 0..<300 {
            let chunks = round == 0 ? [1] : round == 1 ? [bytes.count] : randomChunks(bytes.count, &rng)
            let (out, rw) = rewrite(bytes, mode: .json, replacement: "my-alias", chunks: chunks)
            XCTAssertEqual(String(decoding: out, as: UTF8.self), jsonExpected)
            XCTAssertEqual(rw.observedModel, "internal/llama-8b")
            XCTAssertEqual(rw.replacements, 1)
            XCTAssertEqual(rw.usage, TokenUsage(promptTokens: 12, completionTokens: 34, totalTokens: 46, cachedTokens: 8))
        }
    }

    func testObserveOnly() {
        let (out, rw) = rewrite(Array(json.utf8), mode: .json, replacement: nil, chunks: [3])
        XCTAssertEqual(out, Array(json.utf8))
        XCTAssertEqual(rw.observedModel, "internal/llama-8b")
        XCTAssertEqual(rw.replacements, 0)
        XCTAssertEqual(rw.usage.totalTokens, 46)
    }

    func testSSERewriteAnyChunking() {
        var events = ""
        for i in 0..<20 {
            let nl = i % 2 == 0 ? "\n" : "\r\n"
            events += ": keep-alive comment \"model\":\"x\"\(nl)"
            events += "event: message\(nl)"
            events += #"data: {"id":"c\#(i)","model":"backend-model","choices":[{"delta":{"content":"tok \"model\":\"backend-model\" \#(i)"}}],"usage":null}"# + nl + nl
        }
        events += #"data:{"model":"backend-model","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":20,"total_tokens":25}}"# + "\n\n"
        events += "data: [DONE]\n\n"
        let expected = events.replacingOccurrences(of: #"{"id":"#, with: "{\"id\":")
            .replacingOccurrences(of: #""model":"backend-model","choices""#, with: #""model":"alias-é","choices""#)
        XCTAssertNotEqual(expected, events)
        let bytes = Array(events.utf8)
        var rng = SplitMix64(seed: 2)
        for round in 0..<200 {
            let chunks = round == 0 ? [1] : randomChunks(bytes.count, &rng)
            let (out, rw) = rewrite(bytes, mode: .sse, replacement: "alias-é", chunks: chunks)
            XCTAssertEqual(String(decoding: out, as: UTF8.self), expected)
            XCTAssertEqual(rw.replacements, 21)
            XCTAssertEqual(rw.observedModel, "backend-model")
            XCTAssertEqual(rw.usage, TokenUsage(promptTokens: 5, completionTokens: 20, totalTokens: 25))
        }
    }

    func testPromptOutputOnlyModelHeldBack() {
        var rw = ResponseModelRewriter(mode: .sse, replacement: "a")
        var segs: [OutputSegment] = []
        rw.process(Array(#"data: {"x":"abc","model":"inter"#.utf8), into: &segs)
        XCTAssertEqual(segs, [.input(0..<25)]) // everything up to the model's opening quote
        segs = []
        rw.process(Array(#"nal","y":1}"#.utf8), into: &segs)
        XCTAssertEqual(segs, [.bytes(Array(#""a""#.utf8)), .input(4..<11)])
    }

    func testPassThroughOfNonJSON() {
        for body in ["hello world", "[1,2,{\"model\":\"x\"}]", "<html>\"model\":\"x\"</html>", ""] {
            let (out, _) = rewrite(Array(body.utf8), mode: .json, replacement: "z", chunks: [2])
            XCTAssertEqual(String(decoding: out, as: UTF8.self), body)
        }
        let (out, _) = rewrite(Array(#"{"model":"m"}"#.utf8), mode: .passthrough, replacement: "z")
        XCTAssertEqual(String(decoding: out, as: UTF8.self), #"{"model":"m"}"#)
    }

    func testBrokenInputNeverLosesBytes() {
        // Unterminated model string at end of body, SSE with newline inside a model value,
        // and an oversized model value: all must come out byte-identical.
        let cases: [(String, ResponseModelRewriter.Mode)] = [
            (#"{"model":"unterminated"#, .json),
            ("data: {\"model\":\"bro\nken\"}\n\ndata: {\"model\":\"ok\"}\n\n", .sse),
            ("{\"model\":\"" + String(repeating: "x", count: 10_000) + "\",\"a\":1}", .json),
        ]
        var rng = SplitMix64(seed: 3)
        for (body, mode) in cases {
            let bytes = Array(body.utf8)
            for _ in 0..<20 {
                let (out, _) = rewrite(bytes, mode: mode, replacement: nil, chunks: randomChunks(bytes.count, &rng))
                XCTAssertEqual(out, bytes)
            }
        }
        let (out, _) = rewrite(Array(cases[1].0.utf8), mode: .sse, replacement: "A", chunks: [1])
        XCTAssertEqual(String(decoding: out, as: UTF8.self), "data: {\"model\":\"bro\nken\"}\n\ndata: {\"model\":\"A\"}\n\n")
        let (big, _) = rewrite(Array(cases[2].0.utf8), mode: .json, replacement: "A", chunks: [100])
        XCTAssertEqual(big, Array(cases[2].0.utf8))
    }

    func testUsageExtractionIgnoresLookalikes() {
        let body = """
        { "prompt_tokens": 999, "x": {"usage": {"prompt_tokens": 998}},
          "usage" : { "prompt_tokens" : 12 , "completion_tokens":3,
                      "other": {"total_tokens": 997}, "list": [{"cached_tokens": 996}],
                      "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 7}, "total_tokens": 15 },
          "total_tokens": 995, "model": "m" }
        """
        var rng = SplitMix64(seed: 11)
        let bytes = Array(body.utf8)
        for round in 0..<50 {
            let (out, rw) = rewrite(bytes, mode: .json, replacement: "a", chunks: round == 0 ? [1] : randomChunks(bytes.count, &rng))
            XCTAssertEqual(rw.usage, TokenUsage(promptTokens: 12, completionTokens: 3, totalTokens: 15, cachedTokens: 7))
            XCTAssertEqual(String(decoding: out, as: UTF8.self), body.replacingOccurrences(of: #""model": "m""#, with: #""model": "a""#))
        }
    }

    func testSSEMultiLineDataAndOtherFields() {
        let body = "id: 1\nevent: chunk\ndata: {\"model\":\ndata:  \"x\", \"usage\": {\"total_tokens\":\r\ndata: 9}}\n\nretry: 5\ndata: \"model\" is not json\n\ndata: {\"model\": \"y\"}\n\n"
        let expected = body.replacingOccurrences(of: "\"x\"", with: "\"Z\"").replacingOccurrences(of: "\"y\"", with: "\"Z\"")
        var rng = SplitMix64(seed: 21)
        let bytes = Array(body.utf8)
        for round in 0..<100 {
            let (out, rw) = rewrite(bytes, mode: .sse, replacement: "Z", chunks: round == 0 ? [1] : randomChunks(bytes.count, &rng))
            XCTAssertEqual(String(decoding: out, as: UTF8.self), expected)
            XCTAssertEqual(rw.replacements, 2)
            XCTAssertEqual(rw.usage.totalTokens, 9)
            XCTAssertEqual(rw.observedModel, "y")
        }
    }

    func testModeForContentType() {
        XCTAssertEqual(ResponseModelRewriter.mode(forContentType: "text/event-stream; charset=utf-8"), .sse)
        XCTAssertEqual(ResponseModelRewriter.mode(forContentType: "application/json"), .json)
        XCTAssertEqual(ResponseModelRewriter.mode(forContentType: "text/plain"), .passthrough)
        XCTAssertEqual(ResponseModelRewriter.mode(forContentType: nil), .passthrough)
    }
}
