import Foundation
import ExtProc
import GRPCServer
import InferenceRouting
import Kubernetes
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// Kubernetes mode: the pool, its pods and the rewrite / objective resources, watched live; every
/// change becomes a new routing snapshot; readiness follows "synced".
final class KubernetesSource: RoutingSource {
    let state: RoutingState
    /// The API client (also used to review tokens of metrics scrapers).
    let client: KubernetesClient
    private let watcher: PoolWatcher
    private let task = TaskBox()

    init(options: EPPCommand, group: any EventLoopGroup, health: HealthStatusStore, logger: Logger) throws {
        let cluster = try ClusterConfig.load(kubeconfigPath: options.kubeconfig)
        // As the reference: the flag, else $NAMESPACE (its Helm chart sets it from the pod), else the
        // service account's namespace.
        let environment = ProcessInfo.processInfo.environment["NAMESPACE"].flatMap { $0.isEmpty ? nil : $0 }
        let namespace = options.poolNamespace ?? environment ?? cluster.namespace ?? "default"
        let poolName = options.poolName
        let poolGroup = options.poolGroup
        let client = KubernetesClient(config: cluster, eventLoopGroup: group, logger: logger)
        self.client = client
        var config = PoolWatcherConfig(namespace: namespace, poolName: poolName, poolGroup: poolGroup)
        config.statusWriting = StatusWritingConfig(
            leaderElection: LeaderElectionConfig(namespace: namespace, leaseName: "epp-\(poolName)-status"))

        let state = RoutingState(RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(), endpoints: .empty, origin: "kubernetes"))
        self.state = state
        let readiness = Readiness(health: health, activePassive: options.haEnableLeaderElection)
        logger.info("Kubernetes mode", metadata: [
            "server": "\(cluster.serverURL)", "namespace": "\(namespace)", "pool": "\(poolName)", "group": "\(poolGroup)",
        ])
        var onLeadership: (@Sendable (Bool) -> Void)?
        if options.haEnableLeaderElection {
            onLeadership = { (leader: Bool) in
                logger.info(leader ? "leader: ready (active-passive)" : "not the leader: not ready (active-passive)")
                readiness.update(leader: leader)
            }
        }
        watcher = PoolWatcher(client: client, config: config, logger: logger, onLeadershipChange: onLeadership) { pool in
            let previous = state.snapshot
            let rules = RewriteRules(pool.rewrites, poolName: poolName, poolGroup: poolGroup, poolNamespace: namespace)
            let objectives = Objectives(pool.objectives, poolName: poolName, poolNamespace: namespace)
            let endpoints = EndpointSet(endpoints: pool.endpoints, previous: previous.endpoints)
            state.publish(RoutingSnapshot(rules: rules, objectives: objectives, endpoints: endpoints, origin: "kubernetes"))
            // As the reference EPP: ready once everything synced and the pool exists (without it
            // every request would be refused).
            readiness.update(synced: pool.synced && pool.pool != nil)
            logger.info("pool state", metadata: [
                "synced": "\(pool.synced)", "pool-found": "\(pool.pool != nil)", "endpoints": "\(pool.endpoints.count)",
                "rewrites": "\(pool.rewrites.count)", "objectives": "\(pool.objectives.count)",
            ])
        }
    }

    func start() {
        let watcher = self.watcher
        task.set(Task { await watcher.run() })
    }

    func stop() async { await task.cancelAndWait(upTo: .seconds(2)) }
}

/// Readiness in Kubernetes mode: synced (and, active-passive, holding the lease), told to every
/// readiness service name; liveness stays SERVING.
private final class Readiness: Sendable {
    private let health: HealthStatusStore
    private let state: NIOLockedValueBox<(synced: Bool, leader: Bool)>

    init(health: HealthStatusStore, activePassive: Bool) {
        self.health = health
        state = NIOLockedValueBox((false, !activePassive))
        publish(false)
    }

    func update(synced: Bool? = nil, leader: Bool? = nil) {
        let ready = state.withLockedValue { s in
            if let synced { s.synced = synced }
            if let leader { s.leader = leader }
            return s.synced && s.leader
        }
        publish(ready)
    }

    private func publish(_ ready: Bool) {
        for service in EPPApp.readinessServices { health.set(service, ready ? .serving : .notServing) }
    }
}

/// Holds the watch task so it can be cancelled at shutdown.
private final class TaskBox: Sendable {
    private let box = NIOLockedValueBox<Task<Void, Never>?>(nil)
    func set(_ t: Task<Void, Never>) { box.withLockedValue { $0 = t } }
    /// Cancels the task and waits (bounded) for it to end, so nothing touches the event loops after
    /// they shut down.
    func cancelAndWait(upTo limit: Duration) async {
        guard let task = box.withLockedValue({ $0 }) else { return }
        task.cancel()
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await task.value }
            group.addTask { try? await Task.sleep(for: limit) }
            await group.next()
            group.cancelAll()
        }
    }
}
