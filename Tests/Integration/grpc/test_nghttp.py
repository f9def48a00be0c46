"""nghttp2's own client (`nghttp`, Debian nghttp2-client) against epp over h2c and TLS."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from epp_testlib import ECHO_UNARY, HEALTH_CHECK, SERVING_FRAME, MiB, grpc_frame, health_request

NGHTTP = shutil.which("nghttp") or "/usr/bin/nghttp"


@pytest.fixture(scope="module", params=["h2c", "tls"])
def server(request, epp_module_factory):
    return epp_module_factory(["--enable-test-echo-service"], name=f"nghttp-{request.param}",
                              secure=request.param == "tls")


def nghttp(server, which, path, body: bytes, tmp_path, verbose: bool) -> subprocess.CompletedProcess:
    f = tmp_path / "body.bin"
    f.write_bytes(body)
    scheme = "https" if server.secure else "http"
    args = [NGHTTP, "-t", "15", "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(f)]
    if verbose:
        args.append("-v")
    args.append(f"{scheme}://127.0.0.1:{server.port(which)}{path}")
    return subprocess.run(args, capture_output=True, timeout=30)


@pytest.mark.parametrize("which", ["grpc", "health"])
@pytest.mark.parametrize("service,status", [("", "0"), ("readiness", "0"), ("no.such.Service", "5")])
def test_nghttp_health_check(server, which, service, status, tmp_path):
    r = nghttp(server, which, HEALTH_CHECK, grpc_frame(health_request(service)), tmp_path, verbose=True)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, f"nghttp exit {r.returncode}\n{out[-3000:]}\n{r.stderr.decode()[-2000:]}"
    if server.secure:
        assert "The negotiated protocol: h2" in out, out[-3000:]
    assert re.search(r"^.*:status: 200$", out, re.M), out[-3000:]
    assert re.search(rf"grpc-status: {status}\b", out), f"no 'grpc-status: {status}' in nghttp -v output\n" \
                                                        f"{out[-3000:]}"


@pytest.mark.parametrize("which", ["grpc", "health"])
def test_nghttp_health_check_body(server, which, tmp_path):
    r = nghttp(server, which, HEALTH_CHECK, grpc_frame(health_request("")), tmp_path, verbose=False)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout == SERVING_FRAME, f"response body {r.stdout!r}, expected a SERVING HealthCheckResponse frame"


def test_nghttp_echo_1mib(server, tmp_path):
    payload = bytes(range(256)) * (MiB // 256)
    r = nghttp(server, "grpc", ECHO_UNARY, grpc_frame(payload), tmp_path, verbose=False)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout == grpc_frame(payload), f"echo body of {len(r.stdout)} bytes differs"
