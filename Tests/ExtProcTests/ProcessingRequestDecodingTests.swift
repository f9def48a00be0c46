import Foundation
import NIOCore
import Protos
import SwiftProtobuf
import XCTest

@testable import ExtProc

/// The wire reader must see what swift-protobuf sees, including unknown fields and odd encodings.
final class ProcessingRequestDecodingTests: XCTestCase {
    func encode(_ m: Envoy_Service_ExtProc_V3_ProcessingRequest) throws -> ByteBuffer {
        ByteBuffer(bytes: try m.serializedBytes() as [UInt8])
    }

    func headerPairs(_ view: HeadersView) throws -> [String] {
        var out: [String] = []
        try view.forEach { k, v in out.append(String(decoding: k, as: UTF8.self) + "=" + String(decoding: v, as: UTF8.self)) }
        return out
    }

    func testRequestHeadersWithProtocolConfigAndMetadata() throws {
        var m = Envoy_Service_ExtProc_V3_ProcessingRequest()
        var h = Envoy_Service_ExtProc_V3_HttpHeaders()
        for (k, v) in [(":path", "/v1/completions"), ("x-request-id", "r1"), ("empty", "")] {
            var hv = Envoy_Config_Core_V3_HeaderValue()
            hv.key = k
            hv.rawValue = Data(v.utf8)
            h.headers.headers.append(hv)
        }
        var legacy = Envoy_Config_Core_V3_HeaderValue()
        legacy.key = "legacy"
        legacy.value = "in-value-field"
        h.headers.headers.append(legacy)
        h.endOfStream = true
        m.requestHeaders = h
        m.protocolConfig.requestBodyMode = .fullDuplexStreamed
        m.protocolConfig.responseBodyMode = .buffered
        m.metadataContext.filterMetadata["envoy.lb.subset_hint"] = Google_Protobuf_Struct(fields: ["k": Google_Protobuf_Value(stringValue: "v")])
        m.observabilityMode = true  // a field the reader skips

        let r = try ExtProcRequest(decoding: try encode(m))
        XCTAssertEqual(r.phase, .requestHeaders)
        XCTAssertEqual(r.requestBodyMode, BodySendMode.fullDuplexStreamed.rawValue)
        XCTAssertEqual(r.responseBodyMode, BodySendMode.buffered.rawValue)
        let meta = try Envoy_Config_Core_V3_Metadata(serializedBytes: Array(r.metadataContext!.readableBytesView))
        XCTAssertEqual(meta, m.metadataContext)
        let view = try HeadersView(r.payload)
        XCTAssertTrue(view.endOfStream)
        XCTAssertEqual(try headerPairs(view), [":path=/v1/completions", "x-request-id=r1", "empty=", "legacy=in-value-field"])
        XCTAssertEqual(try view.value(of: "x-request-id"), "r1")

        // Messages arrive as slices of a larger read: the views must be relative to the reader index.
        var framed = ByteBuffer(bytes: [0xEE, 0xEE, 0xEE])
        var encoded = try encode(m)
        framed.writeBuffer(&encoded)
        framed.moveReaderIndex(forwardBy: 3)
        let shifted = try ExtProcRequest(decoding: framed)
        XCTAssertEqual(try headerPairs(HeadersView(shifted.payload)), try headerPairs(view))
        XCTAssertEqual(shifted.metadataContext, r.metadataContext)
    }

    func testBodyPhasesAndNoProtocolConfig() throws {
        for (phase, set) in [(ExtProcRequest.Phase.requestBody, true), (.responseBody, false)] {
            var m = Envoy_Service_ExtProc_V3_ProcessingRequest()
            var b = Envoy_Service_ExtProc_V3_HttpBody()
            b.body = Data((0..<70_000).map { UInt8(truncatingIfNeeded: $0) })
            b.endOfStream = true
            if set { m.requestBody = b } else { m.responseBody = b }
            let r = try ExtProcRequest(decoding: try encode(m))
            XCTAssertEqual(r.phase, phase)
            XCTAssertNil(r.requestBodyMode)
            let view = try BodyView(r.payload)
            XCTAssertTrue(view.endOfStream)
            XCTAssertEqual(Data(view.body.readableBytesView), b.body)
        }
        var trailers = Envoy_Service_ExtProc_V3_ProcessingRequest()
        trailers.responseTrailers = Envoy_Service_ExtProc_V3_HttpTrailers()
        XCTAssertEqual(try ExtProcRequest(decoding: try encode(trailers)).phase, .responseTrailers)
    }

    func testMalformedInputThrows() {
        for bytes: [UInt8] in [[0x12, 0x05, 0x01], [0x12], [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], [0x0B], [0x00]] {
            XCTAssertThrowsError(try ExtProcRequest(decoding: ByteBuffer(bytes: bytes)), "\(bytes)")
        }
        // A header map whose entry is truncated: found while iterating.
        XCTAssertThrowsError(try HeadersView(ByteBuffer(bytes: [0x0A, 0x03, 0x0A, 0x05, 0x41])).forEach { _, _ in })
    }

    func testEmptyMessageHasNoPhase() throws {
        XCTAssertNil(try ExtProcRequest(decoding: ByteBuffer()).phase)
    }

    func testServedEndpointFromResponseMetadata() throws {
        var md = Envoy_Config_Core_V3_Metadata()
        md.filterMetadata["envoy.lb.subset_hint"] = Google_Protobuf_Struct(fields: [
            "x-gateway-destination-endpoint-served": Google_Protobuf_Value(stringValue: "wrong namespace")])
        md.filterMetadata["envoy.lb"] = Google_Protobuf_Struct(fields: [
            "x-gateway-destination-endpoint": Google_Protobuf_Value(stringValue: "10.0.0.1:80,10.0.0.2:80"),
            "x-gateway-destination-endpoint-served": Google_Protobuf_Value(stringValue: "10.0.0.2:80"),
        ])
        md.filterMetadata["other"] = Google_Protobuf_Struct(fields: ["n": Google_Protobuf_Value(numberValue: 1)])
        let read = { (m: Envoy_Config_Core_V3_Metadata) in
            try metadataString(ByteBuffer(bytes: try m.serializedBytes() as [UInt8]), namespace: "envoy.lb",
                               key: "x-gateway-destination-endpoint-served")
        }
        XCTAssertEqual(try read(md), "10.0.0.2:80")
        // A number where a string belongs, or no such key: nothing.
        md.filterMetadata["envoy.lb"]!.fields["x-gateway-destination-endpoint-served"] = Google_Protobuf_Value(numberValue: 3)
        XCTAssertNil(try read(md))
        md.filterMetadata["envoy.lb"]!.fields["x-gateway-destination-endpoint-served"] = nil
        XCTAssertNil(try read(md))
        XCTAssertNil(try read(Envoy_Config_Core_V3_Metadata()))
        XCTAssertThrowsError(try metadataString(ByteBuffer(bytes: [0x0A, 0x05, 0x01]), namespace: "envoy.lb", key: "k"))
    }
}
