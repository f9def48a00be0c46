import Foundation
import NIOCore
import Protos
import StreamingJSON
import SwiftProtobuf

typealias ProcessingRequest = Envoy_Service_ExtProc_V3_ProcessingRequest
typealias ProcessingResponse = Envoy_Service_ExtProc_V3_ProcessingResponse
typealias HeaderMutation = Envoy_Service_ExtProc_V3_HeaderMutation
typealias BodySendMode = Envoy_Extensions_Filters_Http_ExtProc_V3_ProcessingMode.BodySendMode

/// Names shared with the reference EPP and the gateways that drive it.
public enum WireNames {
    public static let destinationHeader = "x-gateway-destination-endpoint"
    /// W3C trace context, set to the picker's span for sampled requests.
    static let traceparentHeader = "traceparent"
    public static let destinationMetadataNamespace = "envoy.lb"
    public static let subsetHintNamespace = "envoy.lb.subset_hint"
    public static let subsetHintKey = "x-gateway-destination-endpoint-subset"
    /// In `envoy.lb` of the response's metadata: the endpoint the gateway actually sent the request
    /// to (a fallback when the first failed).
    static let servedEndpointNamespace: StaticString = "envoy.lb"
    static let servedEndpointKey: StaticString = "x-gateway-destination-endpoint-served"
    public static let targetModelHeader = "x-gateway-target-model"
    public static let modelRewriteHeaders = ["x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite"]
    public static let objectiveHeaders = ["x-gateway-inference-objective", "x-llm-d-inference-objective"]
    public static let requestIDHeader = "x-request-id"
    /// Largest body piece sent back in one message: some gateways cap messages near 64 KiB.
    public static let maxBodyChunk = 62_000
}

/// Builders for the ProcessingResponse shapes the picker sends.
enum Replies {
    static func setHeader(_ key: String, _ value: String) -> Envoy_Config_Core_V3_HeaderValueOption {
        var header = Envoy_Config_Core_V3_HeaderValue()
        header.key = key
        // `value` would reach the router as an empty header: Envoy wants raw_value here.
        header.rawValue = Data(value.utf8)
        var option = Envoy_Config_Core_V3_HeaderValueOption()
        option.header = header
        option.appendAction = .overwriteIfExistsOrAdd
        return option
    }

    static func mutation(_ changes: ReplyEncoding.HeaderChanges) -> HeaderMutation {
        var mutation = HeaderMutation()
        for (key, value) in changes.setHeaders { mutation.setHeaders.append(setHeader(key, value)) }
        mutation.removeHeaders = changes.removeHeaders
        return mutation
    }

    static func common(_ mutation: HeaderMutation?, clearRouteCache: Bool = false) -> Envoy_Service_ExtProc_V3_CommonResponse {
        var common = Envoy_Service_ExtProc_V3_CommonResponse()
        if let mutation { common.headerMutation = mutation }
        common.clearRouteCache_p = clearRouteCache
        return common
    }

    static func requestHeaders(_ common: Envoy_Service_ExtProc_V3_CommonResponse, metadata: Google_Protobuf_Struct?) -> ProcessingResponse {
        var headers = Envoy_Service_ExtProc_V3_HeadersResponse()
        headers.response = common
        var r = ProcessingResponse()
        r.requestHeaders = headers
        if let metadata { r.dynamicMetadata = metadata }
        return r
    }

    static func responseHeaders(_ mutation: HeaderMutation?) -> ProcessingResponse {
        var headers = Envoy_Service_ExtProc_V3_HeadersResponse()
        if let mutation { headers.response = common(mutation) }
        var r = ProcessingResponse()
        r.responseHeaders = headers
        return r
    }

    /// A FULL_DUPLEX_STREAMED body piece.
    static func streamedBody(_ body: Data, endOfStream: Bool, request: Bool) -> ProcessingResponse {
        var streamed = Envoy_Service_ExtProc_V3_StreamedBodyResponse()
        streamed.body = body
        streamed.endOfStream = endOfStream
        var mutation = Envoy_Service_ExtProc_V3_BodyMutation()
        mutation.streamedResponse = streamed
        var body = Envoy_Service_ExtProc_V3_BodyResponse()
        body.response = common(nil)
        body.response.bodyMutation = mutation
        var r = ProcessingResponse()
        if request { r.requestBody = body } else { r.responseBody = body }
        return r
    }

    /// A BUFFERED / STREAMED body reply: `replacement` replaces the chunk (nil: unchanged).
    static func bodyReplace(_ replacement: Data?, headers: HeaderMutation? = nil, clearRouteCache: Bool = false,
                            metadata: Google_Protobuf_Struct? = nil, request: Bool) -> ProcessingResponse {
        var body = Envoy_Service_ExtProc_V3_BodyResponse()
        body.response = common(headers, clearRouteCache: clearRouteCache)
        if let replacement {
            var mutation = Envoy_Service_ExtProc_V3_BodyMutation()
            mutation.body = replacement
            body.response.bodyMutation = mutation
        }
        var r = ProcessingResponse()
        if request { r.requestBody = body } else { r.responseBody = body }
        if let metadata { r.dynamicMetadata = metadata }
        return r
    }

    static func trailers(request: Bool) -> ProcessingResponse {
        var r = ProcessingResponse()
        if request {
            r.requestTrailers = Envoy_Service_ExtProc_V3_TrailersResponse()
        } else {
            r.responseTrailers = Envoy_Service_ExtProc_V3_TrailersResponse()
        }
        return r
    }

    /// `envoy.lb` → `x-gateway-destination-endpoint`, read by the ORIGINAL_DST cluster.
    static func destinationMetadata(_ address: String) -> Google_Protobuf_Struct {
        var inner = Google_Protobuf_Struct()
        inner.fields[WireNames.destinationHeader] = Google_Protobuf_Value(stringValue: address)
        var outer = Google_Protobuf_Struct()
        outer.fields[WireNames.destinationMetadataNamespace] = Google_Protobuf_Value(structValue: inner)
        return outer
    }

    /// An error answered by the gateway itself, with an OpenAI-style JSON body.
    static func immediate(_ error: PickerError, requestID: String?) -> ProcessingResponse {
        var immediate = Envoy_Service_ExtProc_V3_ImmediateResponse()
        var status = Envoy_Type_V3_HttpStatus()
        status.code = Envoy_Type_V3_StatusCode(rawValue: error.status) ?? .badRequest
        immediate.status = status
        var headers = HeaderMutation()
        headers.setHeaders.append(setHeader("content-type", "application/json"))
        if let requestID { headers.setHeaders.append(setHeader(WireNames.requestIDHeader, requestID)) }
        immediate.headers = headers
        immediate.body = Data(error.jsonBody.utf8)
        immediate.details = error.details
        var r = ProcessingResponse()
        r.immediateResponse = immediate
        return r
    }
}

/// A request the picker refuses, with what the client and the access log see.
struct PickerError: Error {
    let status: Int
    let type: String
    let message: String
    /// `%RESPONSE_CODE_DETAILS%` in Envoy's access log.
    let details: String

    static func badRequest(_ message: String, details: String) -> PickerError {
        PickerError(status: 400, type: "invalid_request_error", message: message, details: details)
    }
    static func tooLarge(limit: Int) -> PickerError {
        PickerError(status: 413, type: "invalid_request_error",
                    message: "request body exceeds the limit of \(limit) bytes", details: "epp_request_body_too_large")
    }
    static func heldBodiesOverBudget(limit: Int) -> PickerError {
        PickerError(status: 503, type: "service_unavailable",
                    message: "the endpoint picker is holding its limit of \(limit) bytes of request bodies that wait for routing; retry later",
                    details: "epp_held_body_budget_exhausted")
    }
    static func noEndpoints(_ why: String) -> PickerError {
        PickerError(status: 503, type: "service_unavailable", message: why, details: "epp_no_endpoints")
    }
    static func saturated(objective: String) -> PickerError {
        PickerError(status: 429, type: "too_many_requests",
                    message: "the inference pool is saturated; sheddable objective '\(objective)' was not admitted",
                    details: "epp_pool_saturated")
    }
    static func queueTimeout(objective: String, waited: TimeAmount) -> PickerError {
        PickerError(status: 429, type: "too_many_requests",
                    message: "the inference pool stayed saturated; sheddable objective '\(objective)' waited \(waited.nanoseconds / 1_000_000) ms and was not admitted",
                    details: "epp_queue_timeout")
    }
    static func internalError(_ why: String) -> PickerError {
        PickerError(status: 500, type: "internal_error", message: why, details: "epp_internal_error")
    }

    var jsonBody: String {
        "{\"error\":{\"message\":\(jsonQuote(message)),\"type\":\(jsonQuote(type)),\"code\":\(status)}}"
    }
}

func jsonQuote(_ s: String) -> String {
    String(decoding: JSONStringEncoding.quoted(s), as: UTF8.self)
}
