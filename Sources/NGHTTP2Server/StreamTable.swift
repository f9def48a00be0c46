/// Per-stream state keyed by stream id that remembers the entry found last.
///
/// Events come in runs for one stream (the fields of a header block, the DATA of one read, a
/// reply's data, trailers and nghttp2's send callbacks), so most lookups hit the remembered entry
/// and skip hashing the id. Stream ids are never reused on a connection. Inlinable, so the gRPC
/// layer gets it specialised for its own type rather than through generic witnesses.
public struct StreamTable<Value: AnyObject> {
    @usableFromInline var entries: [HTTP2StreamID: Value] = [:]
    @usableFromInline var recentID: HTTP2StreamID = -1
    @usableFromInline var recent: Value?

    @inlinable public init() {}

    @inlinable
    public var isEmpty: Bool { entries.isEmpty }
    @inlinable
    public var all: Dictionary<HTTP2StreamID, Value>.Values { entries.values }

    @inlinable
    public subscript(id: HTTP2StreamID) -> Value? {
        mutating get {
            if id == recentID { return recent }
            guard let found = entries[id] else { return nil }
            recentID = id
            recent = found
            return found
        }
    }

    @inlinable
    public mutating func insert(_ value: Value, for id: HTTP2StreamID) {
        entries[id] = value
        recentID = id
        recent = value
    }

    @discardableResult
    @inlinable
    public mutating func remove(_ id: HTTP2StreamID) -> Value? {
        if id == recentID {
            recentID = -1
            recent = nil
        }
        return entries.removeValue(forKey: id)
    }

    @inlinable
    public mutating func removeAll() {
        entries.removeAll()
        recentID = -1
        recent = nil
    }
}
