import Yams

/// The reference EPP's plugin configuration (`EndpointPickerConfig`,
/// `inference.networking.x-k8s.io/v1alpha1`, given with `--config-file` / `--config-text`), read for
/// what this picker has: the weights of its scorers and the prefix scorer's block parameters. So a
/// Helm chart or manifest written for the reference configures this picker the same way.
///
/// One scheduling profile is used (the one named `default`, else the first). Scorers it does not
/// reference are off (weight 0); a referenced scorer without `weight` weighs 1, as in the reference.
/// Plugin types this picker does not have (filters, other pickers, profile handlers for prefill /
/// decode disaggregation) are reported in `notes` and ignored; a malformed document, an unknown
/// `pluginRef` or a negative weight is an error.
public struct EndpointPickerConfig: Sendable, Equatable {
    public var queueWeight: Double = 0
    public var kvCacheWeight: Double = 0
    public var prefixWeight: Double = 0
    public var loraWeight: Double = 0
    /// Prefix-cache scorer parameters, when given (`hashBlockSize` characters, or `blockSizeTokens`
    /// × 4; rounded up to a multiple of 8), and `maxPrefixBlocksToMatch`.
    public var prefixBlockBytes: Int?
    public var prefixMaxBlocks: Int?
    /// The picker's `maxNumOfEndpoints`: endpoints per request, the first primary, the rest the
    /// gateway's fallbacks.
    public var maxEndpoints: Int?
    /// What was ignored, for the log.
    public var notes: [String] = []

    public init() {}

    public struct Error: Swift.Error, Sendable, Equatable, CustomStringConvertible {
        public var message: String
        public var description: String { "EndpointPickerConfig: \(message)" }
    }

    static let scorerTypes: Set<String> = ["queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer"]
    /// Accepted without effect: what this picker does anyway.
    static let builtIn: Set<String> = ["max-score-picker", "single-profile-handler"]

    /// Parses the YAML (or JSON) text.
    public static func parse(_ text: String) throws(Error) -> EndpointPickerConfig {
        let root: Node?
        do { root = try Yams.compose(yaml: text) } catch { throw Error(message: "not YAML: \(error)") }
        guard let root, case .mapping(let map) = root else { throw Error(message: "not a mapping") }
        guard map["kind"]?.string == "EndpointPickerConfig" else {
            throw Error(message: "kind must be EndpointPickerConfig, not \(map["kind"]?.string ?? "missing")")
        }
        if let v = map["apiVersion"]?.string, !v.hasPrefix("inference.networking.x-k8s.io/") {
            throw Error(message: "unsupported apiVersion \(v)")
        }
        var config = EndpointPickerConfig()
        // Plugins: name (default: type) → type, parameters.
        var plugins: [String: (type: String, parameters: Node?)] = [:]
        var order: [String] = []
        if let list = map["plugins"] {
            guard case .sequence(let items) = list else { throw Error(message: "plugins must be a list") }
            for item in items {
                guard case .mapping(let p) = item, let type = p["type"]?.string, !type.isEmpty else {
                    throw Error(message: "every plugin needs a type (line \((item.mark?.line ?? 0)))")
                }
                let name = p["name"]?.string ?? type
                guard plugins[name] == nil else { throw Error(message: "plugin name \(name) given twice") }
                plugins[name] = (type, p["parameters"])
                order.append(name)
            }
        }
        // The profile: weights per referenced plugin.
        var refs: [(name: String, weight: Double)] = []
        if let profiles = map["schedulingProfiles"] {
            guard case .sequence(let list) = profiles, !list.isEmpty else { throw Error(message: "schedulingProfiles must be a non-empty list") }
            let chosen = list.first { $0.mapping?["name"]?.string == "default" } ?? list[0]
            if list.count > 1 {
                config.notes.append("using scheduling profile \(chosen.mapping?["name"]?.string ?? "#1") only; this picker has one profile")
            }
            if let entries = chosen.mapping?["plugins"] {
                guard case .sequence(let items) = entries else { throw Error(message: "a profile's plugins must be a list") }
                for item in items {
                    guard let ref = item.mapping?["pluginRef"]?.string else { throw Error(message: "profile entry without pluginRef") }
                    guard plugins[ref] != nil else { throw Error(message: "pluginRef \(ref) names no plugin") }
                    var weight = 1.0
                    if let w = item.mapping?["weight"] {
                        guard let v = w.float, v.isFinite, v >= 0 else { throw Error(message: "weight of \(ref) must be a number ≥ 0") }
                        weight = v
                    }
                    refs.append((ref, weight))
                }
            }
        } else {
            refs = order.map { ($0, 1) }  // no profiles: every plugin, weight 1
        }
        for (name, weight) in refs {
            let (type, parameters) = plugins[name]!
            switch type {
            case "queue-scorer": config.queueWeight += weight
            case "kv-cache-utilization-scorer": config.kvCacheWeight += weight
            case "lora-affinity-scorer": config.loraWeight += weight
            case "prefix-cache-scorer":
                config.prefixWeight += weight
                try config.readPrefixParameters(parameters)
            default:
                if !builtIn.contains(type) { config.notes.append("plugin type \(type) is not supported here; ignored") }
            }
        }
        for name in order where plugins[name]!.type == "max-score-picker" {
            guard let n = plugins[name]!.parameters?.mapping?["maxNumOfEndpoints"] else { continue }
            guard let v = n.int, v > 0 else { throw Error(message: "max-score-picker maxNumOfEndpoints must be a positive integer") }
            config.maxEndpoints = v
        }
        for name in order where !refs.contains(where: { $0.name == name }) {
            let type = plugins[name]!.type
            if !scorerTypes.contains(type) && !builtIn.contains(type) {
                config.notes.append("plugin type \(type) is not supported here; ignored")
            }
        }
        return config
    }

    private mutating func readPrefixParameters(_ node: Node?) throws(Error) {
        guard let map = node?.mapping else { return }
        func positive(_ key: String) throws(Error) -> Int? {
            guard let n = map[key] else { return nil }
            guard let v = n.int, v > 0 else { throw Error(message: "prefix-cache-scorer \(key) must be a positive integer") }
            return v
        }
        let round8 = { (v: Int) in max(8, (v + 7) / 8 * 8) }
        if let chars = try positive("hashBlockSize") {
            prefixBlockBytes = round8(chars)
        } else if let tokens = try positive("blockSizeTokens") {
            prefixBlockBytes = round8(tokens * 4)
        } else if let tokens = try positive("blockSize") {
            prefixBlockBytes = round8(tokens * 4)
        }
        if let blocks = try positive("maxPrefixBlocksToMatch") { prefixMaxBlocks = min(blocks, 4096) }
        if map["lruCapacityPerServer"] != nil {
            notes.append("prefix-cache-scorer lruCapacityPerServer ignored: the index holds --prefix-cache-capacity blocks for the pool")
        }
    }

    /// Sets the scorer weights of `policy`.
    public func apply(to policy: inout LoadPolicy) {
        policy.queueWeight = queueWeight
        policy.kvCacheWeight = kvCacheWeight
        policy.prefixWeight = prefixWeight
        policy.loraWeight = loraWeight
    }
}
