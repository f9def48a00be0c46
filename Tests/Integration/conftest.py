"""Shared fixtures for the integration suites: run the real `epp` binary on loopback.

* The binary is `$EPP_BINARY`, else `<repo>/.build/debug/epp`. A missing binary fails the test (never skips).
* `epp_factory` (per test) and `epp_module_factory` (per module) start `epp` on free 127.0.0.1 ports with the
  flags a test gives, wait until both gRPC ports accept connections, capture its logs to a file, and stop it
  (SIGTERM, then SIGKILL after a bound) at teardown; the log tail is printed so a failing test shows it.
* `EppProcess` exposes ports, TLS trust material (for TLS servers: the certificate the server actually serves,
  fetched over TLS with ALPN h2, plus the name to pass as `grpc.ssl_target_name_override`), RSS from /proc.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DRAIN = 2  # seconds: keep teardown short; shutdown tests pass their own --drain-timeout
STANDALONE_ENDPOINT = "127.0.0.2:8000"  # nothing listens there; the gRPC suites never route a request


def epp_binary() -> Path:
    env = os.environ.get("EPP_BINARY")
    path = Path(env) if env else REPO / ".build" / "debug" / "epp"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"epp binary not found at {path} (build it with `swift build --product epp` or set EPP_BINARY)",
                    pytrace=False)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")" the fields start at index 3 (state); utime is field 14, stime 15 (1-based)
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def make_cert(directory: Path, cn: str, days: int = 2) -> Path:
    """openssl-generated key pair as DIR/tls.crt + DIR/tls.key (SAN: DNS:cn, IP:127.0.0.1)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt"), "-days", str(days),
         "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1"],
        check=True, capture_output=True)
    return directory


def fetch_served_cert_pem(port: int, timeout: float = 5.0) -> str:
    """The leaf certificate the server presents, fetched with ALPN h2 and no verification."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            der = s.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der)


def cert_target_name(pem: str) -> str | None:
    """Name to give grpc.ssl_target_name_override: first DNS SAN, else None if an IP SAN 127.0.0.1 covers the
    target, else the subject CN."""
    out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName"],
                         input=pem.encode(), capture_output=True, check=True).stdout.decode()
    dns = re.findall(r"DNS:([^,\s]+)", out)
    if dns:
        return dns[0]
    if re.search(r"IP Address:127\.0\.0\.1\b", out):
        return None
    m = re.search(r"CN\s*=\s*([^,/\n]+)", out)
    return m.group(1).strip() if m else None


class EppProcess:
    def __init__(self, flags: list[str], workdir: Path, name: str = "epp", secure: bool = False,
                 cert_dir: Path | None = None, drain_timeout: float | None = DEFAULT_DRAIN,
                 wait: bool = True, start_timeout: float = 60.0, popen_prefix: list[str] | None = None):
        self.grpc_port = free_port()
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.secure = secure
        self.cert_dir = cert_dir
        self.name = name
        self.log_path = workdir / f"{name}-{self.grpc_port}.log"
        args = [str(epp_binary()),
                "--grpc-port", str(self.grpc_port),
                f"--grpc-health-port={self.health_port}",
                "--metrics-port", str(self.metrics_port),
                "--bind-address", "127.0.0.1",
                "--secure-serving=" + ("true" if secure else "false")]
        if cert_dir is not None:
            args += ["--cert-path", str(cert_dir)]
        # epp needs a mode: standalone (--endpoints / --config-dir) or Kubernetes (--pool-name). The gRPC suites
        # only need the server, so give it an endpoint nothing listens on unless the test chose a mode.
        if not any(f.split("=", 1)[0] in ("--endpoints", "--config-dir", "--pool-name") for f in flags):
            args += ["--endpoints", STANDALONE_ENDPOINT]
        if drain_timeout is not None and not any(f.startswith("--drain-timeout") for f in flags):
            args += ["--drain-timeout", str(drain_timeout)]
        args += flags
        self.args = (popen_prefix or []) + args
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=str(workdir))
        self.pid = self.proc.pid
        self.root_pem: bytes | None = None
        self.target_name: str | None = None
        self.started_at = time.monotonic()
        if wait:
            self.wait_ready(start_timeout)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"epp exited early with {self.proc.returncode}; args {self.args}\n{self.log_tail()}",
                            pytrace=False)
            if port_accepts(self.grpc_port) and port_accepts(self.health_port) and self._metrics_up():
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"epp did not accept connections on {self.grpc_port}/{self.health_port} within {timeout}s\n"
                        f"{self.log_tail()}", pytrace=False)
        # give the "listening" lines a moment to be flushed (they are checked by a dedicated test)
        end = time.monotonic() + 2.0
        while self.listening_lines() < 2 and time.monotonic() < end:
            time.sleep(0.05)
        if self.secure:
            pem = fetch_served_cert_pem(self.grpc_port)
            self.root_pem = pem.encode()
            self.target_name = cert_target_name(pem)

    def _metrics_up(self) -> bool:
        # The EPP opens the metrics listener before the gRPC ones; checked too so a scrape never races it.
        if any(a == "--metrics-port=0" for a in self.args) or \
                any(a == "--metrics-port" and b == "0" for a, b in zip(self.args, self.args[1:])):
            return True
        return port_accepts(self.metrics_port)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    # -- observation -----------------------------------------------------------------------------------------
    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        lines = self.logs().splitlines()
        return f"--- {self.name} log ({self.log_path}), last {min(n, len(lines))} of {len(lines)} lines ---\n" + \
            "\n".join(lines[-n:])

    def listening_lines(self) -> int:
        return sum(1 for line in self.logs().splitlines() if "listening" in line)

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024.0

    def hwm_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024.0

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def port(self, which: str) -> int:
        return {"grpc": self.grpc_port, "health": self.health_port}[which]

    def target(self, which: str = "grpc") -> str:
        return f"127.0.0.1:{self.port(which)}"

    def channel(self, which: str = "grpc", options: list | None = None, aio: bool = False):
        """A grpcio channel to one of the ports; TLS servers are verified against the served certificate."""
        import grpc
        opts = list(options or [])
        mod = grpc.aio if aio else grpc
        if not self.secure:
            return mod.insecure_channel(self.target(which), options=opts)
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
        if self.target_name:
            opts.append(("grpc.ssl_target_name_override", self.target_name))
        return mod.secure_channel(self.target(which), creds, options=opts)


class EppFactory:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[EppProcess] = []

    def __call__(self, flags: list[str] | None = None, **kw) -> EppProcess:
        p = EppProcess(list(flags or []), self.workdir, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            alive = p.alive()
            rc = p.stop()
            # shown by pytest only when the test failed
            print(f"\n[epp pid {p.pid} args {' '.join(p.args[1:])}] was {'running' if alive else 'already exited'};"
                  f" exit {rc}")
            print(p.log_tail(40))


@pytest.fixture
def epp_factory(tmp_path):
    f = EppFactory(tmp_path)
    yield f
    f.close()


@pytest.fixture(scope="module")
def epp_module_factory(tmp_path_factory):
    f = EppFactory(tmp_path_factory.mktemp("epp"))
    yield f
    f.close()


@pytest.fixture(scope="session")
def cert_factory():
    """make_cert(directory, cn) -> directory with tls.crt/tls.key (a fixture, so suites need not import conftest)."""
    return make_cert


@pytest.fixture(scope="session")
def served_cert():
    """fetch_served_cert_pem(port) -> the PEM certificate a TLS port presents."""
    return fetch_served_cert_pem


@pytest.fixture
def cert_dir(tmp_path) -> Path:
    return make_cert(tmp_path / "certs", "epp.test")


def pytest_report_header(config):
    env = os.environ.get("EPP_BINARY")
    return f"epp binary: {env or REPO / '.build/debug/epp'}; python {sys.version.split()[0]}"
