import NIOConcurrencyHelpers
import NIOCore
import XCTest
@testable import ExtProc

final class AdmissionQueueTests: XCTestCase {
    /// A queue whose waiters record when they are handed the turn.
    final class Harness: @unchecked Sendable {
        let queue: AdmissionQueue
        let handed = NIOLockedValueBox<[String]>([])
        var ids: [String: Int] = [:]

        init(capacity: Int = 16) {
            queue = AdmissionQueue(timeout: .seconds(10), capacity: capacity, recheckInterval: .milliseconds(50))
        }

        @discardableResult
        func enter(_ name: String, priority: Int, flow: String) -> Bool {
            let handed = self.handed
            guard let id = queue.enter(priority: priority, flow: flow, takeTurn: { handed.withLockedValue { $0.append(name) } })
            else { return false }
            ids[name] = id
            return true
        }

        /// Serves the queue as the picker does when the pool has room for one: some waiter finds room,
        /// the first in line gets it (by handing over the turn if needed) and is admitted.
        func serveOne(checkedBy name: String) -> String {
            handed.withLockedValue { $0 = [] }
            let winner: String
            if queue.claimRoom(ids[name]!) {
                winner = name
            } else {
                let h = handed.withLockedValue { $0 }
                XCTAssertEqual(h.count, 1)
                winner = h[0]
            }
            queue.leave(ids[winner]!, admitted: true)
            ids[winner] = nil
            return winner
        }
    }

    func testPriorityThenRoundRobinBetweenObjectivesThenArrival() {
        let h = Harness()
        h.enter("bulk-1", priority: -5, flow: "bulk")
        for k in 1...3 { h.enter("batch-\(k)", priority: -1, flow: "batch") }
        h.enter("other-1", priority: -1, flow: "other")
        h.enter("bulk-2", priority: -5, flow: "bulk")
        h.enter("other-2", priority: -1, flow: "other")
        var order: [String] = []
        // Whoever notices the room (here always the last to arrive), the first in line is served.
        while h.queue.count > 0 {
            let checker = h.ids.keys.sorted().last!
            order.append(h.serveOne(checkedBy: checker))
        }
        XCTAssertEqual(order, ["batch-1", "other-1", "batch-2", "other-2", "batch-3", "bulk-1", "bulk-2"])
    }

    func testANewObjectiveStartsAtTheServedRankNotBehindTheBacklog() {
        let h = Harness()
        for k in 1...4 { h.enter("busy-\(k)", priority: -1, flow: "busy") }
        XCTAssertEqual(h.serveOne(checkedBy: "busy-4"), "busy-1")
        XCTAssertEqual(h.serveOne(checkedBy: "busy-4"), "busy-2")
        h.enter("quiet-1", priority: -1, flow: "quiet")
        // busy-3 holds rank 2, quiet-1 starts at the served rank (1): it goes next.
        XCTAssertEqual(h.serveOne(checkedBy: "busy-4"), "quiet-1")
        XCTAssertEqual(h.serveOne(checkedBy: "busy-4"), "busy-3")
    }

    func testFirstInLineWithoutRoomIsSkippedForAnInterval() {
        let h = Harness()
        h.enter("a", priority: -1, flow: "x")
        h.enter("b", priority: -1, flow: "x")
        let now = NIODeadline.now()
        h.queue.noRoom(h.ids["a"]!, now: now)
        XCTAssertTrue(h.queue.claimRoom(h.ids["b"]!, now: now + .milliseconds(10)), "a is skipped: b takes the room")
        XCTAssertFalse(h.queue.claimRoom(h.ids["b"]!, now: now + .milliseconds(60)), "after the interval a is first again")
        XCTAssertEqual(h.handed.withLockedValue { $0 }, ["a"])
    }

    func testCapacityAndLeavingFreesAPlace() {
        let h = Harness(capacity: 2)
        XCTAssertTrue(h.enter("a", priority: -1, flow: "x"))
        XCTAssertTrue(h.enter("b", priority: -1, flow: "x"))
        XCTAssertFalse(h.enter("c", priority: -1, flow: "x"))
        h.queue.leave(h.ids["a"]!, admitted: false)
        XCTAssertTrue(h.enter("c", priority: -1, flow: "x"))
        XCTAssertEqual(h.queue.count, 2)
        XCTAssertTrue(h.queue.claimRoom(h.ids["b"]!), "b is first after a left")
    }
}
