import Foundation
import NIOCore
import Protos
import StreamingJSON
import SwiftProtobuf
import XCTest

@testable import ExtProc

/// The hand-written encoder must produce exactly the messages swift-protobuf would.
final class ReplyEncodingTests: XCTestCase {
    func decode(_ framed: ByteBuffer) throws -> Envoy_Service_ExtProc_V3_ProcessingResponse {
        var b = framed
        XCTAssertEqual(b.readInteger(as: UInt8.self), 0, "uncompressed")
        let length = Int(b.readInteger(as: UInt32.self)!)
        XCTAssertEqual(length, b.readableBytes, "prefix length matches the payload")
        return try Envoy_Service_ExtProc_V3_ProcessingResponse(serializedBytes: Array(b.readableBytesView))
    }

    func testRequestHeadersReplyWithDestination() throws {
        var changes = ReplyEncoding.HeaderChanges()
        changes.setHeaders = [("x-gateway-destination-endpoint", "[::1]:8000"), ("x-request-id", "abc"), ("content-length", "1234")]
        let fast = try decode(ReplyEncoding.headersReply(request: true, changes: changes, clearRouteCache: true, destination: "[::1]:8000"))
        let slow = Replies.requestHeaders(Replies.common(Replies.mutation(changes), clearRouteCache: true),
                                          metadata: Replies.destinationMetadata("[::1]:8000"))
        XCTAssertEqual(fast, slow)
        XCTAssertEqual(fast.dynamicMetadata.fields["envoy.lb"]?.structValue.fields["x-gateway-destination-endpoint"]?.stringValue, "[::1]:8000")
        XCTAssertEqual(fast.requestHeaders.response.headerMutation.setHeaders[0].header.rawValue, Data("[::1]:8000".utf8))
        XCTAssertEqual(fast.requestHeaders.response.headerMutation.setHeaders[0].appendAction, .overwriteIfExistsOrAdd)
    }

    func testResponseHeadersReply() throws {
        var changes = ReplyEncoding.HeaderChanges()
        changes.setHeaders = [("x-gateway-target-model", "facebook/opt-125m")]
        changes.removeHeaders = ["content-length"]
        let fast = try decode(ReplyEncoding.headersReply(request: false, changes: changes, clearRouteCache: false, destination: nil))
        XCTAssertEqual(fast, Replies.responseHeaders(Replies.mutation(changes)))
        let empty = try decode(ReplyEncoding.headersReply(request: false, changes: .init(), clearRouteCache: false, destination: nil))
        XCTAssertEqual(empty.responseHeaders.response.headerMutation, HeaderMutation())
        XCTAssertFalse(empty.responseHeaders.response.hasHeaderMutation)
    }

    func testStreamedBodies() throws {
        for size in [0, 1, 127, 128, 16_383, 16_384, 62_000] {
            let body = Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) })
            for eos in [false, true] {
                for request in [false, true] {
                    let fast = try decode(ReplyEncoding.streamedBody(ByteBuffer(bytes: body), endOfStream: eos, request: request))
                    XCTAssertEqual(fast, Replies.streamedBody(body, endOfStream: eos, request: request), "size \(size) eos \(eos)")
                }
            }
        }
    }

    /// A body goes out as parts: short pieces are copied after the fields, long ones are passed on
    /// as they are (no copy here; the HTTP/2 layer copies them into its output or sends them as
    /// slices), and the parts joined are exactly the one-buffer message.
    func testStreamedBodyGoesOutInParts() throws {
        let received = ByteBuffer(bytes: (0..<30_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        let replacement = Array("\"facebook/opt-125m\"".utf8)
        for longPiece in [300, 1_000, 20_000] {
            let before = received.getSlice(at: 0, length: 10)!, after = received.getSlice(at: 16, length: longPiece)!
            let count = 10 + replacement.count + longPiece
            for eos in [false, true] {
                var sink = CollectedParts()
                ReplyEncoding.streamedBody(count: count, endOfStream: eos, request: true, into: &sink) { out in
                    out.write(before)
                    out.write(bytes: replacement)
                    out.write(after)
                }
                let parts = sink.parts
                XCTAssertEqual(parts.count, eos ? 3 : 2, "fields with the short pieces, the long piece, end_of_stream")
                XCTAssertEqual(parts[1], after, "the long piece is passed on as it is")
                var joined = ByteBuffer()
                for var p in parts { joined.writeBuffer(&p) }
                let expected = Data(before.readableBytesView) + Data(replacement) + Data(after.readableBytesView)
                XCTAssertEqual(try decode(joined), Replies.streamedBody(expected, endOfStream: eos, request: true))
            }
        }
        // A small body (a JSON response chunk) travels inside the first part, end_of_stream too.
        var sink = CollectedParts()
        ReplyEncoding.streamedBody(count: 200, endOfStream: true, request: false, into: &sink) {
            $0.write(received.getSlice(at: 0, length: 120)!)
            $0.write(received.getSlice(at: 120, length: 80)!)
        }
        XCTAssertEqual(sink.parts.count, 1)
        XCTAssertEqual(try decode(sink.parts[0]).responseBody.response.bodyMutation.streamedResponse,
                       Replies.streamedBody(Data(received.getSlice(at: 0, length: 200)!.readableBytesView), endOfStream: true,
                                            request: false).responseBody.response.bodyMutation.streamedResponse)
    }

    func testStreamedBodyOfASlice() throws {
        let data = ByteBuffer(string: "0123456789")
        let fast = try decode(ReplyEncoding.streamedBody(data.getSlice(at: 3, length: 4)!, endOfStream: true, request: true))
        XCTAssertEqual(fast.requestBody.response.bodyMutation.streamedResponse.body, Data("3456".utf8))
    }
}

final class RequestClassificationTests: XCTestCase {
    func testAPIKindByPathSuffix() {
        XCTAssertEqual(InferenceAPIKind(path: "/v1/chat/completions"), .chatCompletions)
        XCTAssertEqual(InferenceAPIKind(path: "/v1/completions?x=1"), .completions)
        XCTAssertEqual(InferenceAPIKind(path: "/v1/embeddings/"), .embeddings)
        XCTAssertEqual(InferenceAPIKind(path: "/v1/responses"), .responses)
        XCTAssertEqual(InferenceAPIKind(path: "/v1/models"), .other)
        XCTAssertEqual(InferenceAPIKind(path: ""), .other)
    }

    func testResponseModeFromContentType() {
        func mode(_ s: String) -> ResponseModelRewriter.Mode { Array(s.utf8).withUnsafeBytes { ProcessStream.responseMode(contentType: $0) } }
        XCTAssertEqual(mode("Text/Event-Stream; charset=utf-8"), .sse)
        XCTAssertEqual(mode("application/json"), .json)
        XCTAssertEqual(mode("text/plain"), .passthrough)
        XCTAssertEqual(mode(""), .passthrough)
    }
}

private struct CollectedParts: ReplyPartSink {
    var parts: [ByteBuffer] = []
    mutating func emit(_ part: ByteBuffer) { parts.append(part) }
}
