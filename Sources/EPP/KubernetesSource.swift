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
    private let watcher: PoolWatcher
    private let task = TaskBox()

    init(options: EPPCommand, group: any EventLoopGroup, health: HealthStatusStore, logger: Logger) throws {
        let cluster = try ClusterConfig.load(kubeconfigPath: options.kubeconfig)
        let namespace = options.poolNamespace ?? cluster.namespace ?? "default"
        let poolName = options.poolName
        let poolGroup = options.poolGroup
        let client = KubernetesClient(config: cluster, eventLoopGroup: group, logger: logger)
        var config = PoolWatcherConfig(namespace: namespace, poolName: poolName, poolGroup: poolGroup)
        config.statusWriting = StatusWritingConfig(
            leaderElection: LeaderElectionConfig(namespace: namespace, leaseName: "epp-\(poolName)-status"))

        let state = RoutingState(RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(), endpoints: .empty, origin: "kubernetes"))
        self.state = state
        for service in ["", "readiness", ExtProcService.serviceName] { health.set(service, .notServing) }
        logger.info("Kubernetes mode", metadata: [
            "server": "\(cluster.serverURL)", "namespace": "\(namespace)", "pool": "\(poolName)", "group": "\(poolGroup)",
        ])
        watcher = PoolWatcher(client: client, config: config, logger: logger) { pool in
            let previous = state.snapshot
            let rules = RewriteRules(pool.rewrites, poolName: poolName, poolGroup: poolGroup, poolNamespace: namespace)
            let objectives = Objectives(pool.objectives, poolName: poolName, poolNamespace: namespace)
            let endpoints = EndpointSet(endpoints: pool.endpoints, previous: previous.endpoints)
            state.publish(RoutingSnapshot(rules: rules, objectives: objectives, endpoints: endpoints, origin: "kubernetes"))
            // As the reference EPP: ready once everything synced and the pool exists (without it
            // every request would be refused).
            let serving: HealthStatusStore.Status = pool.synced && pool.pool != nil ? .serving : .notServing
            for service in ["", "readiness", ExtProcService.serviceName] { health.set(service, serving) }
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
