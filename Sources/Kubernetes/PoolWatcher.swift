import Foundation
import InferenceRouting
import Logging
import NIOConcurrencyHelpers

/// What the pool watcher publishes: everything the request path needs, derived from the API server.
public struct PoolState: Sendable, Equatable {
    /// The watched InferencePool; nil while it does not exist (then `endpoints` is empty).
    public var pool: InferencePool?
    /// Ready, non-terminating pods with an IP × each target port (honouring `llm-d.ai/active-ports`),
    /// sorted by pod name then port.
    public var endpoints: [Endpoint]
    /// InferenceModelRewrites whose `poolRef.name` is this pool (all groups watched), oldest first.
    /// Validation (group/kind, weights, conflicts) is `RewriteRules`' job.
    public var rewrites: [InferenceModelRewrite]
    /// InferenceObjectives whose `poolRef.name` is this pool, oldest first.
    public var objectives: [InferenceObjective]
    /// True once the pool, its pods and the rewrite/objective collections each completed an initial list
    /// (an optional CRD that is not installed counts as listed, empty).
    public var synced: Bool

    public init(pool: InferencePool? = nil, endpoints: [Endpoint] = [], rewrites: [InferenceModelRewrite] = [],
                objectives: [InferenceObjective] = [], synced: Bool = false) {
        self.pool = pool
        self.endpoints = endpoints
        self.rewrites = rewrites
        self.objectives = objectives
        self.synced = synced
    }
}

/// Configuration of a `PoolWatcher`.
public struct PoolWatcherConfig: Sendable {
    public var namespace: String
    public var poolName: String
    /// `inference.networking.k8s.io` (v1, default) or `inference.networking.x-k8s.io` (v1alpha2).
    public var poolGroup: String
    /// Groups (version v1alpha2) watched for InferenceModelRewrite and InferenceObjective; each is optional.
    public var routingGroups: [String] = ["inference.networking.x-k8s.io", "llm-d.ai"]
    /// Timing template for every reflector (its selectors are ignored).
    public var reflector = ReflectorOptions()
    /// Changes within this window are published together.
    public var debounce: Duration = .milliseconds(5)
    /// Write `status.conditions` of the served InferenceModelRewrites; nil = never write.
    public var statusWriting: StatusWritingConfig?

    public init(namespace: String, poolName: String, poolGroup: String = InferenceAPI.poolGroupV1) {
        self.namespace = namespace
        self.poolName = poolName
        self.poolGroup = poolGroup
    }

    /// v1 for `inference.networking.k8s.io`, v1alpha2 otherwise.
    public var poolVersion: String { poolGroup == InferenceAPI.poolGroupV1 ? "v1" : "v1alpha2" }
}

/// Status writing: who writes, and how often failed writes are retried.
public struct StatusWritingConfig: Sendable {
    /// Lease-based election among replicas; nil = this replica always writes (single replica).
    public var leaderElection: LeaderElectionConfig?
    /// Delay before retrying after a failed PATCH.
    public var retryDelay: Duration = .seconds(2)

    public init(leaderElection: LeaderElectionConfig?) {
        self.leaderElection = leaderElection
    }
}

/// Watches one InferencePool, the Pods matching its selector and the InferenceModelRewrites /
/// InferenceObjectives naming it, and publishes a `PoolState` on every change (debounced). When the pool's
/// selector changes the pod watch restarts with the new label selector; a deleted pool empties the
/// endpoints. Optionally writes rewrite status conditions (leader only).
public final class PoolWatcher: Sendable {
    public let config: PoolWatcherConfig
    let client: KubernetesClient
    let logger: Logger
    let onChange: @Sendable (PoolState) -> Void
    private let state = NIOLockedValueBox(Inner())
    private let signals: AsyncStream<Void>
    private let signal: AsyncStream<Void>.Continuation
    private let statusSignals: AsyncStream<Void>
    private let statusSignal: AsyncStream<Void>.Continuation
    private let selectorChanges: AsyncStream<[String: String]?>
    private let selectorChange: AsyncStream<[String: String]?>.Continuation
    let elector: LeaderElector?

    struct Inner {
        var pool: KubeObject<InferencePool>?
        var poolSynced = false
        var podSelector: [String: String]?
        var podEpoch = 0
        var pods: [String: KubeObject<Pod>] = [:]
        var podsSynced = false
        var rewrites: [String: ReflectorSnapshot<InferenceModelRewrite>] = [:]
        var objectives: [String: ReflectorSnapshot<InferenceObjective>] = [:]
        var published: PoolState?
    }

    /// - Parameter onLeadershipChange: told when this replica gains or loses the status lease.
    public init(client: KubernetesClient, config: PoolWatcherConfig, logger: Logger,
                onLeadershipChange: (@Sendable (Bool) -> Void)? = nil,
                onChange: @escaping @Sendable (PoolState) -> Void) {
        self.client = client
        self.config = config
        var logger = logger
        logger[metadataKey: "pool"] = "\(config.namespace)/\(config.poolName)"
        self.logger = logger
        self.onChange = onChange
        (signals, signal) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        (statusSignals, statusSignal) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        (selectorChanges, selectorChange) = AsyncStream.makeStream(of: [String: String]?.self, bufferingPolicy: .unbounded)
        let statusSignal = self.statusSignal
        elector = config.statusWriting?.leaderElection.map {
            LeaderElector(client: client, config: $0, logger: logger) { leader in
                if leader { statusSignal.yield() }
                onLeadershipChange?(leader)
            }
        }
    }

    /// The latest published state.
    public var currentState: PoolState { state.withLockedValue { $0.published ?? PoolState() } }

    /// Whether this replica writes status (always true without leader election; false without status writing).
    public var isStatusWriter: Bool {
        guard config.statusWriting != nil else { return false }
        return elector?.isLeader ?? true
    }

    /// Runs all watches until the task is cancelled.
    public func run() async {
        logger.info("watching pool", metadata: ["group": "\(config.poolGroup)/\(config.poolVersion)"])
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.runPublisher() }
            group.addTask { await self.runPoolReflector() }
            group.addTask { await self.runPodReflectors() }
            for g in config.routingGroups {
                group.addTask { await self.runRewrites(group: g) }
                group.addTask { await self.runObjectives(group: g) }
            }
            if config.statusWriting != nil {
                group.addTask { await self.runStatusWriter() }
                if let elector {
                    group.addTask {
                        await elector.run()
                        // Hand the lease over at once on shutdown; run outside this (cancelled) task, bounded.
                        let release = Task.detached { await elector.release() }
                        _ = await release.value
                    }
                }
            }
            await group.waitForAll()
        }
    }

    // MARK: Reflectors

    private func options(label: String? = nil, field: String? = nil) -> ReflectorOptions {
        var o = config.reflector
        o.labelSelector = label
        o.fieldSelector = field
        return o
    }

    private func runPoolReflector() async {
        let resource = ResourceDescriptor(group: config.poolGroup, version: config.poolVersion, plural: "inferencepools", optional: true)
        let apiVersion = "\(config.poolGroup)/\(config.poolVersion)"
        let reflector = Reflector<InferencePool>(client: client, resource: resource, namespace: config.namespace,
                                                 options: options(field: "metadata.name=\(config.poolName)"), logger: logger) { [self] snap in
            var pool = snap.objects.values.first { $0.meta.name == config.poolName }
            if pool != nil, pool!.object.apiVersion == nil { pool!.object.apiVersion = apiVersion }
            let selector: [String: String]? = pool.map { $0.object.selectorLabels }
            let changed = state.withLockedValue { s -> Bool in
                s.pool = pool
                // An InferencePool CRD that is not installed means: no pool (not synced).
                s.poolSynced = snap.synced && snap.installed
                if s.podSelector != selector {
                    s.podSelector = selector
                    s.podEpoch += 1
                    s.pods = [:]
                    s.podsSynced = selector == nil
                    return true
                }
                return false
            }
            if changed { selectorChange.yield(selector) }
            signal.yield()
        }
        await reflector.run()
    }

    private func runPodReflectors() async {
        var current: Task<Void, Never>?
        for await selector in selectorChanges {
            current?.cancel()
            current = nil
            let epoch = state.withLockedValue { $0.podEpoch }
            guard let selector else {
                logger.info("pool absent: no pods watched, endpoints empty")
                continue
            }
            if selector.isEmpty {
                logger.warning("pool selector is empty: selecting no pods")
                state.withLockedValue { s in if s.podEpoch == epoch { s.podsSynced = true } }
                signal.yield()
                continue
            }
            let labelSelector = selector.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
            logger.info("watching pods", metadata: ["labelSelector": "\(labelSelector)"])
            let reflector = Reflector<Pod>(client: client, resource: .pods, namespace: config.namespace,
                                           options: options(label: labelSelector), logger: logger) { [self] snap in
                let current = state.withLockedValue { s -> Bool in
                    guard s.podEpoch == epoch else { return false }  // a stale reflector (selector changed)
                    s.pods = snap.objects
                    s.podsSynced = snap.synced
                    return true
                }
                if current { signal.yield() }
            }
            current = Task { await reflector.run() }
        }
        current?.cancel()
    }

    private func runRewrites(group: String) async {
        let resource = ResourceDescriptor(group: group, version: "v1alpha2", plural: "inferencemodelrewrites", optional: true)
        let reflector = Reflector<InferenceModelRewrite>(client: client, resource: resource, namespace: config.namespace,
                                                         options: options(), logger: logger) { [self] snap in
            state.withLockedValue { $0.rewrites[group] = snap }
            signal.yield()
        }
        await reflector.run()
    }

    private func runObjectives(group: String) async {
        let resource = ResourceDescriptor(group: group, version: "v1alpha2", plural: "inferenceobjectives", optional: true)
        let reflector = Reflector<InferenceObjective>(client: client, resource: resource, namespace: config.namespace,
                                                      options: options(), logger: logger) { [self] snap in
            state.withLockedValue { $0.objectives[group] = snap }
            signal.yield()
        }
        await reflector.run()
    }

    // MARK: Derivation and publishing

    private func runPublisher() async {
        for await _ in signals {
            if config.debounce > .zero {
                do { try await Task.sleep(for: config.debounce) } catch { return }
            }
            let next = state.withLockedValue { s -> PoolState? in
                let derived = Self.derive(s, config: config)
                guard derived != s.published else { return nil }
                s.published = derived
                return derived
            }
            if let next {
                logger.debug("pool state changed", metadata: ["endpoints": "\(next.endpoints.count)", "rewrites": "\(next.rewrites.count)",
                                                              "objectives": "\(next.objectives.count)", "synced": "\(next.synced)"])
                onChange(next)
                statusSignal.yield()
            }
        }
    }

    static func derive(_ s: Inner, config: PoolWatcherConfig) -> PoolState {
        var out = PoolState()
        out.pool = s.pool?.object
        if let pool = s.pool?.object, let selector = s.podSelector, !selector.isEmpty {
            let ports = pool.targetPortNumbers
            for podObject in s.pods.values.sorted(by: { ($0.object.metadata.name) < ($1.object.metadata.name) }) {
                let pod = podObject.object
                guard pod.isServing, let ip = pod.status?.podIP,
                      selector.allSatisfy({ pod.metadata.labels?[$0.key] == $0.value }) else { continue }
                let active = pod.activePorts
                for port in ports where active?.contains(port) ?? true {
                    out.endpoints.append(Endpoint(host: ip, port: port, podName: pod.metadata.name))
                }
            }
        }
        var rewrites: [InferenceModelRewrite] = []
        for (group, snap) in s.rewrites.sorted(by: { $0.key < $1.key }) {
            for obj in snap.objects.values where obj.object.spec.poolRef.name == config.poolName {
                var r = obj.object
                if r.apiVersion == nil { r.apiVersion = "\(group)/v1alpha2" }
                rewrites.append(r)
            }
        }
        out.rewrites = rewrites.sorted(by: Self.olderFirst)
        var objectives: [InferenceObjective] = []
        for (group, snap) in s.objectives.sorted(by: { $0.key < $1.key }) {
            for obj in snap.objects.values where obj.object.spec.poolRef.name == config.poolName {
                var o = obj.object
                if o.apiVersion == nil { o.apiVersion = "\(group)/v1alpha2" }
                objectives.append(o)
            }
        }
        out.objectives = objectives.sorted { a, b in
            (a.metadata.creationTimestamp ?? "", a.metadata.name, a.apiVersion ?? "")
                < (b.metadata.creationTimestamp ?? "", b.metadata.name, b.apiVersion ?? "")
        }
        let rulesSynced = config.routingGroups.allSatisfy { g in
            (s.rewrites[g]?.synced ?? false) && (s.objectives[g]?.synced ?? false)
        }
        out.synced = s.poolSynced && (s.podSelector == nil || s.podsSynced) && rulesSynced
        return out
    }

    static func olderFirst(_ a: InferenceModelRewrite, _ b: InferenceModelRewrite) -> Bool {
        (a.metadata.creationTimestamp ?? "", a.metadata.name, a.apiVersion ?? "")
            < (b.metadata.creationTimestamp ?? "", b.metadata.name, b.apiVersion ?? "")
    }

    // MARK: Status

    private func runStatusWriter() async {
        let writer = RewriteStatusWriter(client: client, namespace: config.namespace, logger: logger)
        let retry = config.statusWriting?.retryDelay ?? .seconds(2)
        var failedRounds = 0
        for await _ in statusSignals {
            guard isStatusWriter else { continue }
            let (rewrites, poolGroup) = state.withLockedValue { s -> ([(String, InferenceModelRewrite)], String) in
                var list: [(String, InferenceModelRewrite)] = []
                for (group, snap) in s.rewrites {
                    for obj in snap.objects.values where obj.object.spec.poolRef.name == config.poolName {
                        var r = obj.object
                        if r.apiVersion == nil { r.apiVersion = "\(group)/v1alpha2" }
                        list.append((group, r))
                    }
                }
                return (list, config.poolGroup)
            }
            let rules = RewriteRules(rewrites.map(\.1), poolName: config.poolName, poolGroup: poolGroup, poolNamespace: config.namespace)
            let failures = await writer.reconcile(rewrites: rewrites, validations: rules.validations)
            if failures > 0 {
                // Retry, backing off while writes keep failing (RBAC refusing them, say): 2 s, 4 s, … 1 min.
                // A change to the rewrites signals at once anyway.
                failedRounds += 1
                let delay = min(retry * (1 << min(failedRounds - 1, 5)), .seconds(60))
                let signal = statusSignal
                Task {
                    try? await Task.sleep(for: delay)
                    signal.yield()
                }
            } else {
                failedRounds = 0
            }
        }
    }
}
