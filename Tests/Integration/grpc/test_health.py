"""grpc.health.v1 Check/Watch with grpcio on both ports, over h2c and TLS (self-signed and --cert-path),
plus certificate reload and the command-line/log contract."""
from __future__ import annotations

import os
import shutil
import ssl
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp_testlib import HEALTH_SERVICES, SERVICE_UNKNOWN, SERVING, health_check

MODES = ["h2c", "tls-self-signed", "tls-cert-path"]
PORTS = ["grpc", "health"]


@pytest.fixture(scope="module", params=MODES)
def server(request, epp_module_factory, tmp_path_factory, cert_factory):
    mode = request.param
    if mode == "h2c":
        return epp_module_factory([], name="h2c")
    if mode == "tls-self-signed":
        return epp_module_factory([], name="tls-self", secure=True)
    certs = cert_factory(tmp_path_factory.mktemp("certs"), "epp.test")
    return epp_module_factory([], name="tls-certpath", secure=True, cert_dir=certs)


@pytest.mark.parametrize("which", PORTS)
@pytest.mark.parametrize("service", HEALTH_SERVICES, ids=lambda s: s or "empty")
def test_check_serving(server, which, service):
    with server.channel(which) as ch:
        assert health_check(ch, service) == SERVING


@pytest.mark.parametrize("which", PORTS)
@pytest.mark.parametrize("service", HEALTH_SERVICES, ids=lambda s: s or "empty")
def test_watch_serving(server, which, service):
    with server.channel(which) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
        try:
            first = next(stream)
            assert first.status == SERVING
        finally:
            stream.cancel()


@pytest.mark.parametrize("which", PORTS)
def test_check_unknown_service_not_found(server, which):
    with server.channel(which) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_check(ch, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value


@pytest.mark.parametrize("which", PORTS)
def test_watch_unknown_service_reports_service_unknown(server, which):
    with server.channel(which) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="no.such.Service"),
                                                      timeout=10)
        try:
            first = next(stream)
            assert first.status == SERVICE_UNKNOWN
            # the call stays open (gRPC health spec): no status within a short wait
            time.sleep(0.3)
            assert stream.running() or not stream.done(), "Watch for an unknown service should stay open"
        finally:
            stream.cancel()


@pytest.mark.parametrize("which", PORTS)
def test_many_checks_on_one_channel(server, which):
    with server.channel(which) as ch:
        for i in range(200):
            assert health_check(ch, HEALTH_SERVICES[i % 4]) == SERVING


def test_listening_log_lines(server):
    assert server.listening_lines() >= 2, \
        "expected one log line containing 'listening' per listener (gRPC + health)\n" + server.log_tail()


def test_tls_served_certificate(server, served_cert):
    if not server.secure:
        # h2c: a TLS handshake on the port must not succeed
        with pytest.raises((ssl.SSLError, OSError)):
            served_cert(server.grpc_port, timeout=3)
        return
    # the plain stdlib way (no ALPN) fetches the same certificate as the ALPN h2 handshake
    pem = ssl.get_server_certificate(("127.0.0.1", server.grpc_port), timeout=5)
    assert ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(server.root_pem.decode())
    assert ssl.PEM_cert_to_DER_cert(served_cert(server.health_port)) == \
        ssl.PEM_cert_to_DER_cert(server.root_pem.decode())
    if server.cert_dir is not None:
        on_disk = (server.cert_dir / "tls.crt").read_text()
        assert ssl.PEM_cert_to_DER_cert(on_disk) == ssl.PEM_cert_to_DER_cert(server.root_pem.decode()), \
            "--cert-path: the served certificate is not DIR/tls.crt"


def test_tls_refuses_http11_only_alpn(server):
    if not server.secure:
        return  # h2c: nothing to negotiate
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    import socket
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                proto = s.selected_alpn_protocol()
        except (ssl.SSLError, OSError):
            return  # refused during the handshake (alert no_application_protocol): fine
    assert proto != "http/1.1", "server negotiated http/1.1 on a gRPC port"


def test_tls_rejects_verification_with_wrong_root(server, tmp_path, cert_factory):
    """Sanity check of the trust setup itself: a different root must fail verification."""
    if not server.secure:
        return
    other = cert_factory(tmp_path / "other", "other.test")
    creds = grpc.ssl_channel_credentials(root_certificates=(other / "tls.crt").read_bytes())
    opts = [("grpc.ssl_target_name_override", server.target_name or "epp.test")]
    with grpc.secure_channel(server.target("grpc"), creds, options=opts) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_check(ch, "", timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_flags_equals_form_and_space_form(epp_factory):
    """`--flag=value` everywhere (the Kubernetes manifest style), h2c."""
    s = epp_factory(["--log-level=debug", "--drain-timeout=1", "--max-message-bytes=1048576"], name="eqform")
    with s.channel("health") as ch:
        assert health_check(ch, "readiness") == SERVING


def _replace_cert(dest, src) -> None:
    """Replace tls.key and tls.crt in place, each by an atomic rename (what an editor or a copy step does)."""
    for name in ("tls.key", "tls.crt"):
        tmp = dest / f".{name}.new"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dest / name)


def _served_der(served_cert, port: int) -> bytes | None:
    try:
        return ssl.PEM_cert_to_DER_cert(served_cert(port, timeout=3))
    except (OSError, ssl.SSLError):
        return None


@pytest.mark.parametrize("style", ["rename", "k8s-symlink-swap"])
def test_cert_reload(epp_factory, tmp_path, style, cert_factory, served_cert):
    first = cert_factory(tmp_path / "first", "epp.test")
    second = cert_factory(tmp_path / "second", "epp2.test")
    if style == "rename":
        live = tmp_path / "live"
        live.mkdir()
        _replace_cert(live, first)
    else:
        # the layout a Kubernetes Secret volume uses: DIR/tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>
        live = tmp_path / "secret"
        live.mkdir()
        shutil.copytree(first, live / "..v1")
        os.symlink("..v1", live / "..data")
        for name in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", live / name)
    s = epp_factory([], name=f"reload-{style}", secure=True, cert_dir=live)
    first_der = ssl.PEM_cert_to_DER_cert((first / "tls.crt").read_text())
    second_der = ssl.PEM_cert_to_DER_cert((second / "tls.crt").read_text())
    assert _served_der(served_cert, s.grpc_port) == first_der

    # an established channel made with the first cert keeps working across the reload
    old_ch = s.channel("grpc")
    assert health_check(old_ch) == SERVING

    if style == "rename":
        _replace_cert(live, second)
    else:
        shutil.copytree(second, live / "..v2")
        os.symlink("..v2", live / "..data_tmp")
        os.replace(live / "..data_tmp", live / "..data")
    deadline = time.monotonic() + 30
    seen = None
    while time.monotonic() < deadline:
        seen = _served_der(served_cert, s.grpc_port)
        if seen == second_der:
            break
        time.sleep(0.5)
    assert seen == second_der, "new connections did not get the replaced certificate within 30 s\n" + s.log_tail()
    assert _served_der(served_cert, s.health_port) == second_der, "health port still serves the old certificate"

    creds = grpc.ssl_channel_credentials(root_certificates=(second / "tls.crt").read_bytes())
    with grpc.secure_channel(s.target("grpc"), creds, options=[("grpc.ssl_target_name_override", "epp2.test")]) as ch:
        assert health_check(ch) == SERVING
    assert health_check(old_ch) == SERVING, "the connection made before the reload broke"
    old_ch.close()
    assert s.alive()


# The reference EPP's Helm chart (config/charts/inferencepool) runs its image with these arguments and probes the
# health service "inference-extension"; swapping the image for this picker must just work.
CHART_CONFIG = (Path(__file__).resolve().parents[2] / "Fixtures" / "reference-chart-default-plugins.yaml").read_text()


def test_reference_chart_arguments_start_the_picker(epp_factory, tmp_path):
    """The reference's flags (Go durations, -v, zap and tracing flags, its plugin config file) are accepted; the
    chart's probe service inference-extension answers like readiness; the config's weights are logged."""
    config = tmp_path / "default-plugins.yaml"
    config.write_text(CHART_CONFIG)
    s = epp_factory(["--zap-encoder", "json", "--config-file", str(config), "--tracing=false",
                     "--metrics-endpoint-auth=false", "-v", "4", "--refresh-metrics-interval=50ms",
                     "--metrics-staleness-threshold", "2s", "--enable-pprof", "--enable-cert-reload",
                     "--refresh-prometheus-metrics-interval=5s", "--cache-info-metric", "vllm:cache_config_info",
                     "--drain-timeout=1m30s"], name="chart-args")
    with s.channel("health") as ch:
        assert health_check(ch, "inference-extension") == SERVING
        assert health_check(ch, "readiness") == SERVING
    logs = s.logs()
    assert '"queue-weight":"2.0"' in logs and '"prefix-weight":"3.0"' in logs and '"lora-weight":"0.0"' in logs, \
        s.log_tail()
    assert '"msg":"starting","log-level":"debug"' in logs, "-v 4 is debug"


@pytest.mark.parametrize("flags, message", [
    (["--refresh-metrics-interval", "50 ms"], "'50 ms' is not a duration"),
    (["--metrics-staleness-threshold", "2x"], "is not a duration"),
    (["--config-file", "/nonexistent/plugins.yaml"], "--config-file /nonexistent/plugins.yaml: cannot read it"),
    (["--config-text", "kind: EndpointPickerConfig\nschedulingProfiles: [{name: d, plugins: [{pluginRef: ghost}]}]"],
     "pluginRef ghost names no plugin"),
])
def test_bad_reference_flags_stop_the_picker_with_a_clear_message(flags, message, tmp_path):
    import socket
    import subprocess

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    binary = os.environ.get("EPP_BINARY") or str(Path(__file__).resolve().parents[3] / ".build" / "debug" / "epp")
    out = subprocess.run([binary, "--secure-serving=false", "--endpoints", "127.0.0.1:1",
                          "--grpc-port", str(free_port()), "--grpc-health-port", str(free_port()), "--metrics-port", "0"]
                         + flags, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout, (out.stderr + out.stdout)[-600:]
