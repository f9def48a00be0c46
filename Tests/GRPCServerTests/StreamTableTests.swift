import NGHTTP2Server
import XCTest

final class StreamTableTests: XCTestCase {
    final class Box {
        let n: Int
        init(_ n: Int) { self.n = n }
    }

    /// The remembered entry must never outlive its removal (a closed stream's state coming back).
    func testLookupsInsertRemove() {
        var table = StreamTable<Box>()
        XCTAssertNil(table[1])
        table.insert(Box(1), for: 1)
        table.insert(Box(3), for: 3)
        XCTAssertEqual(table[1]?.n, 1)
        XCTAssertEqual(table[3]?.n, 3)
        XCTAssertEqual(table[3]?.n, 3)  // remembered
        XCTAssertEqual(table.remove(3)?.n, 3)
        XCTAssertNil(table[3])
        XCTAssertEqual(table[1]?.n, 1)
        table.removeAll()
        XCTAssertNil(table[1])
        XCTAssertTrue(table.isEmpty)
        XCTAssertNil(table.remove(5))
    }
}
