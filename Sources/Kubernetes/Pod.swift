/// The parts of a core/v1 Pod the endpoint picker needs.
public struct Pod: Codable, Sendable, Equatable {
    public struct Metadata: Codable, Sendable, Equatable {
        public var name: String
        public var namespace: String?
        public var labels: [String: String]?
        public var annotations: [String: String]?
        public var deletionTimestamp: String?
    }
    public struct Status: Codable, Sendable, Equatable {
        public struct PodCondition: Codable, Sendable, Equatable {
            public var type: String
            public var status: String
        }
        public var phase: String?
        public var podIP: String?
        public var conditions: [PodCondition]?
    }
    public var metadata: Metadata
    public var status: Status?

    public init(metadata: Metadata, status: Status? = nil) {
        self.metadata = metadata
        self.status = status
    }

    /// Ready=True, not terminating, with an IP.
    public var isServing: Bool {
        guard metadata.deletionTimestamp == nil, let ip = status?.podIP, !ip.isEmpty else { return false }
        return status?.conditions?.contains { $0.type == "Ready" && $0.status == "True" } ?? false
    }

    /// Ports listed in the `llm-d.ai/active-ports` annotation (comma-separated); nil when absent.
    public var activePorts: Set<Int>? {
        guard let text = metadata.annotations?["llm-d.ai/active-ports"] else { return nil }
        return Set(text.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) })
    }
}
