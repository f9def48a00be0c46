"""HTTP/1.1 and h2c (prior knowledge) clients for the Envoy end-to-end tests. Every wait is bounded."""
import hashlib
import http.client
import json
import socket
import time

import h2.config
import h2.connection
import h2.events


class Response:
    def __init__(self, status, headers, body, reset=None, data_times=None):
        self.status = status
        self.headers = headers            # lower-case name → value (last wins); see .all for lists
        self.body = body
        self.reset = reset                # h2 RST_STREAM error code, if the stream was reset
        self.data_times = data_times or []

    def json(self):
        return json.loads(self.body)

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def __repr__(self):
        return f"Response({self.status}, {self.headers}, {self.body[:300]!r}, reset={self.reset})"


def request(port, method, path, body=None, headers=None, conn=None, timeout=30):
    """One HTTP/1.1 request (keep-alive when conn is given)."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"content-type": "application/json"} if body is not None else {}
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    out = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    if own:
        c.close()
    return out


def completion(model="opt-stable", prompt="hello", **extra):
    d = {"model": model, "prompt": prompt, "max_tokens": 5}
    d.update(extra)
    return json.dumps(d).encode()


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def spliced(body, client_model, target_model):
    """The body the backend should receive: only the (first, top-level) model value replaced."""
    import re
    m = re.search(rb'"model"(\s*:\s*)' + re.escape(json.dumps(client_model).encode()), body)
    assert m, "model not in body"
    return body[:m.start()] + b'"model"' + m.group(1) + json.dumps(target_model).encode() + body[m.end():]


def h2_request(port, method, path, body=b"", headers=None, trailers=None, timeout=30, chunk=16384,
               end_with_data=True):
    """One request over a fresh h2c (prior knowledge) connection with the h2 package.

    trailers: list of (name, value) sent after the body (the body then does not end the stream).
    Returns a Response; `reset` holds the RST_STREAM code when the server reset the stream.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    hdrs = [(":method", method), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"), (":path", path)]
    if body:
        hdrs.append(("content-type", "application/json"))
    hdrs += list((headers or {}).items())
    no_body = not body and not trailers
    conn.send_headers(sid, hdrs, end_stream=no_body)
    sock.sendall(conn.data_to_send())
    status, rheaders, rbody, reset, times = None, {}, bytearray(), None, []
    pending = memoryview(body or b"")
    body_done = no_body
    finished = False
    deadline = time.monotonic() + timeout

    def pump_send():
        nonlocal pending, body_done
        while not body_done:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, chunk)
            if window <= 0:
                return
            if len(pending) == 0:
                if trailers:
                    conn.send_headers(sid, list(trailers), end_stream=True)
                else:
                    conn.end_stream(sid)
                body_done = True
                break
            piece = pending[:window]
            pending = pending[len(piece):]
            last = len(pending) == 0 and not trailers and end_with_data
            conn.send_data(sid, piece.tobytes(), end_stream=last)
            if last:
                body_done = True
        sock.sendall(conn.data_to_send())

    try:
        pump_send()
        while not finished:
            if time.monotonic() > deadline:
                raise TimeoutError("h2 request timed out")
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            data = sock.recv(1 << 20)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    rheaders = {k: v for k, v in ev.headers}
                    status = int(rheaders[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    rbody += ev.data
                    times.append(time.monotonic())
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    finished = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    reset = ev.error_code
                    finished = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    finished = True
            if not body_done and not finished:
                pump_send()
            sock.sendall(conn.data_to_send())
    finally:
        try:
            conn.close_connection()
            sock.sendall(conn.data_to_send())
        except Exception:
            pass
        sock.close()
    return Response(status, {k: v for k, v in rheaders.items() if not k.startswith(":")}, bytes(rbody), reset, times)
