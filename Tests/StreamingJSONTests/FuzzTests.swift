import XCTest
import Foundation
@testable import StreamingJSON

/// Mutation fuzzing: results must not depend on chunking, and validity must agree with
/// Foundation's JSONSerialization (where the two are comparable).
final class FuzzTests: XCTestCase {
    let seeds: [String] = [
        #"{"model":"llama","messages":[{"role":"user","content":"hi é 😀 \"x\" \n"}],"stream":true,"user":"u1","t":0.7}"#,
        #"{"prompt":["a","b"],"model":"m","n":[1,-2.5e3,0,true,false,null,{"model":"x"}],"user":"é"}"#,
        #"{ "a" : { "b" : [ [ ] , { } ] } , "model" : "z" }"#,
    ]

    func mutate(_ s: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
        var b = s
        let alphabet: [UInt8] = Array(#"{}[]:,"\u0123456789eE+-.tfnlrs aé"#.utf8) + [0x00, 0x0A, 0xFF, 0xC3, 0x80]
        for _ in 0..<Int.random(in: 1...3, using: &rng) {
            guard !b.isEmpty else { break }
            let i = Int.random(in: 0..<b.count, using: &rng)
            switch Int.random(in: 0..<3, using: &rng) {
            case 0: b[i] = alphabet.randomElement(using: &rng)!
            case 1: b.insert(alphabet.randomElement(using: &rng)!, at: i)
            default: b.remove(at: i)
            }
        }
        return b
    }

    func testScannerMutationsAreChunkingIndependentAndAgreeWithFoundation() {
        var rng = SplitMix64(seed: 2024)
        var valid = 0, invalid = 0
        for round in 0..<6000 {
            let doc = mutate(Array(seeds[round % seeds.count].utf8), &rng)
            let whole = scan(doc)
            XCTAssertEqual(scan(doc, chunks: [1]), whole, String(decoding: doc, as: UTF8.self))
            XCTAssertEqual(scan(doc, chunks: randomChunks(doc.count, &rng)), whole)
            let foundation = (try? JSONSerialization.jsonObject(with: Data(doc))) as? [String: Any]
            let text = String(decoding: doc, as: UTF8.self)
            let hasEscapedSurrogate = text.lowercased().contains("\\ud")
            if case .complete = whole.final {
                valid += 1
                // Foundation rejects numbers outside Double's range; RFC 8259 does not.
                let hugeExponent = text.range(of: #"[eE][+-]?[0-9]{3}"#, options: .regularExpression) != nil
                if !hasEscapedSurrogate && !hugeExponent {
                    XCTAssertNotNil(foundation, "we accept, Foundation rejects: \(String(decoding: doc, as: UTF8.self))")
                }
            } else {
                invalid += 1
                if foundation != nil, case .invalid(let e) = whole.final {
                    // Foundation tolerates trailing commas; RFC 8259 does not.
                    let allowed = ["duplicate top-level key model", "trailing comma or missing value", "expected key after ','"]
                    XCTAssertTrue(allowed.contains(e.message), "\(e): \(text)")
                }
            }
        }
        XCTAssertGreaterThan(valid, 100)
        XCTAssertGreaterThan(invalid, 100)
    }

    func testRewriterMutationsAreChunkingIndependentAndLossless() {
        var rng = SplitMix64(seed: 77)
        let sse = "data: {\"model\":\"backend\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\r\n\r\n: c\n\ndata: {\"model\":\"backend\",\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n"
        let json = #"{"model":"backend","usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1}},"x":[{"model":"n"}]}"#
        for round in 0..<3000 {
            let (base, mode): (String, ResponseModelRewriter.Mode) = round % 2 == 0 ? (sse, .sse) : (json, .json)
            let doc = mutate(Array(base.utf8), &rng)
            let (observed, _) = rewrite(doc, mode: mode, replacement: nil, chunks: randomChunks(doc.count, &rng))
            XCTAssertEqual(observed, doc)
            let (whole, rw1) = rewrite(doc, mode: mode, replacement: "alias")
            let (bytewise, rw2) = rewrite(doc, mode: mode, replacement: "alias", chunks: [1])
            let (random, rw3) = rewrite(doc, mode: mode, replacement: "alias", chunks: randomChunks(doc.count, &rng))
            XCTAssertEqual(whole, bytewise, String(decoding: doc, as: UTF8.self))
            XCTAssertEqual(whole, random)
            XCTAssertEqual(rw1.usage, rw2.usage)
            XCTAssertEqual(rw1.usage, rw3.usage)
            XCTAssertEqual(rw1.replacements, rw3.replacements)
        }
    }
}
