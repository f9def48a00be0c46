import InferenceRouting
import NIOConcurrencyHelpers
import XCTest
@testable import ExtProc

final class RoutingStateTests: XCTestCase {
    func testEndpointObserversSeeNewEndpointSetsOnly() throws {
        let first = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80"))
        let state = RoutingState(RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(), endpoints: first, origin: "test"))
        let seen = NIOLockedValueBox<[Int]>([])
        state.onEndpointsChange { set in seen.withLockedValue { $0.append(set.count) } }
        // New rules over the same endpoint set: nothing to tell.
        state.publish(RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(), endpoints: first, origin: "test"))
        XCTAssertEqual(seen.withLockedValue { $0 }, [])
        let second = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80,10.0.0.2:80"), previous: first)
        state.publish(RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(), endpoints: second, origin: "test"))
        XCTAssertEqual(seen.withLockedValue { $0 }, [2])
        XCTAssertTrue(state.snapshot.endpoints === second)
    }
}
