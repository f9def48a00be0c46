/// Per-stream state keyed by stream id that remembers the entry found last.
///
/// Events come in runs for one stream (the fields of a header block, the DATA of one read, a
/// reply's data, trailers and nghttp2's send callbacks), so most lookups hit the remembered entry
/// and skip hashing the id. Stream ids are never reused on a connection.
public struct StreamTable<Value: AnyObject> {
    private var entries: [HTTP2StreamID: Value] = [:]
    private var recentID: HTTP2StreamID = -1
    private var recent: Value?

    public init() {}

    public var isEmpty: Bool { entries.isEmpty }
    public var all: Dictionary<HTTP2StreamID, Value>.Values { entries.values }

    public subscript(id: HTTP2StreamID) -> Value? {
        mutating get {
            if id == recentID { return recent }
            guard let found = entries[id] else { return nil }
            recentID = id
            recent = found
            return found
        }
    }

    public mutating func insert(_ value: Value, for id: HTTP2StreamID) {
        entries[id] = value
        recentID = id
        recent = value
    }

    @discardableResult
    public mutating func remove(_ id: HTTP2StreamID) -> Value? {
        if id == recentID {
            recentID = -1
            recent = nil
        }
        return entries.removeValue(forKey: id)
    }

    public mutating func removeAll() {
        entries.removeAll()
        recentID = -1
        recent = nil
    }
}
