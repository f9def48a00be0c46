import Atomics
import InferenceRouting

/// Everything a request needs to be routed, frozen: rules, objectives, endpoints.
///
/// Built off the request path (config watcher, Kubernetes reflectors) and swapped in atomically;
/// a request reads one snapshot and never waits for an update.
public final class RoutingSnapshot: AtomicReference, Sendable {
    public let rules: RewriteRules
    public let objectives: Objectives
    public let endpoints: EndpointSet
    /// Free text naming where this came from (logs).
    public let origin: String

    public init(rules: RewriteRules, objectives: Objectives, endpoints: EndpointSet, origin: String) {
        self.rules = rules
        self.objectives = objectives
        self.endpoints = endpoints
        self.origin = origin
    }
}

/// The current snapshot, replaced as a whole.
public final class RoutingState: Sendable {
    private let current: ManagedAtomic<RoutingSnapshot>

    public init(_ initial: RoutingSnapshot) {
        current = ManagedAtomic(initial)
    }

    /// The snapshot in force now (lock-free).
    public var snapshot: RoutingSnapshot { current.load(ordering: .acquiring) }

    /// Replaces the snapshot; requests that already started keep theirs.
    public func publish(_ snapshot: RoutingSnapshot) {
        current.store(snapshot, ordering: .releasing)
    }
}
