import NIOConcurrencyHelpers

/// The per-request histograms of the reference EPP's metric set.
///
/// They are kept here rather than as swift-prometheus `Histogram`s because of their cost on the
/// request path: that type takes one lock per histogram and walks every bucket on each record
/// (eight histograms, ~160 buckets per request), which measured a tenth of a whole request's CPU
/// in bench (a). Here one request takes one lock for all eight, finds each bucket by binary search
/// and bumps one counter; buckets are summed into Prometheus' cumulative form when scraped. The
/// exposition is the one swift-prometheus writes for a `ValueHistogram`.
enum RequestHistogram: Int, CaseIterable, Sendable {
    case duration, pickDuration, requestSizes, responseSizes, inputTokens, outputTokens, cachedTokens, timePerOutputToken

    var name: String { Self.families[rawValue].name }
    var help: String { Self.families[rawValue].help }
    var bounds: [Double] { Self.families[rawValue].bounds }
    /// Where this histogram's counters start in a series' flat counter array.
    var offset: Int { Self.offsets[rawValue] }

    private static let families: [(name: String, help: String, bounds: [Double])] = [
        ("inference_objective_request_duration_seconds",
         "Inference objective response latency distribution in seconds for each model and target model.",
         Buckets.requestDuration),
        ("inference_extension_scheduler_e2e_duration_seconds", "End-to-end scheduling latency distribution in seconds.",
         Buckets.pickDuration),
        ("inference_objective_request_sizes",
         "Inference objective requests size distribution in bytes for each model and target model.", Buckets.sizes),
        ("inference_objective_response_sizes",
         "Inference objective responses size distribution in bytes for each model and target model.", Buckets.sizes),
        ("inference_objective_input_tokens",
         "Inference objective input token count distribution for requests in each model.", Buckets.tokens),
        ("inference_objective_output_tokens",
         "Inference objective output token count distribution for requests in each model.", Buckets.tokens),
        ("inference_objective_prompt_cached_tokens",
         "Inference objective prompt cached token count distribution for requests in each model.", Buckets.tokens),
        ("inference_objective_normalized_time_per_output_token_seconds",
         "Inference objective latency divided by number of output tokens in seconds for each model and target model.",
         Buckets.timePerOutputToken),
    ]

    /// One counter per bound plus one for values above every bound.
    private static let offsets: [Int] = {
        var offsets: [Int] = [], next = 0
        for family in families {
            offsets.append(next)
            next += family.bounds.count + 1
        }
        return offsets
    }()

    static let counterCount = families.reduce(0) { $0 + $1.bounds.count + 1 }

    /// Index of the first bound ≥ `value` (Prometheus buckets are `le`), or `bounds.count`.
    @inline(__always)
    func slot(of value: Double) -> Int {
        let bounds = Self.families[rawValue].bounds
        var low = 0, high = bounds.count
        while low < high {
            let mid = (low + high) / 2
            if bounds[mid] >= value { high = mid } else { low = mid + 1 }
        }
        return low
    }
}

/// What one finished request adds to its series' histograms; nil leaves a histogram untouched.
struct RequestObservation {
    var values: (Double?, Double?, Double?, Double?, Double?, Double?, Double?, Double?) = (nil, nil, nil, nil, nil, nil, nil, nil)

    subscript(_ h: RequestHistogram) -> Double? {
        get {
            switch h {
            case .duration: values.0
            case .pickDuration: values.1
            case .requestSizes: values.2
            case .responseSizes: values.3
            case .inputTokens: values.4
            case .outputTokens: values.5
            case .cachedTokens: values.6
            case .timePerOutputToken: values.7
            }
        }
        set {
            switch h {
            case .duration: values.0 = newValue
            case .pickDuration: values.1 = newValue
            case .requestSizes: values.2 = newValue
            case .responseSizes: values.3 = newValue
            case .inputTokens: values.4 = newValue
            case .outputTokens: values.5 = newValue
            case .cachedTokens: values.6 = newValue
            case .timePerOutputToken: values.7 = newValue
            }
        }
    }
}

/// The eight request histograms of one label set.
final class SeriesHistograms: Sendable {
    private struct State {
        /// Per histogram (at its `offset`): observations per bucket, not cumulative.
        var counters = [Int](repeating: 0, count: RequestHistogram.counterCount)
        var sums = [Double](repeating: 0, count: RequestHistogram.allCases.count)
        var counts = [Int](repeating: 0, count: RequestHistogram.allCases.count)
    }

    private let state = NIOLockedValueBox(State())
    /// `name="value",…` with values escaped as in the exposition format.
    let renderedLabels: [UInt8]

    init(labels: [(String, String)]) {
        var text: [UInt8] = []
        for (i, (key, value)) in labels.enumerated() {
            if i > 0 { text.append(UInt8(ascii: ",")) }
            text.append(contentsOf: key.utf8)
            text.append(contentsOf: #"=""#.utf8)
            text.appendEscapedLabelValue(value)
            text.append(UInt8(ascii: "\""))
        }
        renderedLabels = text
    }

    func record(_ observation: RequestObservation) {
        state.withLockedValue { state in
            for h in RequestHistogram.allCases {
                guard let value = observation[h] else { continue }
                state.counters[h.offset + h.slot(of: value)] += 1
                state.sums[h.rawValue] += value
                state.counts[h.rawValue] += 1
            }
        }
    }

    /// Sample lines of histogram `h` (cumulative buckets, +Inf, sum, count), zeros included, as
    /// swift-prometheus writes a series it has made.
    func emit(_ h: RequestHistogram, into out: inout [UInt8]) {
        let (buckets, sum, count) = state.withLockedValue { state in
            (Array(state.counters[h.offset..<h.offset + h.bounds.count]), state.sums[h.rawValue], state.counts[h.rawValue])
        }
        var cumulative = 0
        for (bound, n) in zip(h.bounds, buckets) {
            cumulative += n
            sample(h.name, "_bucket", le: bound.description, "\(cumulative)", into: &out)
        }
        sample(h.name, "_bucket", le: "+Inf", "\(count)", into: &out)
        sample(h.name, "_sum", le: nil, sum.description, into: &out)
        sample(h.name, "_count", le: nil, "\(count)", into: &out)
    }

    private func sample(_ name: String, _ suffix: String, le: String?, _ value: String, into out: inout [UInt8]) {
        out.append(contentsOf: name.utf8)
        out.append(contentsOf: suffix.utf8)
        out.append(UInt8(ascii: "{"))
        out.append(contentsOf: renderedLabels)
        if let le {
            if !renderedLabels.isEmpty { out.append(UInt8(ascii: ",")) }
            out.append(contentsOf: #"le=""#.utf8)
            out.append(contentsOf: le.utf8)
            out.append(UInt8(ascii: "\""))
        }
        out.append(contentsOf: "} ".utf8)
        out.append(contentsOf: value.utf8)
        out.append(UInt8(ascii: "\n"))
    }

    /// HELP and TYPE lines, then every series' samples, for each histogram that has series.
    static func emit(_ series: [SeriesHistograms], into out: inout [UInt8]) {
        guard !series.isEmpty else { return }
        for h in RequestHistogram.allCases {
            out.append(contentsOf: "# HELP \(h.name) \(h.help)\n# TYPE \(h.name) histogram\n".utf8)
            for s in series { s.emit(h, into: &out) }
        }
    }
}

extension [UInt8] {
    /// Label value escaping of the text exposition format: backslash, double quote, newline.
    mutating func appendEscapedLabelValue(_ value: String) {
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\\"): append(contentsOf: #"\\"#.utf8)
            case UInt8(ascii: "\""): append(contentsOf: #"\""#.utf8)
            case UInt8(ascii: "\n"): append(contentsOf: #"\n"#.utf8)
            default: append(byte)
            }
        }
    }
}
