import InferenceRouting

/// The load figures the picker reads from a model server's Prometheus text exposition (vLLM's
/// metric names unless `MetricNames` says otherwise).
public struct LoadMetrics: Sendable, Equatable {
    /// `vllm:num_requests_waiting`, summed over its series (one per model / engine).
    public var waiting: Int
    /// `vllm:num_requests_running`, summed.
    public var running: Int
    /// `vllm:kv_cache_usage_perc` (vLLM ≥ 0.10), else `vllm:gpu_cache_usage_perc`; the highest series.
    public var kvCacheUsage: Double
    /// `vllm:lora_requests_info`: the series with the highest value (vLLM sets it to the time of
    /// the change, and may keep older series); nil when the server reports none.
    public var lora: LoRAAdapters?
    /// The `model_name` labels of the queue gauges (the base models served), in order, once each.
    public var servedModels: [String]

    public init(waiting: Int, running: Int, kvCacheUsage: Double, lora: LoRAAdapters? = nil, servedModels: [String] = []) {
        self.waiting = waiting
        self.running = running
        self.kvCacheUsage = kvCacheUsage
        self.lora = lora
        self.servedModels = servedModels
    }

    /// Parses the text format (version 0.0.4, also what OpenMetrics servers send for these
    /// gauges). Unknown metrics, comments, malformed lines and non-finite values are skipped
    /// line by line; nil when neither a queue nor a KV-cache figure was found (not a model server,
    /// or other metric names).
    public static func parse<Bytes: Collection<UInt8>>(_ text: Bytes, names: MetricNames = .vllm) -> LoadMetrics?
    where Bytes.Index == Int {
        let table = names.table
        var waiting = 0.0, running = 0.0
        var kv: Double?, gpuCache: Double?
        var found = false
        var lora: (info: LoRAAdapters, at: Double)?
        var served: [String] = []
        func add(_ kind: MetricNames.Kind, _ sample: (name: Range<Int>, value: Double, labels: Range<Int>?)) {
            switch kind {
            case .waiting, .running:
                if kind == .waiting { waiting += sample.value; found = true } else { running += sample.value }
                if let labels = sample.labels,
                   let model = labelValue(text, labels, "model_name"), !model.isEmpty, !served.contains(model) {
                    served.append(model)
                }
            case .kvCache: kv = max(kv ?? 0, sample.value); found = true
            case .gpuCache: gpuCache = max(gpuCache ?? 0, sample.value); found = true
            case .loraInfo:
                guard lora == nil || sample.value >= lora!.at, let labels = sample.labels,
                      let info = loraAdapters(text, labels) else { return }
                lora = (info, sample.value)
            }
        }
        var i = text.startIndex
        let end = text.endIndex
        while i < end {
            var lineEnd = i
            while lineEnd < end && text[lineEnd] != UInt8(ascii: "\n") { lineEnd += 1 }
            defer { i = lineEnd + 1 }
            guard let sample = parseLine(text, i, lineEnd, table) else { continue }
            for (spec, kind) in table where equal(text, sample.name.lowerBound, sample.name.upperBound, spec.nameBytes) {
                if !spec.labels.isEmpty {
                    guard let labels = sample.labels,
                          spec.labels.allSatisfy({ labelValue(text, labels, $0.name) == $0.value }) else { continue }
                }
                add(kind, sample)
            }
        }
        guard found else { return nil }
        return LoadMetrics(waiting: clampedInt(waiting), running: clampedInt(running), kvCacheUsage: kv ?? gpuCache ?? 0,
                           lora: lora?.info, servedModels: served)
    }

    /// The adapters of a `vllm:lora_requests_info` series; nil without a valid `max_lora`.
    private static func loraAdapters<Bytes: Collection<UInt8>>(_ t: Bytes, _ labels: Range<Int>) -> LoRAAdapters?
    where Bytes.Index == Int {
        guard let maxText = labelValue(t, labels, "max_lora"), let maxLoRA = Int(maxText), maxLoRA >= 0 else { return nil }
        func list(_ name: String) -> [String] {
            (labelValue(t, labels, name) ?? "").split(separator: ",").map { $0.trimmingSpaces() }.filter { !$0.isEmpty }
        }
        return LoRAAdapters(running: list("running_lora_adapters"), waiting: list("waiting_lora_adapters"),
                            maxAdapters: maxLoRA)
    }

    /// The unescaped value of label `name` within a label set (the bytes between the braces).
    static func labelValue<Bytes: Collection<UInt8>>(_ t: Bytes, _ labels: Range<Int>, _ name: String) -> String?
    where Bytes.Index == Int {
        let want = Array(name.utf8)
        var i = labels.lowerBound
        let end = labels.upperBound
        while i < end {
            while i < end && (isSpace(t[i]) || t[i] == UInt8(ascii: ",")) { i += 1 }
            let nameStart = i
            while i < end && t[i] != UInt8(ascii: "=") && !isSpace(t[i]) { i += 1 }
            let nameEnd = i
            while i < end && isSpace(t[i]) { i += 1 }
            guard i < end, t[i] == UInt8(ascii: "=") else { return nil }
            i += 1
            while i < end && isSpace(t[i]) { i += 1 }
            guard i < end, t[i] == UInt8(ascii: "\"") else { return nil }
            i += 1
            var value: [UInt8] = []
            while i < end && t[i] != UInt8(ascii: "\"") {
                if t[i] == UInt8(ascii: "\\") && i + 1 < end {
                    i += 1
                    value.append(t[i] == UInt8(ascii: "n") ? UInt8(ascii: "\n") : t[i])
                } else {
                    value.append(t[i])
                }
                i += 1
            }
            guard i < end else { return nil }  // unterminated value
            i += 1
            if equal(t, nameStart, nameEnd, want) { return String(decoding: value, as: UTF8.self) }
        }
        return nil
    }

    /// One `name{labels} value [timestamp]` line of a metric in `table`, or nil.
    private static func parseLine<Bytes: Collection<UInt8>>(_ t: Bytes, _ start: Int, _ end: Int,
                                                            _ table: [(spec: MetricSpec, kind: MetricNames.Kind)])
    -> (name: Range<Int>, value: Double, labels: Range<Int>?)? where Bytes.Index == Int {
        var i = start
        while i < end && isSpace(t[i]) { i += 1 }
        guard i < end, t[i] != UInt8(ascii: "#") else { return nil }
        let nameStart = i
        while i < end && t[i] != UInt8(ascii: "{") && !isSpace(t[i]) { i += 1 }
        guard table.contains(where: { equal(t, nameStart, i, $0.spec.nameBytes) }) else { return nil }
        let name = nameStart..<i
        var labels: Range<Int>?
        if i < end && t[i] == UInt8(ascii: "{") {
            // Label values may hold '}' inside quotes, with backslash escapes.
            i += 1
            let labelsStart = i
            var inQuotes = false
            while i < end {
                let c = t[i]
                if inQuotes {
                    if c == UInt8(ascii: "\\") { i += 1 } else if c == UInt8(ascii: "\"") { inQuotes = false }
                } else if c == UInt8(ascii: "\"") {
                    inQuotes = true
                } else if c == UInt8(ascii: "}") {
                    break
                }
                i += 1
            }
            guard i < end else { return nil }  // unterminated label set
            labels = labelsStart..<i
            i += 1
        }
        guard i < end, isSpace(t[i]) else { return nil }
        while i < end && isSpace(t[i]) { i += 1 }
        let valueStart = i
        while i < end && !isSpace(t[i]) { i += 1 }
        guard i > valueStart, i - valueStart <= 40,
              let value = Double(String(decoding: t[valueStart..<i], as: UTF8.self)), value.isFinite, value >= 0 else {
            return nil
        }
        return (name, value, labels)
    }

    @inline(__always)
    private static func isSpace(_ c: UInt8) -> Bool { c == UInt8(ascii: " ") || c == UInt8(ascii: "\t") || c == UInt8(ascii: "\r") }

    private static func equal<Bytes: Collection<UInt8>>(_ t: Bytes, _ a: Int, _ b: Int, _ name: [UInt8]) -> Bool
    where Bytes.Index == Int {
        guard b - a == name.count else { return false }
        for k in 0..<name.count where t[a + k] != name[k] { return false }
        return true
    }

    private static func clampedInt(_ v: Double) -> Int { v >= Double(Int32.max) ? Int(Int32.max) : Int(v.rounded()) }
}

extension Substring {
    fileprivate func trimmingSpaces() -> String {
        String(drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
    }
}
