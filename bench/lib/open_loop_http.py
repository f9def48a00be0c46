"""An open-loop HTTP/1.1 load generator for latency at a fixed rate.

Why not h2load --rps: h2load releases each client's requests on a coarse timer, so its latency log
spreads evenly over ~0-10 ms whatever the server does (a direct_response Envoy shows p50 ≈ 4 ms).
Here requests leave evenly spaced (i / rate after the start) over keep-alive connections, each on
the first idle connection, and latency is taken from the moment the request was written to the
moment its last response byte arrived. A request that finds every connection busy waits for one
(counted in `queued`); `late_ms` reports how far the sender fell behind its schedule, so a result
can be judged. Bounded: stops after `duration` seconds plus `drain` seconds for outstanding replies.
Handles Content-Length and chunked responses (the EPP path rewrites bodies, so Envoy chunks them).
"""
import selectors
import socket
import time


class _Conn:
    __slots__ = ("sock", "busy", "sent_at", "buf", "ok")

    def __init__(self, sock):
        self.sock, self.busy, self.sent_at, self.buf, self.ok = sock, False, 0.0, bytearray(), 0


def _response_end(buf):
    """Returns (end offset, status) of a complete response at the start of buf, or None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    fields = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip().lower()
    pos = head_end + 4
    if "content-length" in fields:
        end = pos + int(fields["content-length"])
        return (end, status) if len(buf) >= end else None
    if fields.get("transfer-encoding") == "chunked":
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            pos = line_end + 2 + size + 2
            if len(buf) < pos:
                return None
            if size == 0:
                return pos, status
    return pos, status  # no body


class Result:
    def __init__(self):
        self.latencies_us, self.errors, self.queued, self.sent, self.late_ms = [], 0, 0, 0, 0.0
        self.elapsed = 0.0
        self.completed_total = 0  # including warm-up: the denominator for server CPU over the whole run

    @property
    def rps(self):
        return len(self.latencies_us) / self.elapsed if self.elapsed else 0.0

    @property
    def clean(self):
        return self.errors == 0 and len(self.latencies_us) == self.sent > 0

    def p(self, q):
        vals = sorted(self.latencies_us)
        if not vals:
            return float("nan")
        return vals[min(len(vals) - 1, int(round(q * (len(vals) - 1))))] / 1000.0  # ms


def run(host, port, path, body, headers=(), rate=500, duration=8.0, conns=16, warmup=1.0, drain=5.0):
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n" +
               "".join(f"{h}\r\n" for h in headers) + "\r\n").encode() + body
    sel = selectors.DefaultSelector()
    pool = []
    for _ in range(conns):
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        c = _Conn(s)
        sel.register(s, selectors.EVENT_READ, c)
        pool.append(c)
    idle = list(pool)
    res = Result()
    interval = 1.0 / rate
    start = time.perf_counter()
    measure_from = start + warmup
    stop_sending = measure_from + duration
    hard_stop = stop_sending + drain
    i, backlog, outstanding = 0, 0, 0
    try:
        while True:
            now = time.perf_counter()
            while now < stop_sending and start + i * interval <= now:
                backlog += 1
                res.late_ms = max(res.late_ms, (now - (start + i * interval)) * 1000)
                i += 1
            while backlog and idle:
                c = idle.pop()
                c.sock.send(request)  # small: fits the socket buffer
                c.busy, c.sent_at = True, time.perf_counter()
                if c.sent_at >= measure_from:
                    res.sent += 1
                backlog -= 1
                outstanding += 1
            if backlog:
                res.queued += 1
            if now >= stop_sending and outstanding == 0:
                break
            if now >= hard_stop:
                res.errors += outstanding
                break
            wait = max(0.0, start + i * interval - time.perf_counter()) if now < stop_sending else 0.05
            for key, _ in sel.select(wait if not backlog else 0.05):
                c = key.data
                try:
                    chunk = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise ConnectionError("server closed a keep-alive connection")
                c.buf += chunk
                done = _response_end(c.buf)
                if done is None:
                    continue
                end, status = done
                t = time.perf_counter()
                del c.buf[:end]
                res.completed_total += 1
                if c.sent_at >= measure_from:
                    if 200 <= status < 300:
                        res.latencies_us.append(int((t - c.sent_at) * 1e6))
                    else:
                        res.errors += 1
                c.busy = False
                outstanding -= 1
                idle.append(c)
        res.elapsed = duration
        return res
    finally:
        for c in pool:
            c.sock.close()
        sel.close()


def main(argv=None):
    """CLI (so a bench can pin it with taskset): prints one JSON object with the summary."""
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/completions")
    ap.add_argument("--body", required=True, help="file with the request body")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--conns", type=int, default=16)
    a = ap.parse_args(argv)
    with open(a.body, "rb") as f:
        body = f.read()
    r = run("127.0.0.1", a.port, a.path, body, a.header, rate=a.rate, duration=a.duration, conns=a.conns,
            warmup=a.warmup)
    print(json.dumps({"rps": r.rps, "p50": r.p(0.5), "p90": r.p(0.9), "p99": r.p(0.99), "sent": r.sent,
                      "ok": len(r.latencies_us), "errors": r.errors, "queued": r.queued, "late_ms": r.late_ms,
                      "completed_total": r.completed_total, "clean": r.clean}))


if __name__ == "__main__":
    main()
