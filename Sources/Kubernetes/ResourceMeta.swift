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

/// A cached object: the layer's own view of its metadata plus the typed object.
public struct KubeObject<T: Sendable>: Sendable {
    public var meta: ResourceMeta
    public var object: T

    public init(meta: ResourceMeta, object: T) {
        self.meta = meta
        self.object = object
    }
}

/// One item of a list or the object of a watch event, decoded leniently: metadata and probe always,
/// the typed object as a result so that a bad object can be skipped (and named in the log).
/// (`kind: Status` objects of ERROR events also decode their `code`/`reason`/`message`.)
struct LenientItem<T: Decodable & Sendable>: Decodable, Sendable {
    var meta: ResourceMeta?
    var kind: String?
    var status: APIStatus?
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
