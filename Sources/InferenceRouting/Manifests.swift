import Foundation
import Yams
import Atomics

/// A problem in a manifest file; `line` is 1-based (0 when unknown).
public struct ManifestError: Error, Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var message: String
    public init(file: String, line: Int, message: String) {
        self.file = file
        self.line = line
        self.message = message
    }
    public var description: String { "\(file):\(line): \(message)" }
}

/// The resources found in one file.
public struct ManifestFileResult: Sendable, Equatable {
    public var rewrites: [InferenceModelRewrite] = []
    public var objectives: [InferenceObjective] = []
    public var pools: [InferencePool] = []
    /// Informational notes (e.g. ignored kinds).
    public var notes: [String] = []
    public init() {}
}

/// The merged view of a manifest directory.
public struct ManifestSnapshot: Sendable, Equatable {
    /// In file-name order, then document order (the tiebreak for missing timestamps).
    public var rewrites: [InferenceModelRewrite] = []
    public var objectives: [InferenceObjective] = []
    public var pools: [InferencePool] = []
    /// Errors of this load; the files concerned keep their previous good contents.
    public var errors: [ManifestError] = []
    public var notes: [String] = []
    /// Per-file good results, to pass as `previous` to the next load.
    public var files: [String: ManifestFileResult] = [:]
    public init() {}
}

/// Loads standalone manifests (InferenceModelRewrite, InferenceObjective, InferencePool).
public enum ManifestLoader {
    /// File name suffixes that are read.
    public static let extensions = [".yaml", ".yml", ".json"]

    /// Manifest files in `directory` (sorted; hidden files skipped).
    public static func manifestFiles(in directory: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.filter { n in !n.hasPrefix(".") && extensions.contains(where: { n.hasSuffix($0) }) }.sorted()
    }

    /// Loads every manifest file of `directory`. A file that fails keeps its entry from
    /// `previous` (keyed by file name) and contributes an error.
    public static func load(directory: String, previous: [String: ManifestFileResult] = [:]) -> ManifestSnapshot {
        var snap = ManifestSnapshot()
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDir), isDir.boolValue else {
            snap.errors.append(ManifestError(file: directory, line: 0, message: "not a readable directory"))
            snap.files = previous
            merge(into: &snap)
            return snap
        }
        for name in manifestFiles(in: directory) {
            let path = (directory as NSString).appendingPathComponent(name)
            guard let data = FileManager.default.contents(atPath: path) else {
                snap.errors.append(ManifestError(file: name, line: 0, message: "cannot read file"))
                if let p = previous[name] { snap.files[name] = p }
                continue
            }
            guard let text = String(data: data, encoding: .utf8) else {
                snap.errors.append(ManifestError(file: name, line: 0, message: "file is not UTF-8"))
                if let p = previous[name] { snap.files[name] = p }
                continue
            }
            do {
                snap.files[name] = try parse(text, file: name)
            } catch {
                snap.errors.append(error)
                if let p = previous[name] { snap.files[name] = p }
            }
        }
        merge(into: &snap)
        return snap
    }

    private static func merge(into snap: inout ManifestSnapshot) {
        for name in snap.files.keys.sorted() {
            let f = snap.files[name]!
            snap.rewrites += f.rewrites
            snap.objectives += f.objectives
            snap.pools += f.pools
            snap.notes += f.notes
        }
    }

    /// Parses one file's text (YAML, multi-document, or JSON).
    public static func parse(_ text: String, file: String) throws(ManifestError) -> ManifestFileResult {
        var result = ManifestFileResult()
        let parser: Parser
        do {
            parser = try Parser(yaml: text)
        } catch {
            throw manifestError(error, file: file, root: nil)
        }
        var docIndex = 0
        while true {
            let node: Node?
            do { node = try parser.nextRoot() } catch { throw manifestError(error, file: file, root: nil) }
            guard let node else { break }
            docIndex += 1
            let line = node.mark?.line ?? 0
            guard case .mapping(let map) = node else {
                if case .scalar(let s) = node, s.string.isEmpty || s.string == "~" || s.string == "null" { continue }
                throw ManifestError(file: file, line: line, message: "document \(docIndex) is not a mapping")
            }
            // `kind: List` (kubectl output): process its items like documents.
            if let kind = map["kind"]?.string, kind == "List" || kind.hasSuffix("List"), case .sequence(let items)? = map["items"] {
                for item in items { try add(item, file: file, what: "item", to: &result) }
            } else {
                try add(node, file: file, what: "document \(docIndex)", to: &result)
            }
        }
        return result
    }

    private static func add(_ node: Node, file: String, what: String, to result: inout ManifestFileResult) throws(ManifestError) {
        let line = node.mark?.line ?? 0
        guard case .mapping(let map) = node else {
            throw ManifestError(file: file, line: line, message: "\(what) is not a mapping")
        }
        let kind = map["kind"]?.string
        let apiVersion = map["apiVersion"]?.string
        guard let kind, let apiVersion else {
            throw ManifestError(file: file, line: line, message: "\(what) lacks apiVersion or kind")
        }
        do {
            switch kind {
            case "InferenceModelRewrite" where InferenceAPI.routingAPIVersions.contains(apiVersion):
                var r = try YAMLDecoder().decode(InferenceModelRewrite.self, from: node)
                if r.metadata.namespace?.isEmpty ?? true { r.metadata.namespace = "default" }
                result.rewrites.append(r)
            case "InferenceObjective" where InferenceAPI.routingAPIVersions.contains(apiVersion):
                var o = try YAMLDecoder().decode(InferenceObjective.self, from: node)
                if o.metadata.namespace?.isEmpty ?? true { o.metadata.namespace = "default" }
                result.objectives.append(o)
            case "InferencePool" where InferenceAPI.poolAPIVersions.contains(apiVersion):
                var p = try YAMLDecoder().decode(InferencePool.self, from: node)
                if p.metadata.namespace?.isEmpty ?? true { p.metadata.namespace = "default" }
                result.pools.append(p)
            default:
                result.notes.append("\(file):\(line): ignoring \(kind) (\(apiVersion))")
            }
        } catch {
            throw manifestError(error, file: file, root: node)
        }
    }

    /// Turns Yams / decoding errors into a located ManifestError.
    static func manifestError(_ error: any Error, file: String, root: Node?) -> ManifestError {
        if let e = error as? ManifestError { return e }
        if let y = error as? YamlError {
            switch y {
            case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _), .composer(_, let problem, let mark, _):
                return ManifestError(file: file, line: mark.line, message: "YAML syntax error: \(problem)")
            default:
                return ManifestError(file: file, line: 0, message: "YAML error: \(y)")
            }
        }
        if let d = error as? DecodingError {
            let (path, what): ([any CodingKey], String)
            switch d {
            case .keyNotFound(let key, let ctx):
                (path, what) = (ctx.codingPath, "missing required field '\(describe(ctx.codingPath + [key]))'")
            case .typeMismatch(let type, let ctx):
                (path, what) = (ctx.codingPath, "wrong type at '\(describe(ctx.codingPath))': expected \(type)")
            case .valueNotFound(let type, let ctx):
                (path, what) = (ctx.codingPath, "missing value at '\(describe(ctx.codingPath))': expected \(type)")
            case .dataCorrupted(let ctx):
                (path, what) = (ctx.codingPath, "invalid value at '\(describe(ctx.codingPath))': \(ctx.debugDescription)")
            @unknown default:
                (path, what) = ([], "\(d)")
            }
            let line = root.flatMap { locate(path, in: $0) } ?? root?.mark?.line ?? 0
            return ManifestError(file: file, line: line, message: what)
        }
        return ManifestError(file: file, line: root?.mark?.line ?? 0, message: "\(error)")
    }

    private static func describe(_ path: [any CodingKey]) -> String {
        path.map { k in k.intValue.map { "[\($0)]" } ?? ".\(k.stringValue)" }.joined().drop(while: { $0 == "." }).description
    }

    /// Line of the deepest node along `path`.
    private static func locate(_ path: [any CodingKey], in root: Node) -> Int? {
        var node = root
        var line = root.mark?.line
        for key in path {
            var next: Node?
            var nextLine: Int?
            switch node {
            case .mapping(let m):
                // Report the key's line: a mapping value starts on the line after its key.
                if let pair = m.first(where: { $0.key.string == key.stringValue }) {
                    next = pair.value
                    nextLine = pair.key.mark?.line
                }
            case .sequence(let s):
                if let i = key.intValue, i < s.count { next = s[i]; nextLine = s[i].mark?.line }
            default: next = nil
            }
            guard let n = next else { break }
            node = n
            if let l = nextLine { line = l }
        }
        return line
    }
}

/// Watches a manifest directory and reports merged snapshots on change.
///
/// A change is detected by comparing the directory's signature (names + mtime in ns + size +
/// inode, through symlinks), which is robust for ConfigMap symlink swaps and editors' atomic
/// renames. On Linux, inotify wakes the watcher as soon as anything in the directory changes, so
/// an edit applies within milliseconds and an idle EPP does not wake up to poll; the signature is
/// also re-checked every `interval` (file systems without inotify, a directory replaced whole).
/// Runs on its own thread, never on an event loop.
public final class ConfigDirectoryWatcher: Sendable {
    public let directory: String
    public let interval: Duration
    private let onChange: @Sendable (ManifestSnapshot) -> Void
    private let stopped = ManagedAtomic<Bool>(false)
    private let started = ManagedAtomic<Bool>(false)

    /// - Parameter onChange: called on the watcher thread with the first snapshot at start and
    ///   after every detected change.
    /// - Parameter interval: how often the signature is re-checked without a change notification
    ///   (the only detection where inotify is unavailable).
    public init(directory: String, interval: Duration = .seconds(2),
                onChange: @escaping @Sendable (ManifestSnapshot) -> Void) {
        self.directory = directory
        self.interval = interval
        self.onChange = onChange
    }

    /// Loads once synchronously and returns the snapshot (for startup), without starting.
    /// The watcher then reports only later changes.
    public func loadNow() -> ManifestSnapshot { poll(force: true)! }

    /// Starts the watcher thread. Unless `loadNow()` was used, the initial snapshot is
    /// delivered from that thread. The thread keeps the watcher alive until `stop()`.
    public func start() {
        guard started.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        let thread = Thread { [self] in self.run() }
        thread.name = "config-dir-watcher"
        thread.start()
    }

    /// Stops the watcher thread (at once; within one interval if the stop pipe could not be made).
    public func stop() {
        stopped.store(true, ordering: .releasing)
        wakeup.signal()
    }

    private let wakeup = DirectoryWakeup()

    /// Previous per-file results and the directory signature they were loaded from.
    private final class PollState: @unchecked Sendable {
        let lock = NSLock()
        var previous: [String: ManifestFileResult] = [:]
        var signature: [FileSignature]?
    }
    private let pollState = PollState()

    /// Reloads if the directory signature changed (or `force`); returns the new snapshot.
    private func poll(force: Bool) -> ManifestSnapshot? {
        pollState.lock.lock()
        defer { pollState.lock.unlock() }
        let sig = Self.signature(of: directory)
        if !force && sig == pollState.signature { return nil }
        pollState.signature = sig
        let snap = ManifestLoader.load(directory: directory, previous: pollState.previous)
        pollState.previous = snap.files
        return snap
    }

    private func run() {
        let (secs, attos) = interval.components
        let intervalMillis = max(1, Int(secs) * 1_000 + Int(attos / 1_000_000_000_000_000))
        wakeup.watch(directory)
        while !stopped.load(ordering: .acquiring) {
            if let snap = poll(force: false) { onChange(snap) }
            switch wakeup.wait(timeoutMillis: intervalMillis) {
            case .stopped:
                return
            case .changed:
                // Editors and kubelet change a directory in several steps: let them finish
                // (a half-written file would only be reported and replaced on the next event).
                // Bounded, so a file rewritten without pause is still re-read every half second.
                var quietChecks = 0
                while quietChecks < 25, wakeup.wait(timeoutMillis: 20) == .changed { quietChecks += 1 }
            case .timedOut:
                wakeup.watch(directory)  // re-arm: the directory may have been replaced whole
            }
        }
    }

    struct FileSignature: Equatable {
        var name: String
        var mtimeNanos: Int64
        var size: Int64
        var inode: UInt64
    }

    static func signature(of directory: String) -> [FileSignature] {
        var out: [FileSignature] = []
        for name in ManifestLoader.manifestFiles(in: directory) {
            let path = directory.hasSuffix("/") ? directory + name : directory + "/" + name
            var st = stat()
            guard stat(path, &st) == 0 else { out.append(FileSignature(name: name, mtimeNanos: -1, size: -1, inode: 0)); continue }
            #if canImport(Darwin)
            let mt = Int64(st.st_mtimespec.tv_sec) * 1_000_000_000 + Int64(st.st_mtimespec.tv_nsec)
            #else
            let mt = Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec)
            #endif
            out.append(FileSignature(name: name, mtimeNanos: mt, size: Int64(st.st_size), inode: UInt64(st.st_ino)))
        }
        return out
    }
}

/// What the watcher thread blocks on: inotify events for the directory (Linux) and a stop pipe,
/// with a timeout. Without inotify only the timeout and the stop pipe remain.
final class DirectoryWakeup: @unchecked Sendable {
    enum Reason: Equatable { case changed, timedOut, stopped }

    // Set once in init, read-only after: safe to share between the watcher thread and stop().
    private let stopRead: Int32
    private let stopWrite: Int32
    private let notifyFD: Int32

    init() {
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) == 0 {
            for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
            _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)
        }
        stopRead = fds[0]
        stopWrite = fds[1]
        #if os(Linux)
        notifyFD = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        #else
        notifyFD = -1
        #endif
    }

    /// Adds (or refreshes) the watch on `directory`; harmless if it is already watched or missing.
    func watch(_ directory: String) {
        #if os(Linux)
        guard notifyFD >= 0 else { return }
        let mask = IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
            | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
        _ = inotify_add_watch(notifyFD, directory, UInt32(mask))
        #endif
    }

    func signal() {
        guard stopWrite >= 0 else { return }
        var byte: UInt8 = 1
        _ = write(stopWrite, &byte, 1)
    }

    func wait(timeoutMillis: Int) -> Reason {
        var fds = [pollfd(fd: stopRead, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: notifyFD, events: Int16(POLLIN), revents: 0)]
        let n = poll(&fds, nfds_t(fds.count), Int32(clamping: timeoutMillis))
        if n <= 0 { return .timedOut }  // EINTR counts as a timeout: the caller re-checks anyway
        if fds[0].revents != 0 { return .stopped }
        guard fds[1].revents != 0 else { return .timedOut }
        drainNotifications()
        return .changed
    }

    /// The events themselves do not matter (the signature says what changed): read them away.
    private func drainNotifications() {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while read(notifyFD, &buffer, buffer.count) > 0 {}
    }

    // Closed only here: stop() may still be signalling after the thread has returned, and a
    // closed descriptor number can be reused by anything else in the process.
    deinit {
        for fd in [stopRead, stopWrite, notifyFD] where fd >= 0 { _ = close(fd) }
    }
}
