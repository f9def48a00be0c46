import Foundation
import XCTest
@testable import ExtProc

final class HeldBodyBudgetTests: XCTestCase {
    func testReservesUpToTheLimitExactly() {
        let budget = HeldBodyBudget(limit: 100)
        XCTAssertTrue(budget.reserve(60))
        XCTAssertTrue(budget.reserve(40))
        XCTAssertFalse(budget.reserve(1), "one byte past the limit")
        XCTAssertEqual(budget.bytes, 100, "a refused reservation leaves nothing behind")
        budget.release(40)
        XCTAssertTrue(budget.reserve(40))
        budget.release(100)
        XCTAssertEqual(budget.bytes, 0)
        XCTAssertFalse(budget.reserve(101), "a single reservation larger than the limit")
        XCTAssertEqual(budget.bytes, 0)
    }

    func testSheddableRequestsFillOnlyHalf() {
        let budget = HeldBodyBudget(limit: 100)
        XCTAssertTrue(budget.reserve(50, sheddable: true))
        XCTAssertFalse(budget.reserve(1, sheddable: true), "sheddable: past half the limit")
        XCTAssertTrue(budget.reserve(50), "the other half stays for the rest")
        XCTAssertFalse(budget.reserve(1))
        XCTAssertEqual(budget.bytes, 100)
    }

    func testConcurrentReservationsNeverPassTheLimit() {
        let budget = HeldBodyBudget(limit: 1000)
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for _ in 0..<10_000 {
                if budget.reserve(7) {
                    XCTAssertLessThanOrEqual(budget.bytes, 1000 + 7 * 8)
                    budget.release(7)
                }
            }
        }
        XCTAssertEqual(budget.bytes, 0)
    }

    func testDefaultLimitFollowsTheContainerMemoryLimit() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("cgroup-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root.appendingPathComponent("memory"), withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: root) }
        XCTAssertEqual(HeldBodyBudget.defaultLimit(cgroupRoot: root.path), 1 << 30, "no cgroup files: 1 GiB")

        // cgroup v1, unlimited (the kernel writes a huge number): 1 GiB.
        try "9223372036854771712\n".write(to: root.appendingPathComponent("memory/memory.limit_in_bytes"), atomically: true, encoding: .utf8)
        XCTAssertEqual(HeldBodyBudget.defaultLimit(cgroupRoot: root.path), 1 << 30)

        // cgroup v2 wins over v1; "max" means unlimited and falls through to v1.
        try "max\n".write(to: root.appendingPathComponent("memory.max"), atomically: true, encoding: .utf8)
        XCTAssertEqual(HeldBodyBudget.defaultLimit(cgroupRoot: root.path), 1 << 30)
        try "536870912\n".write(to: root.appendingPathComponent("memory.max"), atomically: true, encoding: .utf8)
        XCTAssertEqual(HeldBodyBudget.defaultLimit(cgroupRoot: root.path), 256 << 20, "512 MiB limit: half of it")
    }
}
