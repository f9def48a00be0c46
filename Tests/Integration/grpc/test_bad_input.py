"""Bad input at the TCP, TLS, HTTP/2 and gRPC layers. After every case: the process is alive, a fresh client
gets SERVING on both ports, and RSS is back within +20 MiB of the idle level measured after warm-up."""
from __future__ import annotations

import random
import socket
import struct
import threading
import time

import grpc
import h2.exceptions
import h2.settings
import pytest

from epp_testlib import (ECHO, ECHO_UNARY, HEALTH_CHECK, SERVING, SERVING_FRAME, MiB, RawH2, assert_serving,
                         echo_unary, grpc_frame, health_check, health_request, split_grpc_frames,
                         wait_closed_by_peer, wait_rss_back)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
RSS_SLACK_MIB = 20.0


def _warm_up(server):
    with server.channel() as ch:
        for _ in range(100):
            assert health_check(ch) == SERVING
        u = echo_unary(ch)
        for i in range(100):
            assert u(b"w%d" % i, timeout=5) == b"w%d" % i
        big = b"b" * MiB
        assert u(big, timeout=10) == big
    time.sleep(1.0)


@pytest.fixture(scope="module")
def h2c(epp_module_factory):
    s = epp_module_factory(["--enable-test-echo-service"], name="bad-h2c")
    _warm_up(s)
    s.baseline_mib = s.rss_mib()
    return s


@pytest.fixture(scope="module")
def tls(epp_module_factory):
    s = epp_module_factory(["--enable-test-echo-service"], name="bad-tls", secure=True)
    _warm_up(s)
    s.baseline_mib = s.rss_mib()
    return s


def recovered(server):
    assert server.alive(), f"epp died (exit {server.proc.returncode})\n{server.log_tail()}"
    assert_serving(server)
    rss = wait_rss_back(server, server.baseline_mib, RSS_SLACK_MIB)
    print(f"RSS idle {server.baseline_mib:.1f} MiB, after case {rss:.1f} MiB")


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _send_ignoring_reset(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close while we are still sending: that is a valid reaction


GARBAGE_PREFACES = {
    "http1-request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n",
    "random-64k": random.Random(1).randbytes(65536),
    "almost-preface": b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\x00" * 64,
    "tls-clienthello-to-h2c": bytes.fromhex("160301002a0100002603035a") + b"\x00" * 40,
}


@pytest.mark.parametrize("name", list(GARBAGE_PREFACES))
def test_garbage_instead_of_preface(h2c, name):
    s = _connect(h2c.grpc_port)
    try:
        _send_ignoring_reset(s, GARBAGE_PREFACES[name])
        closed, _ = wait_closed_by_peer(s, 5)
        assert closed, "server kept a connection open after a bad connection preface"
    finally:
        s.close()
    recovered(h2c)


GARBAGE_FRAMES = {
    # length 0xffffff > SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR
    "oversized-frame": b"\xff" * 100,
    # DATA on stream 0: PROTOCOL_ERROR
    "data-on-stream-0": b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd",
    # HEADERS (END_HEADERS) on stream 1 whose block is not valid HPACK: COMPRESSION_ERROR
    "bad-hpack": b"\x00\x00\x0a\x01\x04\x00\x00\x00\x01" + b"\xff" * 10,
    # SETTINGS with a length that is not a multiple of 6: FRAME_SIZE_ERROR
    "bad-settings": b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5,
    # WINDOW_UPDATE overflowing the connection window: FLOW_CONTROL_ERROR
    "window-overflow": b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x7f\xff\xff\xff" * 2,
    "random-64k": random.Random(2).randbytes(65536),
}


@pytest.mark.parametrize("name", list(GARBAGE_FRAMES))
def test_garbage_frames_after_valid_preface(h2c, name):
    s = _connect(h2c.grpc_port)
    try:
        s.sendall(PREFACE + EMPTY_SETTINGS)
        _send_ignoring_reset(s, GARBAGE_FRAMES[name])
        closed, got = wait_closed_by_peer(s, 5)
        assert closed, f"server kept the connection open after invalid frames ({len(got)} bytes received)"
        # report whether a GOAWAY (frame type 7) was sent first (RFC 9113: SHOULD)
        print("GOAWAY seen:", _has_goaway(got))
    finally:
        s.close()
    recovered(h2c)


def _has_goaway(data: bytes) -> bool:
    i = 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        if data[i + 3] == 7:
            return True
        i += 9 + length
    return False


@pytest.mark.parametrize("path", [ECHO_UNARY, ECHO, HEALTH_CHECK])
def test_length_prefix_larger_than_data_then_hangup(h2c, path):
    for _ in range(100):
        c = RawH2(h2c.grpc_port)
        sid = c.headers(path)
        c.data(sid, struct.pack(">BI", 0, 1000) + b"0123456789")
        c.close()
    recovered(h2c)


@pytest.mark.parametrize("path", [ECHO_UNARY, HEALTH_CHECK])
def test_length_prefix_larger_than_data_then_end_stream(h2c, path):
    c = RawH2(h2c.grpc_port)
    try:
        sid = c.headers(path)
        c.data(sid, struct.pack(">BI", 0, 1000) + b"0123456789", end_stream=True)
        st = c.wait_done(sid, 5)
        assert st.done, st
        assert st.grpc_status not in (None, "0"), f"a truncated message must fail the call: {st}"
        assert c.unary(HEALTH_CHECK, health_request("")).grpc_status == "0"
    finally:
        c.close()
    recovered(h2c)


@pytest.mark.parametrize("path", [ECHO_UNARY, ECHO, HEALTH_CHECK])
def test_100mib_declared_message_length(h2c, path):
    c = RawH2(h2c.grpc_port)
    try:
        sid = c.headers(path)
        t0 = time.monotonic()
        c.data(sid, struct.pack(">BI", 0, 100 * MiB) + b"\x00" * 65536)
        st = c.wait_done(sid, 5)
        assert st.done, f"no answer within 5 s to a 100 MiB declared length (server waiting for the body?): {st}"
        assert st.grpc_status == "8", f"expected RESOURCE_EXHAUSTED (8): {st}"
        print(f"RESOURCE_EXHAUSTED after {time.monotonic() - t0:.3f}s")
        # the connection is still alive
        st2 = c.unary(HEALTH_CHECK, health_request(""))
        assert st2.grpc_status == "0" and bytes(st2.data) == SERVING_FRAME, st2
    finally:
        c.close()
    recovered(h2c)


INVALID_PROTOBUF = {
    "truncated-length-delimited": b"\x0a\x10abc",
    "overlong-varint": b"\xff" * 11,
    "invalid-utf8-string": b"\x0a\x02\xc3\x28",
}


@pytest.mark.parametrize("name", list(INVALID_PROTOBUF))
def test_invalid_protobuf_grpcio(h2c, name):
    with h2c.channel() as ch:
        raw_check = ch.unary_unary(HEALTH_CHECK)
        with pytest.raises(grpc.RpcError) as err:
            raw_check(INVALID_PROTOBUF[name], timeout=5)
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), err.value
        assert health_check(ch) == SERVING
    recovered(h2c)


@pytest.mark.parametrize("name", list(INVALID_PROTOBUF))
def test_invalid_protobuf_same_connection(h2c, name):
    c = RawH2(h2c.grpc_port)
    try:
        st = c.unary(HEALTH_CHECK, INVALID_PROTOBUF[name])
        assert st.ended, f"stream not closed: {st}"
        assert st.grpc_status in ("13", "3"), f"expected INTERNAL or INVALID_ARGUMENT: {st}"
        st2 = c.unary(HEALTH_CHECK, health_request(""))
        assert not c.eof and c.goaway is None, "the connection was closed after a bad message"
        assert st2.grpc_status == "0" and bytes(st2.data) == SERVING_FRAME, st2
    finally:
        c.close()
    recovered(h2c)


def test_streams_opened_and_reset_by_the_thousand(h2c):
    """5,000 streams opened and reset (some mid-message, some after a full message). The server may defend
    itself with GOAWAY (rapid-reset protection); we then reconnect. It must not die or leak."""
    target, done, conns, goaways = 5000, 0, 0, []
    while done < target and conns < 50:
        c = RawH2(h2c.grpc_port)
        conns += 1
        try:
            while done < target and not c.eof and c.goaway is None:
                for _ in range(100):
                    try:
                        sid = c.headers(ECHO if done % 2 else ECHO_UNARY)
                        k = done % 3
                        if k == 1:
                            c.data(sid, struct.pack(">BI", 0, 100) + b"x" * 10)
                        elif k == 2:
                            c.data(sid, grpc_frame(b"full message"))
                        c.reset(sid, 8)  # CANCEL
                    except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError, OSError, TimeoutError,
                            ConnectionError):
                        break
                    done += 1
                c.pump(0.01)
            if c.goaway is not None:
                goaways.append(c.goaway.error_code)
        finally:
            c.close()
    print(f"{done} streams reset over {conns} connections; GOAWAY codes {goaways}")
    assert done >= target, f"only {done} streams could be opened over {conns} connections"
    recovered(h2c)


def _rss_sampler(server, stop: threading.Event, peak: list):
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], server.rss_mib())
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.05)


def test_client_never_reads_http2_windows(h2c):
    """Many echo requests with large responses; the client never returns flow-control credit for what it
    receives, so the server cannot send the responses. It must stop taking requests instead of buffering them."""
    offered_target = 512 * MiB
    msg = grpc_frame(b"\xab" * MiB)
    stop, peak = threading.Event(), [h2c.rss_mib()]
    sampler = threading.Thread(target=_rss_sampler, args=(h2c, stop, peak), daemon=True)
    sampler.start()
    c = RawH2(h2c.grpc_port, ack_data=False)
    sent = 0
    try:
        c.pump(0.5)
        sids = [c.headers(ECHO) for _ in range(8)]
        offsets = {sid: 0 for sid in sids}
        last_progress = time.monotonic()
        tcp_blocked = False
        while sent < offered_target and time.monotonic() - last_progress < 3.0 and not c.eof and not tcp_blocked:
            progressed = False
            for sid in sids:
                if c.streams[sid].done:
                    continue
                window = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size)
                if window <= 0:
                    continue
                off = offsets[sid] % len(msg)
                chunk = msg[off:off + window]
                try:
                    c.conn.send_data(sid, chunk)
                    c.flush()
                except (socket.timeout, TimeoutError):
                    tcp_blocked = True  # TCP back-pressure: the server stopped reading; that is the goal
                    break
                offsets[sid] += len(chunk)
                sent += len(chunk)
                progressed = True
            if progressed:
                last_progress = time.monotonic()
            else:
                c.pump(0.2)
        time.sleep(1.0)
        growth = peak[0] - h2c.baseline_mib
        print(f"client pushed {sent / MiB:.1f} MiB of {offered_target / MiB:.0f} MiB offered; "
              f"received {c.received_data_bytes / MiB:.2f} MiB; server RSS peak +{growth:.1f} MiB")
        assert sent < offered_target, "the server took all 512 MiB of requests although it could send none of the replies " \
                                       "(and its memory did not grow: replies dropped?)"
        assert growth < 128, f"server memory grew by {growth:.1f} MiB while the client did not read " \
                             f"(pushed {sent / MiB:.1f} MiB)"
    finally:
        stop.set()
        sampler.join()
        c.close()
    recovered(h2c)


def test_client_never_reads_tcp(h2c):
    """The client grants the server unlimited HTTP/2 windows, then never calls recv(): the server's socket
    buffer fills, and the server must stop consuming requests rather than buffer responses in memory."""
    big = 2 ** 31 - 1
    msg = grpc_frame(b"\xcd" * MiB)
    stop, peak = threading.Event(), [h2c.rss_mib()]
    sampler = threading.Thread(target=_rss_sampler, args=(h2c, stop, peak), daemon=True)
    sampler.start()
    c = RawH2(h2c.grpc_port, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: big})
    sent, streams = 0, 0
    try:
        c.conn.increment_flow_control_window(big - 65535)
        c.flush()
        c.pump(0.5)  # the server's SETTINGS (and window) only; nothing is read after this
        c.pump(0.2)
        c.sock.settimeout(3.0)
        sid = None
        while sent < 512 * MiB and not c.eof:
            if sid is None or c.conn.local_flow_control_window(sid) <= 0:
                if c.conn.outbound_flow_control_window <= 0:
                    break  # no more credit without reading: the server's own window bounds this client
                try:
                    sid = c.headers(ECHO)
                except h2.exceptions.TooManyStreamsError:
                    break
                streams += 1
            window = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size)
            chunk = msg[:window]
            try:
                c.conn.send_data(sid, chunk)
                c.flush()
            except (socket.timeout, TimeoutError, BlockingIOError):
                break  # TCP back-pressure reached
            sent += len(chunk)
        time.sleep(1.0)
        growth = peak[0] - h2c.baseline_mib
        print(f"pushed {sent / MiB:.1f} MiB on {streams} streams without reading; server RSS peak +{growth:.1f} MiB")
        assert growth < 128, f"server memory grew by {growth:.1f} MiB while the client never read"
    finally:
        stop.set()
        sampler.join()
        c.close()
    recovered(h2c)


def test_connection_churn(h2c):
    """500 connections opened (half with a request in flight) and dropped."""
    socks = []
    for i in range(500):
        c = RawH2(h2c.grpc_port)
        if i % 2:
            c.headers(ECHO)
        socks.append(c)
        if len(socks) >= 100:
            for s in socks:
                s.close()
            socks.clear()
    for s in socks:
        s.close()
    recovered(h2c)


TLS_GARBAGE = {
    "random-4k": random.Random(3).randbytes(4096),
    "http1-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "h2-preface-plaintext": PREFACE + EMPTY_SETTINGS,
    # a handshake record declaring 65535 bytes (> 2^14 + 2048): record_overflow at once
    "bad-record-length": bytes.fromhex("160301ffff01") + b"\x00" * 64,
}


@pytest.mark.parametrize("name", list(TLS_GARBAGE))
def test_tls_garbage_instead_of_client_hello(tls, name):
    s = _connect(tls.grpc_port)
    try:
        _send_ignoring_reset(s, TLS_GARBAGE[name])
        closed, _ = wait_closed_by_peer(s, 5)
        assert closed, "TLS server kept a connection open after garbage instead of a ClientHello"
    finally:
        s.close()
    recovered(tls)


def test_tls_reset_streams_and_hangups(tls):
    """The same stream abuse over TLS: reset streams, a truncated message and a hang-up mid-record."""
    for i in range(20):
        c = RawH2(tls.grpc_port, tls=True)
        for _ in range(50):
            sid = c.headers(ECHO)
            c.data(sid, struct.pack(">BI", 0, 100) + b"x")
            c.reset(sid)
        sid = c.headers(ECHO_UNARY)
        c.data(sid, struct.pack(">BI", 0, 1000) + b"partial")
        c.close()
    recovered(tls)


def test_tls_handshake_then_silence_then_hangup(tls):
    """Connections that finish TLS but never send the HTTP/2 preface, then go away."""
    import ssl
    conns = []
    for _ in range(50):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        conns.append(ctx.wrap_socket(_connect(tls.grpc_port), server_hostname="localhost"))
    time.sleep(0.5)
    for s in conns:
        s.close()
    recovered(tls)
