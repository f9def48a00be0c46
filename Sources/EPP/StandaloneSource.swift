import ExtProc
import InferenceRouting
import Logging

/// Standalone mode: endpoints from `--endpoints`, rules from the manifests in `--config-dir`
/// (watched; a broken file keeps its last good content).
/// Where routing snapshots come from: manifests on disk or the Kubernetes API.
protocol RoutingSource: Sendable {
    var state: RoutingState { get }
    func start()
    func stop() async
}

final class StandaloneSource: RoutingSource {
    let state: RoutingState
    private let watcher: ConfigDirectoryWatcher?

    init(configDir: String?, endpoints: [Endpoint], poolName: String?, poolGroup: String, logger: Logger) {
        let endpointSet = EndpointSet(endpoints: endpoints)
        let state = RoutingState(RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(), endpoints: endpointSet, origin: "standalone"))
        self.state = state
        guard let configDir else {
            watcher = nil
            return
        }
        let apply: @Sendable (ManifestSnapshot) -> Void = { manifests in
            Self.apply(manifests, to: state, endpoints: endpointSet, poolName: poolName, poolGroup: poolGroup, logger: logger)
        }
        let watcher = ConfigDirectoryWatcher(directory: configDir, onChange: apply)
        // Load once now so the very first request already obeys the rules.
        apply(watcher.loadNow())
        self.watcher = watcher
    }

    func start() { watcher?.start() }
    func stop() { watcher?.stop() }

    private static func apply(_ manifests: ManifestSnapshot, to state: RoutingState, endpoints: EndpointSet,
                              poolName: String?, poolGroup: String, logger: Logger) {
        for error in manifests.errors {
            logger.error("manifest rejected; its last good content stays in force", metadata: [
                "file": "\(error.file)", "line": "\(error.line)", "error": "\(error.message)",
            ])
        }
        let rules = RewriteRules(manifests.rewrites, poolName: poolName, poolGroup: poolGroup)
        for v in rules.validations where !v.accepted {
            logger.warning("InferenceModelRewrite not accepted", metadata: [
                "rewrite": "\(v.resource)", "reason": "\(v.reason)", "message": "\(v.message)",
            ])
        }
        let objectives = Objectives(manifests.objectives, poolName: poolName)
        state.publish(RoutingSnapshot(rules: rules, objectives: objectives, endpoints: endpoints, origin: "config-dir"))
        logger.info("rules loaded", metadata: [
            "rewrites": "\(manifests.rewrites.count)", "accepted": "\(rules.validations.filter(\.accepted).count)",
            "objectives": "\(objectives.count)", "errors": "\(manifests.errors.count)",
        ])
    }
}
