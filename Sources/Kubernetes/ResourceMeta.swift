import Foundation

/// The object metadata the Kubernetes layer itself needs (independent of the typed object).
public struct ResourceMeta: Codable, Sendable, Equatable {
    public var name: String?
    public var namespace: String?
    public var uid: String?
    public var resourceVersion: String?
    public var generation: Int64?
    public var creationTimestamp: String?
    public var deletionTimestamp: String?
    public var labels: [String: String]?
    public var annotations: [String: String]?

    public init(name: String? = nil, namespace: String? = nil, uid: String? = nil, resourceVersion: String? = nil,
                generation: Int64? = nil, creationTimestamp: String? = nil, deletionTimestamp: String? = nil,
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

    /// Cache key: `namespace/name` (or `name` for cluster-scoped objects).
    public var key: String { (namespace.map { $0 + "/" } ?? "") + (name ?? "") }

    // Lenient: a field of the wrong type is treated as absent (the typed object decides validity).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try? c.decodeIfPresent(String.self, forKey: .name)
        namespace = try? c.decodeIfPresent(String.self, forKey: .namespace)
        uid = try? c.decodeIfPresent(String.self, forKey: .uid)
        resourceVersion = try? c.decodeIfPresent(String.self, forKey: .resourceVersion)
        generation = try? c.decodeIfPresent(Int64.self, forKey: .generation)
        creationTimestamp = try? c.decodeIfPresent(String.self, forKey: .creationTimestamp)
        deletionTimestamp = try? c.decodeIfPresent(String.self, forKey: .deletionTimestamp)
        labels = try? c.decodeIfPresent([String: String].self, forKey: .labels)
        annotations = try? c.decodeIfPresent([String: String].self, forKey: .annotations)
    }
}

/// One `status.conditions[]` entry, as the layer reads and writes it.
public struct ResourceCondition: Codable, Sendable, Equatable {
    public var type: String
    public var status: String
    public var reason: String?
    public var message: String?
    public var observedGeneration: Int64?
    public var lastTransitionTime: String?

    public init(type: String, status: String, reason: String? = nil, message: String? = nil,
                observedGeneration: Int64? = nil, lastTransitionTime: String? = nil) {
        self.type = type
        self.status = status
        self.reason = reason
        self.message = message
        self.observedGeneration = observedGeneration
        self.lastTransitionTime = lastTransitionTime
    }
}

/// `spec.poolRef` as InferenceModelRewrite / InferenceObjective carry it.
public struct PoolReference: Codable, Sendable, Equatable {
    public var group: String?
    public var kind: String?
    public var name: String?
}

/// Fields read from every object besides the typed decoding: `spec.poolRef` and `status.conditions`.
public struct ResourceProbe: Sendable, Equatable {
    public var poolRef: PoolReference?
    public var conditions: [ResourceCondition]?

    public init(poolRef: PoolReference? = nil, conditions: [ResourceCondition]? = nil) {
        self.poolRef = poolRef
        self.conditions = conditions
    }
}

extension ResourceProbe: Decodable {
    private struct Spec: Decodable { var poolRef: PoolReference? }
    private struct Status: Decodable { var conditions: [ResourceCondition]? }
    private enum Keys: String, CodingKey { case spec, status }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        poolRef = (try? c.decodeIfPresent(Spec.self, forKey: .spec))?.poolRef
        conditions = (try? c.decodeIfPresent(Status.self, forKey: .status))?.conditions
    }
}

/// A cached object: the layer's own view of its metadata plus the typed object.
public struct KubeObject<T: Sendable>: Sendable {
    public var meta: ResourceMeta
    public var object: T
    public var probe: ResourceProbe

    public init(meta: ResourceMeta, object: T, probe: ResourceProbe = ResourceProbe()) {
        self.meta = meta
        self.object = object
        self.probe = probe
    }
}

/// One item of a list or the object of a watch event, decoded leniently: metadata and probe always,
/// the typed object as a result so that a bad object can be skipped (and named in the log).
struct LenientItem<T: Decodable & Sendable>: Decodable, Sendable {
    var meta: ResourceMeta?
    var kind: String?
    var status: APIStatus?
    var probe: ResourceProbe
    var result: Result<T, ItemDecodingFailure>

    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: AnyKey.self)
        meta = try? c.decodeIfPresent(ResourceMeta.self, forKey: AnyKey(stringValue: "metadata"))
        kind = try? c.decodeIfPresent(String.self, forKey: AnyKey(stringValue: "kind"))
        if kind == "Status" {
            status = try? APIStatus(from: decoder)
        }
        probe = (try? ResourceProbe(from: decoder)) ?? ResourceProbe()
        do {
            result = .success(try T(from: decoder))
        } catch {
            result = .failure(ItemDecodingFailure(description: describeDecodingError(error)))
        }
    }
}

struct ItemDecodingFailure: Error, Sendable {
    var description: String
}

struct WatchEventEnvelope<T: Decodable & Sendable>: Decodable, Sendable {
    var type: String
    var object: LenientItem<T>
}

struct ListEnvelope<T: Decodable & Sendable>: Decodable, Sendable {
    struct ListMeta: Decodable, Sendable {
        var resourceVersion: String?
        var `continue`: String?
    }
    var metadata: ListMeta?
    var items: [LenientItem<T>]?
}
