import Foundation

/// A `Status` object as the API server returns it with error responses and ERROR watch events.
public struct APIStatus: Codable, Sendable, Equatable {
    public var status: String?
    public var message: String?
    public var reason: String?
    public var code: Int?

    public init(status: String? = nil, message: String? = nil, reason: String? = nil, code: Int? = nil) {
        self.status = status
        self.message = message
        self.reason = reason
        self.code = code
    }
}

/// Errors of the Kubernetes layer.
public enum KubernetesError: Error, Sendable, CustomStringConvertible {
    /// A non-2xx answer; `status` is the decoded `Status` body when there was one.
    case http(code: Int, status: APIStatus?, path: String)
    /// The watch stream reported an `ERROR` event.
    case watchError(APIStatus)
    /// The connection closed before the response was complete.
    case connectionClosed(String)
    /// A request ran past its deadline.
    case timeout(String)
    /// A response could not be decoded.
    case decoding(String)
    /// Configuration (kubeconfig, in-cluster files) is missing or invalid.
    case configuration(String)

    public var description: String {
        switch self {
        case let .http(code, status, path):
            let detail = [status?.reason, status?.message].compactMap { $0 }.joined(separator: ": ")
            return "HTTP \(code) for \(path)\(detail.isEmpty ? "" : " (\(detail))")"
        case let .watchError(status):
            return "watch ERROR event code \(status.code.map(String.init) ?? "?") \(status.reason ?? ""): \(status.message ?? "")"
        case let .connectionClosed(what): return "connection closed: \(what)"
        case let .timeout(what): return "timed out: \(what)"
        case let .decoding(what): return "cannot decode: \(what)"
        case let .configuration(what): return "configuration: \(what)"
        }
    }

    /// HTTP status code, or the code of a watch ERROR event.
    public var code: Int? {
        switch self {
        case let .http(code, _, _): return code
        case let .watchError(status): return status.code
        default: return nil
        }
    }

    /// 410 Gone: the resourceVersion (or a continue token) expired; relist.
    public var isGone: Bool { code == 410 }
    /// 401/403: credentials or RBAC.
    public var isAuthError: Bool { code == 401 || code == 403 }
}

/// A readable description of a `DecodingError` (path + problem), for "skipped object" logs.
func describeDecodingError(_ error: any Error) -> String {
    guard let error = error as? DecodingError else { return String(describing: error) }
    func path(_ keys: [any CodingKey]) -> String {
        var out = ""
        for key in keys {
            if let index = key.intValue { out += "[\(index)]" } else { out += (out.isEmpty ? "" : ".") + key.stringValue }
        }
        return out.isEmpty ? "<root>" : out
    }
    switch error {
    case let .typeMismatch(type, ctx): return "\(path(ctx.codingPath)): expected \(type) (\(ctx.debugDescription))"
    case let .valueNotFound(type, ctx): return "\(path(ctx.codingPath)): missing \(type) value"
    case let .keyNotFound(key, ctx): return "\(path(ctx.codingPath + [key])): required field missing"
    case let .dataCorrupted(ctx): return "\(path(ctx.codingPath)): \(ctx.debugDescription)"
    @unknown default: return String(describing: error)
    }
}
