/// One Prometheus series selector, as the reference EPP's metric flags take it: a metric name,
/// optionally with labels every counted series must carry, `name{label="value",other=value}`.
public struct MetricSpec: Sendable, Equatable, CustomStringConvertible {
    public let name: String
    public let labels: [Label]

    public struct Label: Sendable, Equatable {
        public let name: String
        public let value: String

        public init(name: String, value: String) {
            self.name = name
            self.value = value
        }
    }

    let nameBytes: [UInt8]

    public init(name: String, labels: [Label] = []) {
        self.name = name
        self.labels = labels
        self.nameBytes = Array(name.utf8)
    }

    /// Parses `name` or `name{label="value",…}` (values quoted or bare); throws `MetricSpecError`
    /// when the text is not a valid selector.
    public init(parsing text: String) throws {
        let t = text.trimmedOfSpaces
        let brace = t.firstIndex(of: "{")
        let name = String(t[..<(brace ?? t.endIndex)])
        guard Self.isMetricName(name) else { throw MetricSpecError(text: text, reason: "'\(name)' is not a metric name") }
        var labels: [Label] = []
        if let brace {
            guard t.hasSuffix("}") else { throw MetricSpecError(text: text, reason: "missing '}'") }
            var rest = Substring(t[t.index(after: brace)..<t.index(before: t.endIndex)])
            while true {
                rest = rest.drop { $0 == " " || $0 == "," }
                if rest.isEmpty { break }
                guard let eq = rest.firstIndex(of: "=") else { throw MetricSpecError(text: text, reason: "label without '='") }
                let label = String(rest[..<eq]).trimmedOfSpaces
                guard Self.isLabelName(label) else { throw MetricSpecError(text: text, reason: "'\(label)' is not a label name") }
                rest = rest[rest.index(after: eq)...].drop { $0 == " " }
                var value = ""
                if rest.first == "\"" {
                    rest = rest.dropFirst()
                    var closed = false
                    while let c = rest.first {
                        rest = rest.dropFirst()
                        if c == "\\", let next = rest.first {
                            value.append(next == "n" ? "\n" : next)
                            rest = rest.dropFirst()
                        } else if c == "\"" {
                            closed = true
                            break
                        } else {
                            value.append(c)
                        }
                    }
                    guard closed else { throw MetricSpecError(text: text, reason: "unterminated label value") }
                } else {
                    let end = rest.firstIndex(of: ",") ?? rest.endIndex
                    value = String(rest[..<end]).trimmedOfSpaces
                    rest = rest[end...]
                }
                labels.append(Label(name: label, value: value))
            }
        }
        self.init(name: name, labels: labels)
    }

    public var description: String {
        func quoted(_ v: String) -> String {
            var out = "\""
            for c in v {
                if c == "\\" || c == "\"" { out.append("\\") }
                out.append(c)
            }
            return out + "\""
        }
        return labels.isEmpty ? name : name + "{" + labels.map { "\($0.name)=\(quoted($0.value))" }.joined(separator: ",") + "}"
    }

    static func isMetricName(_ s: String) -> Bool {
        guard let first = s.unicodeScalars.first, first.isASCII,
              first.properties.isAlphabetic || first == "_" || first == ":" else { return false }
        return s.unicodeScalars.allSatisfy { $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "_" || $0 == ":") }
    }

    static func isLabelName(_ s: String) -> Bool {
        guard let first = s.unicodeScalars.first, first.isASCII, first.properties.isAlphabetic || first == "_" else { return false }
        return s.unicodeScalars.allSatisfy { $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "_") }
    }
}

/// Why a metric selector did not parse.
public struct MetricSpecError: Error, CustomStringConvertible {
    public let text: String
    public let reason: String
    public var description: String { "invalid metric selector '\(text)': \(reason)" }
}

/// Which series of a model server's metrics page carry its load. vLLM's names by default; other
/// servers (SGLang, TensorRT-LLM under Triton) through the reference EPP's metric flags.
public struct MetricNames: Sendable, Equatable {
    /// Requests waiting (summed over the matching series).
    public var queued: MetricSpec
    /// Requests running (summed).
    public var running: MetricSpec
    /// KV-cache utilisation 0…1 (the highest matching series).
    public var kvCache: MetricSpec
    /// Read when `kvCache` is absent (vLLM before 0.10 named it `vllm:gpu_cache_usage_perc`).
    public var kvCacheFallback: MetricSpec?
    /// vLLM's LoRA-adapter info series (labels `running_lora_adapters`, `waiting_lora_adapters`,
    /// `max_lora`); nil: not read.
    public var lora: MetricSpec?

    public init(queued: MetricSpec, running: MetricSpec, kvCache: MetricSpec, kvCacheFallback: MetricSpec? = nil,
                lora: MetricSpec? = nil) {
        self.queued = queued
        self.running = running
        self.kvCache = kvCache
        self.kvCacheFallback = kvCacheFallback
        self.lora = lora
    }

    public static let vllm = MetricNames(
        queued: MetricSpec(name: "vllm:num_requests_waiting"),
        running: MetricSpec(name: "vllm:num_requests_running"),
        kvCache: MetricSpec(name: "vllm:kv_cache_usage_perc"),
        kvCacheFallback: MetricSpec(name: "vllm:gpu_cache_usage_perc"),
        lora: MetricSpec(name: "vllm:lora_requests_info"))

    enum Kind { case waiting, running, kvCache, gpuCache, loraInfo }

    /// The selectors to look for, each with what it measures.
    var table: [(spec: MetricSpec, kind: Kind)] {
        var t: [(MetricSpec, Kind)] = [(queued, .waiting), (running, .running), (kvCache, .kvCache)]
        if let kvCacheFallback { t.append((kvCacheFallback, .gpuCache)) }
        if let lora { t.append((lora, .loraInfo)) }
        return t
    }
}

extension StringProtocol {
    fileprivate var trimmedOfSpaces: String {
        String(drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
    }
}
