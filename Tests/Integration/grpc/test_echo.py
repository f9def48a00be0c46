"""The test-only echo service (`--enable-test-echo-service`, raw bytes): streaming order, concurrency on one
connection, large messages and limits, deadlines, routing errors and compression."""
from __future__ import annotations

import asyncio
import gzip
import threading
import time

import grpc
import pytest

from epp_testlib import (ECHO, ECHO_UNARY, HEALTH_CHECK, MiB, RawH2, big_options, echo_bidi, echo_unary,
                         grpc_frame, health_check, health_request, split_grpc_frames, SERVING)

DEFAULT_LIMIT = 4194304
RAISED_LIMIT = 32 * MiB
TRANSPORTS = ["h2c", "tls"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def echo_server(request, epp_module_factory):
    return epp_module_factory(["--enable-test-echo-service"], name=f"echo-{request.param}",
                              secure=request.param == "tls")


@pytest.fixture(scope="module", params=TRANSPORTS)
def big_server(request, epp_module_factory):
    return epp_module_factory(["--enable-test-echo-service", "--max-message-bytes", str(RAISED_LIMIT)],
                              name=f"big-{request.param}", secure=request.param == "tls")


@pytest.fixture(scope="module")
def h2c_echo(epp_module_factory):
    return epp_module_factory(["--enable-test-echo-service"], name="echo-raw")


def established_server_conns(port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is the server port (i.e. accepted connections)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) == port and parts[3] == "01":
                n += 1
    return n


@pytest.mark.parametrize("size", [0, 1, 100, 65536 + 3, MiB])
def test_unary_echo(echo_server, size):
    payload = bytes((i * 7) & 0xFF for i in range(size))
    with echo_server.channel(options=big_options()) as ch:
        assert echo_unary(ch)(payload, timeout=10) == payload


def test_bidi_1000_messages_in_order(echo_server):
    msgs = [(b"%06d:" % i) * (1 + i % 50) for i in range(1000)]
    with echo_server.channel() as ch:
        call = echo_bidi(ch)(iter(msgs), timeout=60)
        got = list(call)
        assert call.code() == grpc.StatusCode.OK
    assert len(got) == len(msgs)
    first_bad = next((i for i, (a, b) in enumerate(zip(got, msgs)) if a != b), None)
    assert first_bad is None, f"message {first_bad} out of order or altered"


def test_bidi_ping_pong_replies_before_half_close(echo_server):
    """Each reply arrives while the request side is still open (true streaming, not batch-at-end)."""
    import queue
    q: queue.Queue = queue.Queue()

    def requests():
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    with echo_server.channel() as ch:
        call = echo_bidi(ch)(requests(), timeout=30)
        try:
            for i in range(100):
                msg = b"ping-%d" % i
                q.put(msg)
                assert next(call) == msg
        finally:
            q.put(None)
        assert list(call) == []
        assert call.code() == grpc.StatusCode.OK


def test_500_concurrent_streams_on_one_connection(echo_server):
    n_streams, per_stream = 500, 5
    max_conns = [0]
    stop = threading.Event()

    def watch_conns():
        while not stop.is_set():
            max_conns[0] = max(max_conns[0], established_server_conns(echo_server.grpc_port))
            time.sleep(0.05)

    async def one(ch, k):
        call = echo_bidi(ch)(timeout=60)
        out = []
        for j in range(per_stream):
            await call.write(b"s%d-m%d" % (k, j))
        await call.done_writing()
        async for r in call:
            out.append(r)
        assert await call.code() == grpc.StatusCode.OK
        return k, out

    async def main():
        async with echo_server.channel(aio=True) as ch:
            await asyncio.wait_for(ch.channel_ready(), 10)
            # hold every stream open at once: all 500 send before any half-closes
            results = await asyncio.gather(*(one(ch, k) for k in range(n_streams)))
            return results

    t = threading.Thread(target=watch_conns, daemon=True)
    t.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        t.join()
    for k, out in results:
        assert out == [b"s%d-m%d" % (k, j) for j in range(per_stream)], f"stream {k} got {out[:3]}..."
    assert max_conns[0] == 1, f"expected the 500 streams on one connection, saw {max_conns[0]}"


def test_500_concurrent_unary_calls_one_channel(echo_server):
    with echo_server.channel() as ch:
        unary = echo_unary(ch)
        futs = [unary.future(b"u%d" % i, timeout=60) for i in range(500)]
        assert [f.result() for f in futs] == [b"u%d" % i for i in range(500)]


def test_16mib_message_with_raised_limit(big_server):
    payload = bytes(range(256)) * (16 * MiB // 256)
    with big_server.channel(options=big_options()) as ch:
        t0 = time.monotonic()
        assert echo_unary(ch)(payload, timeout=60) == payload
        unary_s = time.monotonic() - t0
        t0 = time.monotonic()
        call = echo_bidi(ch)(iter([payload, payload[::-1]]), timeout=60)
        got = list(call)
        bidi_s = time.monotonic() - t0
    assert len(got) == 2 and got[0] == payload and got[1] == payload[::-1]
    # a quadratic reassembly shows up as tens of seconds here
    assert unary_s < 15 and bidi_s < 30, f"16 MiB unary took {unary_s:.1f}s, 2x16 MiB bidi {bidi_s:.1f}s"


def test_over_raised_limit_resource_exhausted(big_server):
    with big_server.channel(options=big_options(64 * MiB)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            echo_unary(ch)(b"x" * (RAISED_LIMIT + 1), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert echo_unary(ch)(b"after", timeout=10) == b"after"


def test_default_limit_boundary(echo_server):
    with echo_server.channel(options=big_options()) as ch:
        exact = b"e" * DEFAULT_LIMIT
        assert echo_unary(ch)(exact, timeout=30) == exact, "a message of exactly --max-message-bytes is allowed"


@pytest.mark.parametrize("kind", ["unary", "bidi"])
def test_over_default_limit_resource_exhausted(echo_server, kind):
    with echo_server.channel(options=big_options()) as ch:
        big = b"o" * (DEFAULT_LIMIT + 1)
        with pytest.raises(grpc.RpcError) as err:
            if kind == "unary":
                echo_unary(ch)(big, timeout=30)
            else:
                list(echo_bidi(ch)(iter([b"small", big, b"never"]), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        # the stream failed, not the connection
        assert echo_unary(ch)(b"still-ok", timeout=10) == b"still-ok"


def test_deadline_exceeded_client_timeout(echo_server):
    release = threading.Event()

    def requests():
        yield b"first"
        release.wait(10)  # keep the request side open while the deadline passes

    with echo_server.channel() as ch:
        call = echo_bidi(ch)(requests(), timeout=0.5)
        try:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 5
        finally:
            release.set()
        assert health_check(ch) == SERVING


@pytest.mark.parametrize("timeout_header,expect_s", [("100m", 0.1), ("300000u", 0.3), ("1S", 1.0)])
def test_deadline_enforced_by_server(h2c_echo, timeout_header, expect_s):
    """The client never ends the stream; the server must end it with grpc-status 4 on its own."""
    c = RawH2(h2c_echo.grpc_port)
    try:
        t0 = time.monotonic()
        sid = c.headers(ECHO, timeout_header=timeout_header)
        c.data(sid, grpc_frame(b"hello"))
        st = c.wait_done(sid, timeout=expect_s + 5)
        elapsed = time.monotonic() - t0
        assert st.done, f"server did not end the stream after grpc-timeout {timeout_header} ({elapsed:.1f}s): {st}"
        assert st.grpc_status == "4", f"expected grpc-status 4 (DEADLINE_EXCEEDED), got {st}"
        assert expect_s * 0.8 <= elapsed <= expect_s + 2.0, f"deadline fired after {elapsed:.2f}s"
        assert split_grpc_frames(bytes(st.data)) in ([], [b"hello"])
        # the connection is still usable
        st2 = c.unary(HEALTH_CHECK, health_request(""))
        assert st2.grpc_status == "0", st2
    finally:
        c.close()


def test_deadline_enforced_unary_partial_message(h2c_echo):
    c = RawH2(h2c_echo.grpc_port)
    try:
        sid = c.headers(ECHO_UNARY, timeout_header="100m")
        c.data(sid, grpc_frame(b"0123456789")[:8])  # incomplete message, stream left open
        st = c.wait_done(sid, timeout=5)
        assert st.grpc_status == "4", st
    finally:
        c.close()


@pytest.mark.parametrize("path", ["/epp.test.Echo/Nope", "/no.such.Service/Method",
                                  "/grpc.health.v1.Health/Nope", "/epp.test.Echo"])
def test_unknown_method_or_service_unimplemented(echo_server, path):
    with echo_server.channel() as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(path)(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value
        with pytest.raises(grpc.RpcError) as err:
            list(ch.stream_stream(path)(iter([b"a", b"b"]), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value
        assert health_check(ch) == SERVING


def test_errors_are_trailers_only(h2c_echo):
    c = RawH2(h2c_echo.grpc_port)
    try:
        st = c.unary("/no.such.Service/Method", b"")
        assert st.ended, st
        assert st.headers.get(":status") == "200", st
        assert st.headers.get("content-type", "").startswith("application/grpc"), st
        assert st.grpc_status == "12", st
        assert not st.trailers and not st.data, f"expected a trailers-only response: {st}"
    finally:
        c.close()


def test_echo_service_absent_without_flag(epp_factory):
    s = epp_factory([], name="no-echo")
    with s.channel() as ch:
        with pytest.raises(grpc.RpcError) as err:
            echo_unary(ch)(b"x", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("path", [ECHO_UNARY, ECHO])
def test_gzip_compressed_message_unimplemented(h2c_echo, path):
    c = RawH2(h2c_echo.grpc_port)
    try:
        sid = c.headers(path, extra=[("grpc-encoding", "gzip"), ("grpc-accept-encoding", "gzip")])
        c.data(sid, grpc_frame(gzip.compress(b"hello " * 100), compressed=True), end_stream=True)
        st = c.wait_done(sid, timeout=5)
        assert st.grpc_status == "12", f"expected UNIMPLEMENTED for a gzip-compressed message: {st}"
        msg = st.grpc_message
        assert any(w in msg.lower() for w in ("gzip", "compress", "encoding")), f"unclear grpc-message {msg!r}"
        assert all(0x20 <= ord(ch) <= 0x7E for ch in msg), f"grpc-message not percent-encoded: {msg!r}"
        assert not split_grpc_frames(bytes(st.data)), "no echo expected for a message the server cannot read"
        # the connection survives
        assert c.unary(ECHO_UNARY, b"plain").grpc_status == "0"
    finally:
        c.close()


def test_gzip_from_grpcio_unimplemented(echo_server):
    with echo_server.channel() as ch:
        with pytest.raises(grpc.RpcError) as err:
            echo_unary(ch)(b"z" * 4096, timeout=5, compression=grpc.Compression.Gzip)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value


def test_identity_encoding_header_is_fine(h2c_echo):
    """grpc-encoding: identity with uncompressed messages is plain gRPC."""
    c = RawH2(h2c_echo.grpc_port)
    try:
        st = c.unary(ECHO_UNARY, b"plain", extra=[("grpc-encoding", "identity"),
                                                  ("grpc-accept-encoding", "identity,gzip")])
        assert st.grpc_status == "0", st
        assert split_grpc_frames(bytes(st.data)) == [b"plain"]
    finally:
        c.close()


def test_message_split_across_many_data_frames(h2c_echo):
    """One gRPC message delivered in 1-byte and odd-sized DATA frames is reassembled."""
    c = RawH2(h2c_echo.grpc_port)
    try:
        payload = bytes(range(256)) * 40
        frame = grpc_frame(payload) + grpc_frame(b"second")
        sid = c.headers(ECHO)
        for i in range(0, 64):
            c.data(sid, frame[i:i + 1])
        pos = 64
        for size in (7, 1000, 3, 4096):
            c.data(sid, frame[pos:pos + size])
            pos += size
        c.data(sid, frame[pos:], end_stream=True)
        st = c.wait_done(sid, timeout=10)
        assert st.grpc_status == "0", st
        assert split_grpc_frames(bytes(st.data)) == [payload, b"second"]
    finally:
        c.close()


def test_many_messages_in_one_data_frame(h2c_echo):
    c = RawH2(h2c_echo.grpc_port)
    try:
        msgs = [b"m%d" % i for i in range(300)]
        sid = c.headers(ECHO)
        c.data(sid, b"".join(grpc_frame(m) for m in msgs), end_stream=True)
        st = c.wait_done(sid, timeout=10)
        assert st.grpc_status == "0", st
        assert split_grpc_frames(bytes(st.data)) == msgs
    finally:
        c.close()


def test_slow_reader_gets_every_message(echo_server):
    """Back-pressure must slow the client down, never lose or corrupt replies: 20 x 1 MiB on one Echo stream
    while the client withholds WINDOW_UPDATE; once it stalls (or has sent all), the client reads everything
    and must get all 20 messages intact, in order, then grpc-status 0."""
    server = echo_server
    n = 20
    msgs = [bytes([i]) * 7 + bytes(range(256)) * 4096 for i in range(n)]
    wire = b"".join(grpc_frame(m) for m in msgs)
    c = RawH2(server.grpc_port, tls=server.secure, ack_data=False, timeout=30)
    try:
        c.pump(0.3)
        sid = c.headers(ECHO)
        sent, last_progress = 0, time.monotonic()
        while sent < len(wire) and time.monotonic() - last_progress < 2.0 and not c.streams[sid].done:
            w = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size)
            if w <= 0:
                c.pump(0.2)
                continue
            chunk = wire[sent:sent + w]
            c.conn.send_data(sid, chunk)
            c.flush()
            sent += len(chunk)
            last_progress = time.monotonic()
        stalled_at = sent
        # now read: return all credit and keep returning it
        c.ack_data = True
        if c.received_data_bytes:
            c.conn.acknowledge_received_data(c.received_data_bytes, sid)
        c.flush()
        assert c.data(sid, wire[sent:], end_stream=True, deadline=time.monotonic() + 60) or c.streams[sid].done
        st = c.wait_done(sid, 60)
        print(f"client stalled after {stalled_at / MiB:.1f} MiB of {len(wire) / MiB:.1f} MiB; "
              f"got {len(st.data)} bytes back, status {st.grpc_status}")
        assert st.grpc_status == "0", st
        if len(st.data) != len(wire):
            try:
                sizes = [len(m) for m in split_grpc_frames(bytes(st.data))]
            except AssertionError as e:
                sizes = str(e)
            pytest.fail(f"echoed {len(st.data)} bytes for {len(wire)} sent (client stalled at {stalled_at}); "
                        f"reply message sizes {sizes}")
        assert split_grpc_frames(bytes(st.data)) == msgs, "replies reordered or corrupted"
    finally:
        c.close()
