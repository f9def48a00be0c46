import InferenceRouting
import Logging
import ModelServerMetrics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import XCTest

/// The scraper against a small in-process HTTP/1.1 server (NIOHTTP1) whose answer each test sets.
final class ModelServerScraperTests: XCTestCase {
    enum Mode { case metrics(String), status(Int), hang, closeAfterAnswer(String) }

    final class FakeServer: @unchecked Sendable {
        let mode = NIOLockedValueBox<Mode>(.status(404))
        let requests = ManagedCounter()
        let connections = ManagedCounter()
        var channel: (any Channel)?

        func start(group: any EventLoopGroup, port: Int = 0) throws -> Int {
            channel = try ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { ch in
                    self.connections.add()
                    return ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.configureHTTPServerPipeline()
                        try ch.pipeline.syncOperations.addHandler(Handler(server: self))
                    }
                }
                .bind(host: "127.0.0.1", port: port).wait()
            return channel!.localAddress!.port!
        }

        final class Handler: ChannelInboundHandler {
            typealias InboundIn = HTTPServerRequestPart
            typealias OutboundOut = HTTPServerResponsePart
            let server: FakeServer
            init(server: FakeServer) { self.server = server }

            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                guard case .end = unwrapInboundIn(data) else { return }
                server.requests.add()
                let (status, body, close): (Int, String, Bool)
                switch server.mode.withLockedValue({ $0 }) {
                case .hang: return
                case .status(let s): (status, body, close) = (s, "nope", false)
                case .metrics(let text): (status, body, close) = (200, text, false)
                case .closeAfterAnswer(let text): (status, body, close) = (200, text, true)
                }
                var head = HTTPResponseHead(version: .http1_1, status: .init(statusCode: status))
                head.headers.add(name: "content-length", value: "\(body.utf8.count)")
                if close { head.headers.add(name: "connection", value: "close") }
                context.write(wrapOutboundOut(.head(head)), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if close { context.close(promise: nil) } }
            }
        }
    }

    final class ManagedCounter: Sendable {
        private let box = NIOLockedValueBox(0)
        func add() { box.withLockedValue { $0 += 1 } }
        var value: Int { box.withLockedValue { $0 } }
    }

    var group: MultiThreadedEventLoopGroup!
    var server: FakeServer!
    var record: EndpointRecord!
    var scraper: ModelServerScraper!

    override func setUp() async throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        server = FakeServer()
        let port = try server.start(group: group)
        let set = EndpointSet(endpoints: [Endpoint(host: "127.0.0.1", port: port)])
        record = set.records[0]
        var config = ModelServerScraper.Configuration()
        config.interval = .milliseconds(20)
        config.timeout = .milliseconds(300)
        scraper = ModelServerScraper(configuration: config, eventLoop: group.next(), endpoints: { set },
                                     logger: Logger(label: "test"))
    }

    override func tearDown() async throws {
        await scraper.shutdown()
        try await server.channel?.close()
        try await group.shutdownGracefully()
    }

    private func waitFor(_ what: String, timeout: Double = 5, _ condition: () -> Bool) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        while !condition() {
            if Date() > deadline { return XCTFail("timed out waiting for \(what)") }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    func testSamplesArriveAndFollowTheServer() async throws {
        server.mode.withLockedValue { $0 = .metrics("vllm:num_requests_waiting 3\nvllm:kv_cache_usage_perc 0.25\n") }
        scraper.start()
        try await waitFor("first sample") { record.load?.waiting == 3 }
        XCTAssertEqual(record.load?.kvCacheUsage, 0.25)
        server.mode.withLockedValue { $0 = .metrics("vllm:num_requests_waiting 8\nvllm:num_requests_running 2\n") }
        try await waitFor("new sample") { record.load?.waiting == 8 }
        XCTAssertEqual(record.load?.running, 2)
        // Keep-alive: many scrapes over one connection.
        try await waitFor("more scrapes") { server.requests.value > 5 }
        XCTAssertEqual(server.connections.value, 1)
    }

    func testErrorsLeaveTheLastSampleToAge() async throws {
        server.mode.withLockedValue { $0 = .metrics("vllm:num_requests_waiting 1\n") }
        scraper.start()
        try await waitFor("first sample") { record.load != nil }
        for mode in [Mode.status(404), .metrics("<html>not metrics</html>")] {
            server.mode.withLockedValue { $0 = mode }
            let before = server.requests.value
            try await waitFor("scrapes") { server.requests.value > before + 2 }
            let stamp = record.load!.sampledAt
            let after = server.requests.value
            try await waitFor("more scrapes") { server.requests.value > after + 2 }
            XCTAssertEqual(record.load?.sampledAt, stamp, "\(mode) must not refresh the sample")
        }
    }

    func testOversizedResponseIsDropped() async throws {
        // setUp's scraper takes up to 8 MiB; this one 1 KiB.
        var config = ModelServerScraper.Configuration()
        config.interval = .milliseconds(20)
        config.maxBodyBytes = 1024
        let set = EndpointSet(endpoints: [record.endpoint])
        let small = ModelServerScraper(configuration: config, eventLoop: group.next(), endpoints: { set },
                                       logger: Logger(label: "test"))
        let padding = String(repeating: "# padding line of a large exposition\n", count: 100)
        server.mode.withLockedValue { $0 = .metrics(padding + "vllm:num_requests_waiting 3\n") }
        small.start()
        try await waitFor("several scrapes") { server.requests.value >= 3 }
        XCTAssertNil(set.records[0].load, "a response over the cap must not count")
        server.mode.withLockedValue { $0 = .metrics("vllm:num_requests_waiting 3\n") }
        try await waitFor("a small response counts") { set.records[0].load?.waiting == 3 }
        await small.shutdown()
    }

    func testHungScrapeTimesOutAndReconnects() async throws {
        server.mode.withLockedValue { $0 = .hang }
        scraper.start()
        try await waitFor("a second connection after the timeout") { server.connections.value >= 2 }
        XCTAssertNil(record.load)
        server.mode.withLockedValue { $0 = .metrics("vllm:num_requests_waiting 4\n") }
        try await waitFor("recovery") { record.load?.waiting == 4 }
    }

    func testServerClosingEachConnectionIsFine() async throws {
        server.mode.withLockedValue { $0 = .closeAfterAnswer("vllm:num_requests_waiting 5\n") }
        scraper.start()
        try await waitFor("sample") { record.load?.waiting == 5 }
        try await waitFor("reconnects") { server.connections.value >= 3 }
    }

    func testUnreachableEndpointIsRetriedUntilItAnswers() async throws {
        let port = server.channel!.localAddress!.port!
        try await server.channel?.close()
        server.channel = nil
        scraper.start()
        try await Task.sleep(for: .milliseconds(200))
        XCTAssertNil(record.load)
        server.mode.withLockedValue { $0 = .metrics("vllm:num_requests_waiting 6\n") }
        _ = try server.start(group: group, port: port)
        try await waitFor("sample once the server is up") { record.load?.waiting == 6 }
    }
}
