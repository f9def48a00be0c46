import Atomics
import InferenceRouting
import NIOConcurrencyHelpers

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
    private let endpointObservers = NIOLockedValueBox<[@Sendable (EndpointSet) -> Void]>([])

    public init(_ initial: RoutingSnapshot) {
        current = ManagedAtomic(initial)
    }

    /// The snapshot in force now (lock-free).
    public var snapshot: RoutingSnapshot { current.load(ordering: .acquiring) }

    /// Replaces the snapshot; requests that already started keep theirs. Observers of the endpoints
    /// run here, on the publisher's thread, when the endpoint set is a new one.
    public func publish(_ snapshot: RoutingSnapshot) {
        let old = current.exchange(snapshot, ordering: .acquiringAndReleasing)
        guard old.endpoints !== snapshot.endpoints else { return }
        for observer in endpointObservers.withLockedValue({ $0 }) { observer(snapshot.endpoints) }
    }

    /// Calls `observer` with every new endpoint set published from now on (e.g. to forget
    /// per-endpoint state of pods that left the pool).
    public func onEndpointsChange(_ observer: @escaping @Sendable (EndpointSet) -> Void) {
        endpointObservers.withLockedValue { $0.append(observer) }
    }
}
