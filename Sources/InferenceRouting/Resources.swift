// Kubernetes resource types in the JSON shape of the API server (also decodable from YAML
// via Yams). Unknown fields are ignored; wrong types fail with the coding path.

/// API groups and versions this EPP understands.
public enum InferenceAPI {
    public static let poolGroupV1 = "inference.networking.k8s.io"
    public static let poolGroupAlpha = "inference.networking.x-k8s.io"
    public static let poolAPIVersionV1 = "inference.networking.k8s.io/v1"
    public static let poolAPIVersionAlpha = "inference.networking.x-k8s.io/v1alpha2"
    /// apiVersions accepted for InferenceModelRewrite and InferenceObjective.
    public static let routingAPIVersions: Set<String> = ["inference.networking.x-k8s.io/v1alpha2", "llm-d.ai/v1alpha2"]
    public static let poolAPIVersions: Set<String> = [poolAPIVersionV1, poolAPIVersionAlpha]
}

/// Kubernetes `metadata`.
public struct ObjectMeta: Codable, Sendable, Equatable, Hashable {
    public var name: String
    public var namespace: String?
    public var uid: String?
    public var resourceVersion: String?
    public var generation: Int?
    /// RFC 3339 (`2024-05-01T10:00:00Z`), kept as the API server sends it.
    public var creationTimestamp: String?
    public var deletionTimestamp: String?
    public var labels: [String: String]?
    public var annotations: [String: String]?

    public init(name: String, namespace: String? = nil, uid: String? = nil, resourceVersion: String? = nil,
                generation: Int? = nil, creationTimestamp: String? = nil, deletionTimestamp: String? = nil,
                labels: [String: String]? = nil, annotations: [String: String]? = nil) {
        self.name = name
        self.namespace = namespace
        self.uid = uid
        self.resourceVersion = resourceVersion
        self.generation = generation
        self.creationTimestamp = creationTimestamp
        self.deletionTimestamp = deletionTimestamp
        self.labels = labels
        self.annotations = annotations
    }

    /// `namespace/name` (namespace `default` when unset).
    public var qualifiedName: String { "\(namespace ?? "default")/\(name)" }
}

/// A status condition (`metav1.Condition`).
public struct Condition: Codable, Sendable, Equatable, Hashable {
    public var type: String
    public var status: String
    public var reason: String?
    public var message: String?
    public var observedGeneration: Int?
    public var lastTransitionTime: String?

    public init(type: String, status: String, reason: String? = nil, message: String? = nil,
                observedGeneration: Int? = nil, lastTransitionTime: String? = nil) {
        self.type = type
        self.status = status
        self.reason = reason
        self.message = message
        self.observedGeneration = observedGeneration
        self.lastTransitionTime = lastTransitionTime
    }
}

/// Reference to an InferencePool (`spec.poolRef`).
public struct PoolReference: Codable, Sendable, Equatable, Hashable {
    /// Defaults to `inference.networking.k8s.io` when omitted.
    public var group: String?
    /// Defaults to `InferencePool` when omitted.
    public var kind: String?
    public var name: String

    public init(group: String? = nil, kind: String? = nil, name: String) {
        self.group = group
        self.kind = kind
        self.name = name
    }

    public var effectiveGroup: String { group.flatMap { $0.isEmpty ? nil : $0 } ?? InferenceAPI.poolGroupV1 }
    public var effectiveKind: String { kind.flatMap { $0.isEmpty ? nil : $0 } ?? "InferencePool" }
}

/// Status with conditions only.
public struct ConditionsStatus: Codable, Sendable, Equatable, Hashable {
    public var conditions: [Condition]?
    public init(conditions: [Condition]? = nil) { self.conditions = conditions }
}

/// InferenceModelRewrite: maps requested model names to weighted target models.
public struct InferenceModelRewrite: Codable, Sendable, Equatable, Hashable {
    public var apiVersion: String?
    public var kind: String?
    public var metadata: ObjectMeta
    public var spec: Spec
    public var status: ConditionsStatus?

    public struct Spec: Codable, Sendable, Equatable, Hashable {
        public var poolRef: PoolReference
        public var rules: [Rule]?
        public init(poolRef: PoolReference, rules: [Rule]? = nil) {
            self.poolRef = poolRef
            self.rules = rules
        }
    }

    public struct Rule: Codable, Sendable, Equatable, Hashable {
        /// OR-ed; empty or absent = matches every model.
        public var matches: [Match]?
        public var targets: [Target]?
        public init(matches: [Match]? = nil, targets: [Target]? = nil) {
            self.matches = matches
            self.targets = targets
        }
    }

    public struct Match: Codable, Sendable, Equatable, Hashable {
        public var model: ModelMatch
        public init(model: ModelMatch) { self.model = model }
    }

    public struct ModelMatch: Codable, Sendable, Equatable, Hashable {
        /// Only `Exact` (the default) is supported.
        public var type: String?
        public var value: String
        public init(type: String? = nil, value: String) {
            self.type = type
            self.value = value
        }
    }

    public struct Target: Codable, Sendable, Equatable, Hashable {
        public var modelRewrite: String
        /// 1...1,000,000; all omitted = uniform.
        public var weight: Int?
        public init(modelRewrite: String, weight: Int? = nil) {
            self.modelRewrite = modelRewrite
            self.weight = weight
        }
    }

    public init(apiVersion: String? = "inference.networking.x-k8s.io/v1alpha2", kind: String? = "InferenceModelRewrite",
                metadata: ObjectMeta, spec: Spec, status: ConditionsStatus? = nil) {
        self.apiVersion = apiVersion
        self.kind = kind
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }
}

/// InferenceObjective: names a request priority.
public struct InferenceObjective: Codable, Sendable, Equatable, Hashable {
    public var apiVersion: String?
    public var kind: String?
    public var metadata: ObjectMeta
    public var spec: Spec
    public var status: ConditionsStatus?

    public struct Spec: Codable, Sendable, Equatable, Hashable {
        /// Unset = 0; negative = sheddable.
        public var priority: Int?
        public var poolRef: PoolReference
        public init(priority: Int? = nil, poolRef: PoolReference) {
            self.priority = priority
            self.poolRef = poolRef
        }
    }

    public init(apiVersion: String? = "inference.networking.x-k8s.io/v1alpha2", kind: String? = "InferenceObjective",
                metadata: ObjectMeta, spec: Spec, status: ConditionsStatus? = nil) {
        self.apiVersion = apiVersion
        self.kind = kind
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }
}

/// InferencePool in either shape: v1 (`inference.networking.k8s.io/v1`) or v1alpha2
/// (`inference.networking.x-k8s.io/v1alpha2`). Use the normalized accessors.
public struct InferencePool: Codable, Sendable, Equatable, Hashable {
    public var apiVersion: String?
    public var kind: String?
    public var metadata: ObjectMeta
    public var spec: Spec

    public struct Spec: Codable, Sendable, Equatable, Hashable {
        /// v1: `{matchLabels: {...}}`; v1alpha2: a plain label map.
        public var selector: Selector
        /// v1.
        public var targetPorts: [Port]?
        /// v1alpha2.
        public var targetPortNumber: Int?
        /// v1: `http` or `kubernetes.io/h2c`.
        public var appProtocol: String?
        /// v1.
        public var endpointPickerRef: EndpointPickerRef?
        /// v1alpha2.
        public var extensionRef: ExtensionRef?

        public init(selector: Selector, targetPorts: [Port]? = nil, targetPortNumber: Int? = nil, appProtocol: String? = nil,
                    endpointPickerRef: EndpointPickerRef? = nil, extensionRef: ExtensionRef? = nil) {
            self.selector = selector
            self.targetPorts = targetPorts
            self.targetPortNumber = targetPortNumber
            self.appProtocol = appProtocol
            self.endpointPickerRef = endpointPickerRef
            self.extensionRef = extensionRef
        }
    }

    /// A label selector in either shape; re-encodes in the shape it was decoded from.
    public struct Selector: Codable, Sendable, Equatable, Hashable {
        public var matchLabels: [String: String]
        /// True for the v1 `{matchLabels: ...}` shape.
        public var isLabelSelector: Bool

        public init(matchLabels: [String: String], isLabelSelector: Bool = true) {
            self.matchLabels = matchLabels
            self.isLabelSelector = isLabelSelector
        }

        private struct LabelSelector: Codable { var matchLabels: [String: String]? }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let plain = try? c.decode([String: String].self), plain["matchLabels"] == nil {
                matchLabels = plain
                isLabelSelector = false
            } else {
                matchLabels = try c.decode(LabelSelector.self).matchLabels ?? [:]
                isLabelSelector = true
            }
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.singleValueContainer()
            if isLabelSelector { try c.encode(LabelSelector(matchLabels: matchLabels)) } else { try c.encode(matchLabels) }
        }
    }

    public struct Port: Codable, Sendable, Equatable, Hashable {
        public var number: Int
        public init(number: Int) { self.number = number }
    }

    public struct EndpointPickerRef: Codable, Sendable, Equatable, Hashable {
        public var group: String?
        public var kind: String?
        public var name: String
        public var port: Port?
        /// `FailOpen` | `FailClose`.
        public var failureMode: String?
        public init(group: String? = nil, kind: String? = nil, name: String, port: Port? = nil, failureMode: String? = nil) {
            self.group = group
            self.kind = kind
            self.name = name
            self.port = port
            self.failureMode = failureMode
        }
    }

    public struct ExtensionRef: Codable, Sendable, Equatable, Hashable {
        public var group: String?
        public var kind: String?
        public var name: String
        public var portNumber: Int?
        public var failureMode: String?
        public init(group: String? = nil, kind: String? = nil, name: String, portNumber: Int? = nil, failureMode: String? = nil) {
            self.group = group
            self.kind = kind
            self.name = name
            self.portNumber = portNumber
            self.failureMode = failureMode
        }
    }

    public init(apiVersion: String? = InferenceAPI.poolAPIVersionV1, kind: String? = "InferencePool", metadata: ObjectMeta, spec: Spec) {
        self.apiVersion = apiVersion
        self.kind = kind
        self.metadata = metadata
        self.spec = spec
    }

    /// Pod label selector, whichever API version.
    public var selectorLabels: [String: String] { spec.selector.matchLabels }

    /// Target ports, whichever API version (v1 `targetPorts[].number`, else `targetPortNumber`).
    public var targetPortNumbers: [Int] {
        if let ports = spec.targetPorts, !ports.isEmpty { return ports.map(\.number) }
        if let p = spec.targetPortNumber { return [p] }
        return []
    }

    /// The API group of this pool (from apiVersion; v1 group when absent).
    public var group: String {
        guard let v = apiVersion, let slash = v.firstIndex(of: "/") else { return InferenceAPI.poolGroupV1 }
        return String(v[..<slash])
    }
}
