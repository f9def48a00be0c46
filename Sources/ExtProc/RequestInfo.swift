import Foundation
import Protos
import Tracing

/// The OpenAI-compatible API a request path names, and the body field it requires.
enum InferenceAPIKind {
    case completions, chatCompletions, embeddings, responses, conversations, other

    /// Classifies by path suffix (query string ignored), comparing bytes: this runs per request.
    init(path: String) {
        var path = path
        self = path.withUTF8 { bytes in
            var end = bytes.firstIndex { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") } ?? bytes.count
            while end > 0 && bytes[end - 1] == UInt8(ascii: "/") { end -= 1 }
            let p = UnsafeBufferPointer(rebasing: bytes[0..<end])
            func ends(_ suffix: StaticString) -> Bool {
                let n = suffix.utf8CodeUnitCount
                return p.count >= n && memcmp(p.baseAddress! + (p.count - n), suffix.utf8Start, n) == 0
            }
            if ends("/chat/completions") { return .chatCompletions }
            if ends("/completions") { return .completions }
            if ends("/embeddings") { return .embeddings }
            if ends("/responses") { return .responses }
            if ends("/conversations") { return .conversations }
            return .other
        }
    }

    /// The top-level field a valid request must carry.
    var requiredField: String? {
        switch self {
        case .completions: return "prompt"
        case .chatCompletions: return "messages"
        case .embeddings, .responses: return "input"
        case .conversations, .other: return nil
        }
    }

    /// Whether the body must be a JSON object naming a model (else it passes through as is).
    var requiresModel: Bool { self != .other && self != .conversations }
}

/// What the picker needs from the request headers.
struct RequestInfo {
    var path = ""
    var method = ""
    var contentLength: Int?
    var requestID: String?
    var affinityHeaderValue: String?
    var modelRewriteHeader: String?
    var objective: String?
    /// `x-gateway-inference-fairness-id` (or llm-d's): the tenant or session whose waiting requests share
    /// the admission queue fairly with others'.
    var fairnessID: String?
    /// The gateway's `traceparent` (parsed only when tracing is on).
    var traceparent: TraceContext?
    /// `ip:port` list from the gateway's subset hint; nil when absent (all endpoints allowed).
    var subset: [String]?
    var api: InferenceAPIKind = .other

    init() {}

    /// The admission queue's flow: the fairness ID when the request names one, else its objective.
    var flow: String { fairnessID ?? objective ?? "" }

    init(_ headers: HeadersView, metadata: Envoy_Config_Core_V3_Metadata?, affinityHeader: String?,
         tracing: Bool = false) throws {
        let affinity = affinityHeader.map { Array($0.utf8) }
        try headers.forEach { key, value in
            guard let first = key.first else { return }
            // Only a few names matter; compare bytes and decode just those values.
            switch first {
            case UInt8(ascii: ":"):
                if key.equals(":path") { path = String(decoding: value, as: UTF8.self) }
                else if key.equals(":method") { method = String(decoding: value, as: UTF8.self) }
            case UInt8(ascii: "c"):
                if key.equals("content-length") { contentLength = Int(String(decoding: value, as: UTF8.self)) }
            case UInt8(ascii: "t"):
                if tracing && key.equals("traceparent") { traceparent = TraceContext(traceparent: value) }
            case UInt8(ascii: "x"):
                if key.equals("x-request-id") { requestID = String(decoding: value, as: UTF8.self) }
                else if key.equals("x-gateway-model-name-rewrite") || key.equals("x-llm-d-model-name-rewrite") {
                    modelRewriteHeader = String(decoding: value, as: UTF8.self)
                } else if key.equals("x-gateway-inference-objective") || key.equals("x-llm-d-inference-objective") {
                    objective = String(decoding: value, as: UTF8.self)
                } else if key.equals("x-gateway-inference-fairness-id") || key.equals("x-llm-d-inference-fairness-id") {
                    fairnessID = String(decoding: value, as: UTF8.self)
                }
            default:
                break
            }
            if let affinity, key.equals(affinity) { affinityHeaderValue = String(decoding: value, as: UTF8.self) }
        }
        api = InferenceAPIKind(path: path)
        if let hint = metadata?.filterMetadata[WireNames.subsetHintNamespace]?.fields[WireNames.subsetHintKey] {
            if case .listValue(let list)? = hint.kind {
                subset = list.values.compactMap { if case .stringValue(let s)? = $0.kind { return s } else { return nil } }
            } else if case .stringValue(let s)? = hint.kind {
                subset = s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            } else {
                subset = []
            }
        }
    }

    /// Envoy sends values in `raw_value`; older versions in `value`.
    static func value(_ header: Envoy_Config_Core_V3_HeaderValue) -> String {
        header.rawValue.isEmpty ? header.value : String(decoding: header.rawValue, as: UTF8.self)
    }
}
