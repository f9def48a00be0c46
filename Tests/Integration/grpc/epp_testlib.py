"""Protocol helpers for the issue-2 tests: gRPC framing, grpcio health/echo calls and a raw HTTP/2 client
(the `h2` package over a plain or TLS socket) for frame-level cases."""
from __future__ import annotations

import select
import socket
import ssl
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
ECHO = "/epp.test.Echo/Echo"
ECHO_UNARY = "/epp.test.Echo/Unary"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ["", "liveness", "readiness", "inference-extension", EXT_PROC_SERVICE]
SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
MiB = 1024 * 1024
# SERVING response as it travels: prefix (uncompressed, length 2) + field 1 varint 1
SERVING_FRAME = b"\x00\x00\x00\x00\x02\x08\x01"


def grpc_frame(payload: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", 1 if compressed else 0, len(payload)) + payload


def split_grpc_frames(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 5 <= len(data):
        flag, n = struct.unpack(">BI", data[i:i + 5])
        assert flag == 0, f"unexpected compressed flag {flag} in a response"
        out.append(bytes(data[i + 5:i + 5 + n]))
        i += 5 + n
    assert i == len(data), f"{len(data) - i} trailing bytes after the last complete gRPC message"
    return out


def health_request(service: str = "") -> bytes:
    return health_pb2.HealthCheckRequest(service=service).SerializeToString()


def health_check(channel, service: str = "", timeout: float = 5.0):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=timeout).status


def echo_unary(channel):
    return channel.unary_unary(ECHO_UNARY)


def echo_bidi(channel):
    return channel.stream_stream(ECHO)


def big_options(n: int = 64 * MiB) -> list:
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]


def assert_serving(server, timeout: float = 5.0) -> None:
    """A fresh client (new channel) on each port gets SERVING."""
    for which in ("grpc", "health"):
        ch = server.channel(which)
        try:
            assert health_check(ch, "", timeout) == SERVING, f"health Check on {which} port not SERVING"
        finally:
            ch.close()


def wait_rss_back(server, baseline_mib: float, slack_mib: float = 20.0, timeout: float = 15.0) -> float:
    """Poll until RSS is within baseline + slack; fail with the figures otherwise."""
    deadline = time.monotonic() + timeout
    rss = server.rss_mib()
    while rss > baseline_mib + slack_mib and time.monotonic() < deadline:
        time.sleep(0.25)
        rss = server.rss_mib()
    assert rss <= baseline_mib + slack_mib, \
        f"server RSS {rss:.1f} MiB did not return near its idle level {baseline_mib:.1f} MiB (+{slack_mib} MiB) " \
        f"within {timeout}s"
    return rss


def wait_closed_by_peer(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read (and collect) until the peer closes; returns (closed, bytes received)."""
    sock.setblocking(False)
    got = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            continue
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True, bytes(got)
        except (BlockingIOError, ssl.SSLWantReadError):
            continue
        except ssl.SSLError:
            return True, bytes(got)
        if not chunk:
            return True, bytes(got)
        got += chunk
    return False, bytes(got)


class StreamState:
    def __init__(self):
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.data = bytearray()
        self.ended = False
        self.reset_code: int | None = None

    @property
    def done(self) -> bool:
        return self.ended or self.reset_code is not None

    @property
    def grpc_status(self) -> str | None:
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))

    def __repr__(self):
        return (f"Stream(headers={self.headers}, trailers={self.trailers}, data={len(self.data)}B, "
                f"ended={self.ended}, reset={self.reset_code})")


class RawH2:
    """A minimal HTTP/2 client over a real socket, for cases grpcio cannot express.

    ack_data=False never returns flow-control credit for received DATA (a client that never reads)."""

    def __init__(self, port: int, tls: bool = False, ack_data: bool = True, settings: dict | None = None,
                 timeout: float = 5.0, connect: bool = True):
        self.port = port
        self.tls = tls
        self.ack_data = ack_data
        self.timeout = timeout
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            raw = ctx.wrap_socket(raw, server_hostname="localhost")
            assert raw.selected_alpn_protocol() == "h2", f"ALPN negotiated {raw.selected_alpn_protocol()!r}"
        self.sock = raw
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_inbound_headers=False))
        self.streams: dict[int, StreamState] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.eof = False
        self.protocol_error: Exception | None = None
        self._inbuf = bytearray()
        self.received_data_bytes = 0
        if connect:
            self.conn.initiate_connection()
            if settings:
                self.conn.update_settings(settings)
            self.flush()

    # -- sending ---------------------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def headers(self, path: str, extra: list[tuple[str, str]] | None = None, end_stream: bool = False,
                timeout_header: str | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", "POST"), (":scheme", "https" if self.tls else "http"), (":path", path),
                (":authority", f"127.0.0.1:{self.port}"), ("content-type", "application/grpc"), ("te", "trailers")]
        if timeout_header:
            hdrs.append(("grpc-timeout", timeout_header))
        hdrs += list(extra or [])
        self.conn.send_headers(sid, hdrs, end_stream=end_stream)
        self.streams[sid] = StreamState()
        self.flush()
        return sid

    def data(self, sid: int, payload: bytes, end_stream: bool = False, deadline: float | None = None) -> bool:
        """Send respecting the peer's flow-control windows, pumping inbound frames while blocked.
        Returns False (without raising) if the server ended or reset the stream before all was sent."""
        deadline = deadline or (time.monotonic() + self.timeout)
        view = memoryview(payload)
        while True:
            if self.streams[sid].done:
                return False
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            n = min(window, len(view))
            last = n == len(view)
            if n > 0 or (last and end_stream):
                try:
                    self.conn.send_data(sid, bytes(view[:n]), end_stream=last and end_stream)
                except h2.exceptions.StreamClosedError:
                    return False
                self.flush()
                view = view[n:]
            if last:
                return True
            if window == 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"flow-control window stayed closed on stream {sid}")
                self.pump(0.2)
                if self.eof:
                    raise ConnectionError("server closed the connection")

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)
        self.flush()

    def reset(self, sid: int, code: int = 8) -> None:
        self.conn.reset_stream(sid, error_code=code)
        self.flush()

    def ping(self) -> None:
        self.conn.ping(b"12345678")
        self.flush()

    # -- receiving -------------------------------------------------------------------------------------------
    def pump(self, timeout: float) -> bool:
        """Read once (up to timeout) and process the frames; False if nothing arrived."""
        if self.eof:
            return False
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r and not (self.tls and self.sock.pending()):
            return False
        try:
            chunk = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            self.eof = True
            return False
        except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
            return False
        if not chunk:
            self.eof = True
            return False
        # feed h2 one frame at a time, so events before a frame h2 refuses (e.g. a PING after GOAWAY) survive
        self._inbuf += chunk
        while len(self._inbuf) >= 9:
            n = 9 + int.from_bytes(self._inbuf[:3], "big")
            if len(self._inbuf) < n:
                break
            frame, self._inbuf = bytes(self._inbuf[:n]), self._inbuf[n:]
            try:
                events = self.conn.receive_data(frame)
            except h2.exceptions.ProtocolError as e:
                self.protocol_error = e
                self.eof = True
                return True
            for ev in events:
                self._event(ev)
        try:
            self.flush()
        except OSError:
            self.eof = True
        return True

    def _event(self, ev) -> None:
        sid = getattr(ev, "stream_id", None)
        st = self.streams.get(sid) if sid else None
        if isinstance(ev, h2.events.ResponseReceived) and st:
            st.headers.update(dict(ev.headers))
        elif isinstance(ev, h2.events.TrailersReceived) and st:
            st.trailers.update(dict(ev.headers))
        elif isinstance(ev, h2.events.DataReceived):
            self.received_data_bytes += len(ev.data)
            if st:
                st.data += ev.data
            if self.ack_data and ev.flow_controlled_length:
                try:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass
        elif isinstance(ev, h2.events.StreamEnded) and st:
            st.ended = True
        elif isinstance(ev, h2.events.StreamReset) and st:
            st.reset_code = int(ev.error_code)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    def wait(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return cond()
            self.pump(min(left, 0.2))
        return True

    def wait_done(self, sid: int, timeout: float = 5.0) -> StreamState:
        self.wait(lambda: self.streams[sid].done, timeout)
        return self.streams[sid]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def unary(self, path: str, payload: bytes, timeout: float = 5.0, extra=None) -> StreamState:
        sid = self.headers(path, extra)
        self.data(sid, grpc_frame(payload), end_stream=True)
        return self.wait_done(sid, timeout)
