@testable import EPPMetrics
import Foundation
import Prometheus
import XCTest

/// `SeriesHistograms` replaces swift-prometheus histograms on the request path; its exposition must
/// be the one that library writes for the same observations (dashboards and the reference's names).
final class RequestHistogramsTests: XCTestCase {
    private func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

    /// Each histogram, fed values below, on and above its bounds, against a swift-prometheus
    /// ValueHistogram fed the same values: identical sample lines.
    func testExpositionMatchesSwiftPrometheus() {
        let labels = [("model_name", #"we"ird\ na"# + "\nme"), ("target_model_name", "facebook/opt-125m")]
        let ours = SeriesHistograms(labels: labels)
        let registry = PrometheusCollectorRegistry()
        var reference: [RequestHistogram: ValueHistogram] = [:]
        for h in RequestHistogram.allCases {
            reference[h] = registry.makeValueHistogram(
                descriptor: MetricNameDescriptor(metricName: h.name, unitName: "", helpText: h.help), labels: labels,
                buckets: h.bounds)
        }
        var observation = RequestObservation()
        for round in 0..<40 {
            for h in RequestHistogram.allCases {
                let bounds = h.bounds
                let value: Double
                switch round % 4 {
                case 0: value = bounds[round % bounds.count]                  // exactly on a bound (le is inclusive)
                case 1: value = bounds[round % bounds.count] * 0.999          // just below
                case 2: value = bounds[bounds.count - 1] * 2                   // above every bound: +Inf only
                default: value = bounds[0] / 3                                 // below the first bound
                }
                observation[h] = round % 7 == h.rawValue ? nil : value          // some histograms skip a request
                if let v = observation[h] { reference[h]!.record(v) }
            }
            ours.record(observation)
        }
        var theirs: [UInt8] = []
        registry.emit(into: &theirs)
        let theirLines = text(theirs).split(separator: "\n")
        for h in RequestHistogram.allCases {
            var mine: [UInt8] = []
            ours.emit(h, into: &mine)
            let expected = theirLines.filter {
                !$0.hasPrefix("#") && ($0.hasPrefix(h.name + "_bucket{") || $0.hasPrefix(h.name + "_sum{")
                    || $0.hasPrefix(h.name + "_count{"))
            }
            XCTAssertEqual(text(mine).split(separator: "\n"), expected, "\(h)")
            XCTAssertEqual(expected.count, h.bounds.count + 3)
        }
        // HELP/TYPE lines as the registry writes them.
        var all: [UInt8] = []
        SeriesHistograms.emit([ours], into: &all)
        for h in RequestHistogram.allCases {
            XCTAssertTrue(text(all).contains("# HELP \(h.name) \(h.help)\n# TYPE \(h.name) histogram\n"))
            XCTAssertTrue(text(theirs).contains("# HELP \(h.name) \(h.help)\n# TYPE \(h.name) histogram\n"))
        }
    }

    func testSlotIsTheFirstBoundAtOrAboveTheValue() {
        let h = RequestHistogram.pickDuration
        XCTAssertEqual(h.slot(of: 0), 0)
        XCTAssertEqual(h.slot(of: h.bounds[0]), 0)
        XCTAssertEqual(h.slot(of: h.bounds[0].nextUp), 1)
        XCTAssertEqual(h.slot(of: h.bounds[h.bounds.count - 1]), h.bounds.count - 1)
        XCTAssertEqual(h.slot(of: .infinity), h.bounds.count)
        XCTAssertEqual(h.slot(of: .nan), h.bounds.count)
    }

    func testConcurrentRecordsAreAllCounted() {
        let s = SeriesHistograms(labels: [("model_name", "m"), ("target_model_name", "t")])
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            var o = RequestObservation()
            o[.requestSizes] = Double(100 * (worker + 1))
            for _ in 0..<10_000 { s.record(o) }
        }
        var out: [UInt8] = []
        s.emit(.requestSizes, into: &out)
        let lines = text(out).split(separator: "\n")
        XCTAssertTrue(lines.contains(#"inference_objective_request_sizes_count{model_name="m",target_model_name="t"} 80000"#))
        XCTAssertTrue(lines.contains(#"inference_objective_request_sizes_sum{model_name="m",target_model_name="t"} 36000000.0"#))
        XCTAssertTrue(lines.contains(#"inference_objective_request_sizes_bucket{model_name="m",target_model_name="t",le="+Inf"} 80000"#))
        // 100 and 200 fall in le=256, 300…500 in le=512, 600…800 in le=1024 (cumulative).
        XCTAssertTrue(lines.contains(#"inference_objective_request_sizes_bucket{model_name="m",target_model_name="t",le="256.0"} 20000"#))
        XCTAssertTrue(lines.contains(#"inference_objective_request_sizes_bucket{model_name="m",target_model_name="t",le="512.0"} 50000"#))
        XCTAssertTrue(lines.contains(#"inference_objective_request_sizes_bucket{model_name="m",target_model_name="t",le="1024.0"} 80000"#))
        // The other histograms saw nothing: their count stays 0.
        var other: [UInt8] = []
        s.emit(.duration, into: &other)
        XCTAssertTrue(text(other).contains(#"inference_objective_request_duration_seconds_count{model_name="m",target_model_name="t"} 0"#))
    }
}
