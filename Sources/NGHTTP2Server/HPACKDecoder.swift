import CNGHTTP2
import NIOCore

/// Decodes HPACK header blocks with nghttp2's inflater: for tests and diagnostics that need to read
/// what the server sent (e.g. `grpc-status` in trailers).
public final class HPACKDecoder {
    private var inflater: OpaquePointer?

    public init() throws {
        var p: OpaquePointer?
        let rv = nghttp2_hd_inflate_new(&p)
        guard rv == 0, let p else { throw HTTP2SessionError(rv, "nghttp2_hd_inflate_new") }
        inflater = p
    }

    deinit { nghttp2_hd_inflate_del(inflater) }

    /// Decodes one complete header block (HEADERS + CONTINUATION payloads joined).
    public func decode(_ block: ByteBuffer) throws -> [(name: String, value: String)] {
        var out: [(String, String)] = []
        try block.withUnsafeReadableBytes { raw in
            var offset = 0
            while true {
                var nv = nghttp2_nv()
                var flags: Int32 = 0
                let base = raw.baseAddress.map { $0.assumingMemoryBound(to: UInt8.self) + offset }
                let n = nghttp2_hd_inflate_hd2(inflater, &nv, &flags, base, raw.count - offset, 1)
                if n < 0 { throw HTTP2SessionError(Int32(n), "HPACK decode") }
                offset += n
                if flags & Int32(NGHTTP2_HD_INFLATE_EMIT.rawValue) != 0 {
                    out.append((String(decoding: UnsafeRawBufferPointer(start: nv.name, count: nv.namelen), as: UTF8.self),
                                String(decoding: UnsafeRawBufferPointer(start: nv.value, count: nv.valuelen), as: UTF8.self)))
                }
                if flags & Int32(NGHTTP2_HD_INFLATE_FINAL.rawValue) != 0 {
                    nghttp2_hd_inflate_end_headers(inflater)
                    break
                }
                if n == 0 && flags & Int32(NGHTTP2_HD_INFLATE_EMIT.rawValue) == 0 { break }
            }
        }
        return out
    }
}
