"""Graceful shutdown: SIGTERM/SIGINT send GOAWAY, in-flight streams finish within --drain-timeout, exit 0."""
from __future__ import annotations

import queue
import signal
import time

import grpc
import h2.exceptions
import pytest

from epp_testlib import HEALTH_CHECK, RawH2, SERVING, echo_bidi, health_check, health_request


class BidiCall:
    """A grpcio bidi echo call driven message by message from the test."""

    def __init__(self, channel, timeout: float = 60):
        self.q: queue.Queue = queue.Queue()
        self.call = echo_bidi(channel)(self._requests(), timeout=timeout)

    def _requests(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            yield item

    def roundtrip(self, msg: bytes) -> bytes:
        self.q.put(msg)
        return next(self.call)

    def finish(self):
        self.q.put(None)
        rest = list(self.call)
        return rest, self.call.code()


def _new_stream_refused(server) -> None:
    """A fresh channel must not get a successful call."""
    with server.channel() as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_check(ch, "", timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value


def test_in_flight_stream_completes_after_sigterm(epp_factory):
    s = epp_factory(["--enable-test-echo-service", "--drain-timeout", "5"], name="drain", drain_timeout=None)
    ch = s.channel()
    bidi = BidiCall(ch)
    assert bidi.roundtrip(b"before") == b"before"
    idle = RawH2(s.grpc_port)  # an idle connection established before the signal
    assert idle.unary(HEALTH_CHECK, health_request("")).grpc_status == "0"

    s.signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        # the idle connection is told to go away
        idle.wait(lambda: idle.goaway is not None or idle.eof, 3)
        assert idle.goaway is not None, "no GOAWAY on an idle connection after SIGTERM"
        print(f"GOAWAY last_stream_id={idle.goaway.last_stream_id} code={idle.goaway.error_code}")
    finally:
        idle.close()

    # the in-flight stream keeps working during the drain
    time.sleep(0.5)
    assert bidi.roundtrip(b"during-1") == b"during-1"

    # new streams on the same channel and new connections are refused
    with pytest.raises(grpc.RpcError) as err:
        health_check(ch, "", timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    _new_stream_refused(s)
    assert s.alive(), "epp exited while a stream was still in flight"

    assert bidi.roundtrip(b"during-2") == b"during-2"
    rest, code = bidi.finish()
    t_done = time.monotonic()
    assert rest == [] and code == grpc.StatusCode.OK, f"in-flight stream ended with {code}"
    assert t_done - t0 < 5, "test took too long to be meaningful"
    ch.close()

    rc = s.wait_exit(8)
    t_exit = time.monotonic()
    assert rc is not None, "epp still running 8 s after the last stream finished\n" + s.log_tail()
    assert rc == 0, f"exit code {rc}\n{s.log_tail()}"
    assert t_exit - t_done < 2.5, \
        f"epp exited {t_exit - t_done:.1f}s after the last stream finished: it should exit once drained"


def test_drain_timeout_bounds_shutdown(epp_factory):
    s = epp_factory(["--enable-test-echo-service", "--drain-timeout=2"], name="drain-timeout", drain_timeout=None)
    ch = s.channel()
    bidi = BidiCall(ch, timeout=30)
    assert bidi.roundtrip(b"x") == b"x"
    s.signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc = s.wait_exit(10)
    elapsed = time.monotonic() - t0
    try:
        assert rc is not None, "epp did not exit within drain-timeout + 8 s with a stream left open\n" + s.log_tail()
        assert rc == 0, f"exit code {rc}\n{s.log_tail()}"
        assert elapsed >= 1.5, f"epp exited after {elapsed:.2f}s, before --drain-timeout=2 elapsed"
        assert elapsed <= 6, f"epp took {elapsed:.1f}s to exit with --drain-timeout=2"
        # the abandoned stream ends (with an error) instead of hanging
        with pytest.raises(grpc.RpcError):
            bidi.roundtrip(b"late")
    finally:
        bidi.q.put(None)
        ch.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_shutdown_is_prompt(epp_factory, sig):
    """With nothing in flight, the default 30 s drain does not delay the exit."""
    s = epp_factory([], name=f"idle-{sig.name}", drain_timeout=None)
    with s.channel() as ch:
        assert health_check(ch) == SERVING
    s.signal(sig)
    t0 = time.monotonic()
    rc = s.wait_exit(10)
    assert rc == 0, f"exit {rc} after {time.monotonic() - t0:.1f}s\n{s.log_tail()}"
    assert time.monotonic() - t0 < 3, "idle shutdown took more than 3 s"


def test_listeners_closed_after_sigterm(epp_factory):
    """During the drain, new TCP connections are refused or immediately told to go away."""
    s = epp_factory(["--enable-test-echo-service", "--drain-timeout", "5"], name="drain-listen", drain_timeout=None)
    ch = s.channel()
    bidi = BidiCall(ch)
    assert bidi.roundtrip(b"hold") == b"hold"
    s.signal(signal.SIGTERM)
    time.sleep(0.5)
    try:
        for port in (s.grpc_port, s.health_port):
            try:
                c = RawH2(port)
            except ConnectionRefusedError:
                continue
            try:
                try:
                    sid = c.headers(HEALTH_CHECK)
                    c.data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
                    st = c.wait_done(sid, 3)
                    status = st.grpc_status
                except (OSError, ConnectionError, TimeoutError, h2.exceptions.ProtocolError):
                    status = None
                assert status != "0", f"port {port}: a new connection got a successful call during the drain"
            finally:
                c.close()
        assert bidi.roundtrip(b"still") == b"still"
    finally:
        bidi.finish()
        ch.close()
    assert s.wait_exit(8) == 0
