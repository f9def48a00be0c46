import Logging
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Serves the current server context for `--cert-path DIR` (`DIR/tls.crt` = chain, `DIR/tls.key`) and reloads it
/// when the files change, so certificate rotation needs no restart.
///
/// Change detection polls device/inode/size/mtime of both files through `stat` (which follows symlinks, so the
/// Kubernetes secret-volume swap of `..data` is seen as a change). A failed reload (half-written or broken files)
/// is logged and the last good context stays; the same file state is not retried until it changes again.
/// New connections should take `current`; established ones keep the context they started with.
public final class ReloadingTLSContext: Sendable {
    private struct FileState: Equatable {
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var mtimeSeconds: Int
        var mtimeNanoseconds: Int
    }

    private struct State {
        var context: TLSContext
        var lastAttempt: [FileState?]
        var task: Task<Void, Never>?
    }

    public let directory: String
    private let alpn: [String]
    private let interval: Duration
    private let logger: Logger
    private let state: NIOLockedValueBox<State>
    /// Serializes reload attempts (poller vs. explicit `checkForChanges()`), not held while reading `current`.
    private let reloadLock = NIOLock()

    private var certificateFile: String { directory + "/tls.crt" }
    private var keyFile: String { directory + "/tls.key" }

    /// Loads `DIR/tls.crt` and `DIR/tls.key`; throws if that initial load fails (a server must not start without
    /// a usable certificate). Polling starts with `start()`.
    public init(directory: String, alpn: [String], interval: Duration, logger: Logger) throws {
        self.directory = directory
        self.alpn = alpn
        self.interval = interval
        self.logger = logger
        let files = [directory + "/tls.crt", directory + "/tls.key"]
        let before = files.map(Self.fileState)
        let context = try TLSContext.server(certificateChainFile: files[0], privateKeyFile: files[1], alpn: alpn)
        self.state = NIOLockedValueBox(State(context: context, lastAttempt: before, task: nil))
    }

    deinit {
        state.withLockedValue { $0.task?.cancel() }
    }

    /// The context new connections should use.
    public var current: TLSContext {
        state.withLockedValue { $0.context }
    }

    /// Starts polling every `interval` on a background task (never on a NIO event loop). Idempotent.
    public func start() {
        state.withLockedValue { state in
            guard state.task == nil else { return }
            let interval = self.interval
            state.task = Task.detached { [weak self] in
                while !Task.isCancelled {
                    try? await Task.sleep(for: interval)
                    guard !Task.isCancelled, let self else { return }
                    self.checkForChanges()
                }
            }
        }
    }

    /// Stops polling. Idempotent; `current` stays usable.
    public func stop() {
        let task = state.withLockedValue { state -> Task<Void, Never>? in
            defer { state.task = nil }
            return state.task
        }
        task?.cancel()
    }

    /// Checks the files once, as the poller does every interval; reloads if they changed.
    /// Returns true when a new context was installed. Blocking file I/O: call off the event loops.
    @discardableResult
    public func checkForChanges() -> Bool {
        reloadLock.withLock {
            let now = [Self.fileState(certificateFile), Self.fileState(keyFile)]
            let last = state.withLockedValue { $0.lastAttempt }
            guard now != last else { return false }
            state.withLockedValue { $0.lastAttempt = now }
            do {
                let context = try TLSContext.server(certificateChainFile: certificateFile, privateKeyFile: keyFile, alpn: alpn)
                // lastAttempt holds the pre-load state: a change during the load is seen by the next check.
                state.withLockedValue { $0.context = context }
                logger.info("TLS certificate reloaded", metadata: ["directory": "\(directory)"])
                return true
            } catch {
                logger.error(
                    "TLS certificate reload failed; keeping the previous certificate",
                    metadata: ["directory": "\(directory)", "error": "\(error)"])
                return false
            }
        }
    }

    private static func fileState(_ path: String) -> FileState? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        #if canImport(Darwin)
        let mtime = st.st_mtimespec
        #else
        let mtime = st.st_mtim
        #endif
        return FileState(
            device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
            mtimeSeconds: Int(mtime.tv_sec), mtimeNanoseconds: Int(mtime.tv_nsec))
    }
}
