import Foundation
import InferenceRouting
import Logging

/// Writes the `Accepted` condition of InferenceModelRewrites (`PATCH …/status`, JSON merge patch), only
/// when it differs from what the object already carries, and never twice for the same object version
/// (our own write comes back as a MODIFIED event, which then matches). Not thread-safe: one caller.
public final class RewriteStatusWriter: @unchecked Sendable {
    let client: KubernetesClient
    let namespace: String
    let logger: Logger
    /// key (group/ns/name) → (desired condition, resourceVersion of the object when we wrote it).
    private var written: [String: (Condition, String?)] = [:]
    /// The last failure logged per key: the same failure again (e.g. RBAC refusing every retry) is
    /// logged at debug only.
    private var lastFailure: [String: String] = [:]

    public init(client: KubernetesClient, namespace: String, logger: Logger) {
        self.client = client
        self.namespace = namespace
        self.logger = logger
    }

    /// The condition a validation asks for; `lastTransitionTime` kept from `existing` if the status is unchanged.
    public static func desiredCondition(_ v: RewriteValidation, existing: Condition?, now: Date = Date()) -> Condition {
        let status = v.accepted ? "True" : "False"
        let transition = (existing?.status == status ? existing?.lastTransitionTime : nil) ?? rfc3339(now)
        return Condition(type: "Accepted", status: status, reason: v.reason, message: v.message,
                         observedGeneration: v.generation, lastTransitionTime: transition)
    }

    /// Whether `existing` already says what `desired` says (transition time aside).
    public static func matches(_ existing: Condition?, _ desired: Condition) -> Bool {
        guard let e = existing else { return false }
        return e.status == desired.status && e.reason == desired.reason && e.message == desired.message
            && e.observedGeneration == desired.observedGeneration
    }

    /// Patches what differs. `rewrites` are (API group, object) pairs; `validations` from `RewriteRules`.
    /// Returns the number of failed writes (to retry later).
    @discardableResult
    public func reconcile(rewrites: [(group: String, rewrite: InferenceModelRewrite)], validations: [RewriteValidation]) async -> Int {
        var failures = 0
        var live = Set<String>()
        for v in validations {
            for (group, r) in rewrites where r.metadata.qualifiedName == v.resource {
                let key = "\(group)/\(v.resource)"
                live.insert(key)
                let conditions = r.status?.conditions ?? []
                let existing = conditions.first { $0.type == "Accepted" }
                let desired = Self.desiredCondition(v, existing: existing)
                if Self.matches(existing, desired) { continue }
                if let (last, rv) = written[key], Self.matches(last, desired), rv == r.metadata.resourceVersion {
                    continue  // already written for this version; waiting for it to come back
                }
                var newConditions = conditions.filter { $0.type != "Accepted" }
                newConditions.append(desired)
                let resource = ResourceDescriptor(group: group, version: "v1alpha2", plural: "inferencemodelrewrites", optional: true)
                let path = resource.objectPath(namespace: r.metadata.namespace ?? namespace, name: r.metadata.name, subresource: "status")
                do {
                    let body = try JSONEncoder().encode(StatusPatch(status: .init(conditions: newConditions)))
                    let response = try await client.send(.init(method: .PATCH, path: path, body: [UInt8](body),
                                                               contentType: "application/merge-patch+json"), timeout: .seconds(10))
                    _ = try response.checked(path: path)
                    written[key] = (desired, r.metadata.resourceVersion)
                    lastFailure[key] = nil
                    logger.info("wrote rewrite status", metadata: ["rewrite": "\(v.resource)", "accepted": "\(v.accepted)",
                                                                   "reason": "\(v.reason)", "generation": "\(v.generation.map(String.init) ?? "")"])
                } catch {
                    failures += 1
                    written[key] = nil
                    if let e = error as? KubernetesError, e.code == 404 { failures -= 1; continue }  // deleted meanwhile
                    let message = "\(error)"
                    if lastFailure[key] != message {
                        lastFailure[key] = message
                        let hint = (error as? KubernetesError)?.isAuthError == true
                            ? " (check RBAC: patch on inferencemodelrewrites/status)" : ""
                        logger.warning("cannot write rewrite status\(hint)", metadata: ["rewrite": "\(v.resource)", "error": "\(error)"])
                    } else {
                        logger.debug("cannot write rewrite status (again)", metadata: ["rewrite": "\(v.resource)", "error": "\(error)"])
                    }
                }
            }
        }
        written = written.filter { live.contains($0.key) }
        lastFailure = lastFailure.filter { live.contains($0.key) }
        return failures
    }

    private struct StatusPatch: Encodable {
        struct Status: Encodable { var conditions: [Condition] }
        var status: Status
    }
}
