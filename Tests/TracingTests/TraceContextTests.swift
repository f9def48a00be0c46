import XCTest
@testable import Tracing

final class TraceContextTests: XCTestCase {
    private func parse(_ s: String) -> TraceContext? { TraceContext(traceparent: Array(s.utf8)) }

    func testParsesAndFormatsVersion00() throws {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        let c = try XCTUnwrap(parse(s))
        XCTAssertEqual(c.traceID, TraceID(high: 0x4bf92f3577b34da6, low: 0xa3ce929d0e0e4736))
        XCTAssertEqual(c.spanID, 0x00f067aa0ba902b7)
        XCTAssertTrue(c.sampled)
        XCTAssertEqual(c.traceparent, s, "formatting gives the same text back")
        XCTAssertFalse(try XCTUnwrap(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")).sampled)
        XCTAssertTrue(try XCTUnwrap(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03")).sampled,
                      "other flag bits do not hide the sampled bit")
    }

    func testRejectsWhatW3CRejects() {
        let bad = [
            "", "00", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  // version ff
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  // upper case
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  // version 00 with more
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ]
        for s in bad { XCTAssertNil(parse(s), s) }
    }

    func testLaterVersionsMayAppendFields() throws {
        let c = try XCTUnwrap(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next"))
        XCTAssertEqual(c.spanID, 0x00f067aa0ba902b7)
        XCTAssertNil(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"))
    }

    func testTraceIDBytesAreBigEndian() {
        XCTAssertEqual(TraceID(high: 0x0102030405060708, low: 0x090a0b0c0d0e0f10).bytes, Array(1...16))
    }
}

final class TracerTests: XCTestCase {
    struct Counter: RandomNumberGenerator {
        var n: UInt64 = 0
        mutating func next() -> UInt64 { n &+= 0x9E37_79B9_7F4A_7C15; return n }
    }

    func testFollowsTheParentsDecision() throws {
        var rng = Counter()
        let never = Tracer(sampleRatio: 0)
        let parent = TraceContext(traceID: TraceID(high: 1, low: 2), spanID: 3, sampled: true)
        let child = try XCTUnwrap(never.startSpan(parent: parent, using: &rng), "a sampled parent is traced at ratio 0")
        XCTAssertEqual(child.traceID, parent.traceID)
        XCTAssertNotEqual(child.spanID, parent.spanID)
        XCTAssertTrue(child.sampled)

        let always = Tracer(sampleRatio: 1)
        var unsampled = parent
        unsampled.sampled = false
        XCTAssertNil(always.startSpan(parent: unsampled, using: &rng), "an unsampled parent is not traced at ratio 1")
    }

    func testRootsAreSampledAtTheRatio() {
        var rng = SystemRandomNumberGenerator()
        XCTAssertNil(Tracer(sampleRatio: 0).startSpan(parent: nil, using: &rng))
        XCTAssertNotNil(Tracer(sampleRatio: 1).startSpan(parent: nil, using: &rng))
        let tenth = Tracer(sampleRatio: 0.1)
        let traced = (0..<20_000).filter { _ in tenth.startSpan(parent: nil, using: &rng) != nil }.count
        XCTAssertEqual(Double(traced) / 20_000, 0.1, accuracy: 0.015)
    }

    func testQueueIsBoundedAndDrainsInOrder() {
        let tracer = Tracer(sampleRatio: 1, maxQueuedSpans: 4)
        func span(_ id: UInt64) -> SpanRecord {
            SpanRecord(name: "s\(id)", kind: .internal, context: TraceContext(traceID: TraceID(high: 0, low: 1), spanID: id, sampled: true),
                       parentSpanID: 0, startUnixNanos: 0, endUnixNanos: 1)
        }
        tracer.record([span(1), span(2), span(3)])
        tracer.record([span(4), span(5)])  // would pass 4: dropped whole
        tracer.record([span(6)])
        XCTAssertEqual(tracer.dropped, 2)
        XCTAssertEqual(tracer.drain(limit: 2).map(\.context.spanID), [1, 2])
        XCTAssertEqual(tracer.drain(limit: 10).map(\.context.spanID), [3, 6])
        XCTAssertTrue(tracer.drain(limit: 10).isEmpty)
    }
}
