"""End to end: the real `epp` binary in Kubernetes mode (`--kubeconfig`, `--pool-name`) against the test API
server (fake_apiserver.py, which mimics kube-apiserver semantics), driven with ext_proc Process streams.

Each scenario changes cluster state through the API server and then checks what the next requests do:
rewrites applied / re-weighted / deleted, pods becoming unready, changing IP, the pool's selector changing,
watches dropped mid-stream followed by a 410 on resume (cache still exact), status conditions written once
per generation, bad objects skipped, and an API server that is unreachable when epp starts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_apiserver import FakeAPIServer  # noqa: E402

V1 = "inference.networking.k8s.io"
ALPHA = "inference.networking.x-k8s.io"
NS = "default"
PORT = 18000  # target port of the pool (nothing listens: the endpoints are only routed to, never called)


# --- cluster helpers ---------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, srv: FakeAPIServer):
        self.srv = srv
        self.st = srv.state

    def apply(self, group, version, plural, obj):
        with self.st.lock:
            name = obj["metadata"]["name"]
            if (NS, name) in self.st.collection(group, plural).objects:
                code, out = self.st.replace(group, plural, NS, name, obj, check_rv=False, subresource="raw")
            else:
                code, out = self.st.create(group, version, plural, NS, obj)
        assert code in (200, 201), out
        return out

    def patch(self, group, plural, name, patch, subresource=None):
        with self.st.lock:
            code, out = self.st.patch(group, plural, NS, name, patch, subresource=subresource)
        assert code == 200, out
        return out

    def delete(self, group, plural, name):
        with self.st.lock:
            code, out = self.st.delete(group, plural, NS, name)
        assert code == 200, out

    def get(self, group, plural, name):
        with self.st.lock:
            return self.st.collection(group, plural).objects.get((NS, name))

    def pod(self, name, ip, ready=True, labels=None):
        return self.apply("", "v1", "pods", {
            "metadata": {"name": name, "labels": labels or {"app": "vllm"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})

    def pool(self, selector=None, ports=(PORT,)):
        return self.apply(V1, "v1", "inferencepools", {
            "metadata": {"name": "pool"},
            "spec": {"selector": {"matchLabels": selector or {"app": "vllm"}},
                     "targetPorts": [{"number": p} for p in ports],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}})

    def rewrite(self, name, model, targets):
        return self.apply(ALPHA, "v1alpha2", "inferencemodelrewrites", {
            "metadata": {"name": name},
            "spec": {"poolRef": {"name": "pool"},
                     "rules": [{"matches": [{"model": {"type": "Exact", "value": model}}],
                                "targets": [{"modelRewrite": m, "weight": w} for m, w in targets]}]}})

    def status_patches(self, name):
        with self.st.lock:
            return self.st.status_patches.get(f"inferencemodelrewrites/{name}", 0)


def write_kubeconfig(path: Path, port: int) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
current-context: test
clusters:
- name: fake
  cluster: {{server: "http://127.0.0.1:{port}"}}
contexts:
- name: test
  context: {{cluster: fake, user: epp, namespace: {NS}}}
users:
- name: epp
  user: {{token: test-token}}
""")
    return path


# --- ext_proc client ---------------------------------------------------------------------------------------

def route(channel, model: str, timeout: float = 5.0) -> tuple[str | None, str | None, int | None]:
    """One Process stream for a POST /v1/completions with {"model": model}. Returns (destination, model sent
    upstream, immediate-response status)."""
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 1}).encode()
    headers = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
        [(":method", "POST"), (":path", "/v1/completions"), (":authority", "gw"), (":scheme", "http"),
         ("content-type", "application/json"), ("content-length", str(len(body)))]])
    first = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=headers, end_of_stream=False))
    # Body modes as the gateway configures them (sent on the first message only).
    full_duplex = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    first.protocol_config.request_body_mode = full_duplex
    first.protocol_config.response_body_mode = full_duplex
    msgs = [first, ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))]
    stub = ep_grpc.ExternalProcessorStub(channel)
    destination = upstream_model = status = None
    sent_body = b""
    call = stub.Process(iter(msgs), timeout=timeout)
    try:
        for resp in call:
            kind = resp.WhichOneof("response")
            if kind == "immediate_response":
                status = resp.immediate_response.status.code
                break
            if kind in ("request_headers", "request_body"):
                for h in getattr(resp, kind).response.header_mutation.set_headers:
                    if h.header.key == "x-gateway-destination-endpoint":
                        destination = (h.header.raw_value or h.header.value.encode()).decode()
            if kind == "request_body":
                mut = resp.request_body.response.body_mutation
                if mut.HasField("streamed_response"):
                    sent_body += mut.streamed_response.body
                    if mut.streamed_response.end_of_stream:
                        break
                elif mut.body:
                    sent_body = mut.body
                    break
                else:
                    sent_body = body
                    break
    finally:
        call.cancel()
    if sent_body:
        upstream_model = json.loads(sent_body).get("model")
    return destination, upstream_model, status


def readiness(health_channel, service="readiness") -> int:
    try:
        return health_pb2_grpc.HealthStub(health_channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return -1


def wait_until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})", pytrace=False)


def destinations(channel, model="facebook/opt-125m", n=24) -> set[str]:
    return {route(channel, model)[0] for _ in range(n)}


# --- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture
def cluster():
    srv = FakeAPIServer(token="test-token", installed_groups=[V1, ALPHA]).start()
    yield Cluster(srv)
    srv.stop()


@pytest.fixture
def epp_k8s(cluster, epp_factory, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.srv.port)

    def start(extra=(), **kw):
        return epp_factory(["--kubeconfig", str(kubeconfig), "--pool-name", "pool", "--pool-namespace", NS, "--log-level", "debug"]
                           + list(extra), **kw)
    return start


# --- scenarios ---------------------------------------------------------------------------------------------

def test_rewrites_pods_and_pool_changes(cluster, epp_k8s):
    c = cluster
    c.pool()
    c.pod("a", "127.0.0.11")
    c.pod("b", "127.0.0.12")
    c.rewrite("opt-stable", "opt-stable", [("facebook/opt-125m", 100)])
    epp = epp_k8s()
    ch, health = epp.channel(), epp.channel("health")
    wait_until(lambda: readiness(health) == health_pb2.HealthCheckResponse.SERVING, what="readiness after sync")

    dest, model, status = route(ch, "opt-stable")
    assert status is None and model == "facebook/opt-125m"
    assert dest in {f"127.0.0.11:{PORT}", f"127.0.0.12:{PORT}"}

    # Re-weight: the next requests obey (measure the delay).
    t0 = time.monotonic()
    c.rewrite("opt-stable", "opt-stable", [("facebook/opt-125m-canary", 100)])
    wait_until(lambda: route(ch, "opt-stable")[1] == "facebook/opt-125m-canary", what="new weights")
    delay = time.monotonic() - t0
    print(f"rewrite change took effect after {delay * 1000:.0f} ms")
    assert delay < 2.0

    # Delete → gone (model passes through unchanged).
    c.delete(ALPHA, "inferencemodelrewrites", "opt-stable")
    wait_until(lambda: route(ch, "opt-stable")[1] == "opt-stable", what="rewrite deleted")

    # A pod becoming not ready gets no more traffic.
    c.patch("", "pods", "b", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, "status")
    wait_until(lambda: destinations(ch, n=8) == {f"127.0.0.11:{PORT}"}, what="b unready")
    assert destinations(ch) == {f"127.0.0.11:{PORT}"}

    # IP change.
    c.patch("", "pods", "a", {"status": {"podIP": "127.0.0.21"}}, "status")
    wait_until(lambda: destinations(ch, n=8) == {f"127.0.0.21:{PORT}"}, what="a's new IP")

    # Selector + port change of the pool.
    c.pod("c", "127.0.0.31", labels={"app": "other"})
    c.pool(selector={"app": "other"}, ports=(PORT + 1,))
    wait_until(lambda: destinations(ch, n=8) == {f"127.0.0.31:{PORT + 1}"}, what="new selector")

    # Pool deleted → no endpoints (503); re-created → served again.
    c.delete(V1, "inferencepools", "pool")
    wait_until(lambda: route(ch, "facebook/opt-125m")[2] == 503, what="503 after pool deletion")
    c.pool()
    wait_until(lambda: destinations(ch, n=8) == {f"127.0.0.21:{PORT}"}, what="pool re-created")


def test_dropped_watch_and_410_keep_cache_exact(cluster, epp_k8s):
    c = cluster
    c.pool()
    for i in range(1, 5):
        c.pod(f"p{i}", f"127.0.0.{40 + i}")
    epp = epp_k8s()
    ch, health = epp.channel(), epp.channel("health")
    wait_until(lambda: readiness(health) == health_pb2.HealthCheckResponse.SERVING, what="ready")
    wait_until(lambda: len(destinations(ch, n=30)) == 4, what="all four pods")

    # Watches fail for a while, changes happen meanwhile, and the history is compacted: the resume gets
    # 410 and the relist must drop the deleted pods and pick up the new one.
    with c.st.lock:
        c.st.faults.append({"match": "/pods$", "code": 503, "count": 2, "method": None, "watch": True})
    with c.st.lock:
        c.st.drop_epoch += 1
        c.st.lock.notify_all()
    # Let the dropped stream end first (its server thread notices within 50 ms), so the changes below are
    # missed; the pod watch cannot come back before ~1.75 s (two 503s with back-off).
    time.sleep(0.3)
    c.delete("", "pods", "p1")
    c.delete("", "pods", "p2")
    c.pod("p5", "127.0.0.45")
    c.patch("", "pods", "p3", {"status": {"podIP": "127.0.0.53"}}, "status")
    with c.st.lock:
        c.st.compact()
    expected = {f"127.0.0.{ip}:{PORT}" for ip in (53, 44, 45)}
    wait_until(lambda: destinations(ch, n=30) == expected, timeout=20, what="exact cache after relist")
    assert destinations(ch, n=40) == expected
    relists = [ln for ln in epp.logs().splitlines() if "410" in ln and "relisting" in ln and "pods.core/v1" in ln]
    assert relists, "the pod watch resumed into a 410 and relisted"
    # Still watching afterwards.
    c.pod("p6", "127.0.0.46")
    wait_until(lambda: f"127.0.0.46:{PORT}" in destinations(ch, n=30), what="watch resumed after relist")


def test_status_written_once_per_generation_and_bad_objects(cluster, epp_k8s):
    c = cluster
    c.pool()
    c.pod("a", "127.0.0.61")
    c.rewrite("seed", "opt-stable", [("facebook/opt-125m", 90), ("facebook/opt-125m-canary", 10)])
    # A rewrite with a wrong type (weight as a string) and one missing fields: logged, skipped.
    c.apply(ALPHA, "v1alpha2", "inferencemodelrewrites", {
        "metadata": {"name": "bad-types"},
        "spec": {"poolRef": {"name": "pool"}, "rules": [{"targets": [{"modelRewrite": "x", "weight": "heavy"}]}]}})
    c.apply(ALPHA, "v1alpha2", "inferencemodelrewrites", {"metadata": {"name": "no-spec"}})
    c.rewrite("other", "other-model", [("facebook/opt-125m", 1)])
    epp = epp_k8s()
    ch, health = epp.channel(), epp.channel("health")
    wait_until(lambda: readiness(health) == health_pb2.HealthCheckResponse.SERVING, what="ready")
    assert route(ch, "other-model")[1] == "facebook/opt-125m", "good rewrites served despite bad ones"
    assert route(ch, "opt-stable")[1] in ("facebook/opt-125m", "facebook/opt-125m-canary")

    def accepted(name):
        obj = c.get(ALPHA, "inferencemodelrewrites", name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Accepted":
                return cond
        return None

    cond = wait_until(lambda: accepted("seed"), what="status written")
    assert cond["status"] == "True" and cond["reason"] == "Accepted" and cond["observedGeneration"] == 1
    time.sleep(1.0)
    assert c.status_patches("seed") == 1, "no write loop"
    # New generation with mixed weighted / unweighted targets → Accepted=False.
    c.apply(ALPHA, "v1alpha2", "inferencemodelrewrites", {
        "metadata": {"name": "seed"},
        "spec": {"poolRef": {"name": "pool"},
                 "rules": [{"matches": [{"model": {"value": "opt-stable"}}],
                            "targets": [{"modelRewrite": "a", "weight": 1}, {"modelRewrite": "b"}]}]}})
    cond = wait_until(lambda: (accepted("seed") or {}).get("observedGeneration") == 2 and accepted("seed"),
                      what="generation 2 status")
    assert cond["status"] == "False" and cond["reason"] == "MixedWeights"
    time.sleep(1.0)
    assert c.status_patches("seed") == 2
    assert c.status_patches("bad-types") == 0 and c.status_patches("no-spec") == 0
    assert "bad-types" in epp.logs() and "no-spec" in epp.logs(), "skipped objects are logged by name"


def test_api_server_unreachable_at_start(cluster, epp_k8s, epp_factory, tmp_path):
    # Point epp at a port where nothing listens yet; then start a server there. The port stays bound
    # (not listening: connections are refused) until then, so that no listener of epp's gets it.
    import socket
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    kubeconfig = write_kubeconfig(tmp_path / "late-kubeconfig", port)
    try:
        epp = epp_factory(["--kubeconfig", str(kubeconfig), "--pool-name", "pool", "--pool-namespace", NS])
        health = epp.channel("health")
        time.sleep(1.0)
        assert readiness(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        reserved.close()
    late = FakeAPIServer(port=port, token="test-token", installed_groups=[V1, ALPHA])
    lc = Cluster(late)
    lc.pool()  # objects exist before it serves (else the first list may legitimately see no pool yet)
    lc.pod("a", "127.0.0.71")
    late.start()
    try:
        wait_until(lambda: readiness(health) == health_pb2.HealthCheckResponse.SERVING, timeout=40,
                   what="synced after the API server came up")
        assert route(epp.channel(), "facebook/opt-125m")[0] == f"127.0.0.71:{PORT}"
    finally:
        late.stop()


def test_tls_kubeconfig_with_ca_and_token(epp_factory, tmp_path):
    """epp talks HTTPS to the API server, verifying it against the kubeconfig's CA data (IP SAN), with a token."""
    import base64
    from fake_apiserver import generate_certs
    certs = tmp_path / "certs"
    generate_certs(str(certs))
    srv = FakeAPIServer(token="tls-token", tls_dir=str(certs), installed_groups=[V1, ALPHA])
    c = Cluster(srv)
    c.pool()
    c.pod("a", "127.0.0.81")
    srv.start()
    try:
        ca = base64.b64encode((certs / "ca.crt").read_bytes()).decode()
        kubeconfig = tmp_path / "tls-kubeconfig"
        kubeconfig.write_text(f"""apiVersion: v1
kind: Config
current-context: tls
clusters:
- name: fake
  cluster: {{server: "https://127.0.0.1:{srv.port}", certificate-authority-data: {ca}}}
contexts:
- name: tls
  context: {{cluster: fake, user: epp}}
users:
- name: epp
  user: {{token: tls-token}}
""")
        epp = epp_factory(["--kubeconfig", str(kubeconfig), "--pool-name", "pool", "--pool-namespace", NS])
        wait_until(lambda: readiness(epp.channel("health")) == health_pb2.HealthCheckResponse.SERVING, what="synced over TLS")
        assert route(epp.channel(), "facebook/opt-125m")[0] == f"127.0.0.81:{PORT}"

        # The same server under a CA it was not issued by: never syncs, and says why.
        other = base64.b64encode((certs / "other-ca.crt").read_bytes()).decode()
        bad = tmp_path / "bad-kubeconfig"
        bad.write_text(kubeconfig.read_text().replace(ca, other))
        epp2 = epp_factory(["--kubeconfig", str(bad), "--pool-name", "pool", "--pool-namespace", NS])
        time.sleep(1.5)
        assert readiness(epp2.channel("health")) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "list/watch failed" in epp2.logs()
    finally:
        srv.stop()


def test_two_replicas_only_the_leader_writes_status(cluster, epp_k8s):
    c = cluster
    c.pool()
    c.pod("a", "127.0.0.91")
    c.rewrite("first", "m1", [("facebook/opt-125m", 1)])
    e1 = epp_k8s(name="epp-1")
    e2 = epp_k8s(name="epp-2")
    for e in (e1, e2):
        wait_until(lambda e=e: readiness(e.channel("health")) == health_pb2.HealthCheckResponse.SERVING, what="ready")
        assert route(e.channel(), "m1")[1] == "facebook/opt-125m", "both replicas serve (active-active)"
    wait_until(lambda: c.status_patches("first") == 1, what="status written")
    c.rewrite("second", "m2", [("facebook/opt-125m", 1)])
    wait_until(lambda: c.status_patches("second") == 1, what="second status written")
    time.sleep(1.0)
    assert c.status_patches("first") == 1 and c.status_patches("second") == 1, "written once, by one replica"
    leaders = [e for e in (e1, e2) if "became leader" in e.logs()]
    assert len(leaders) == 1
    leader = leaders[0]
    follower = e2 if leader is e1 else e1
    # The leader shuts down and releases the lease; the follower takes over well before the 15 s expiry.
    leader.stop()
    t0 = time.monotonic()
    wait_until(lambda: "became leader" in follower.logs(), timeout=8, what="follower takes over")
    print(f"takeover after {time.monotonic() - t0:.2f} s")
    c.rewrite("third", "m3", [("facebook/opt-125m", 1)])
    wait_until(lambda: c.status_patches("third") == 1, what="new leader writes")


def test_lease_renewals_reuse_one_connection(cluster, epp_k8s):
    """The leader renews its lease every 2 s (GET + PUT); those requests ride a kept-alive connection
    instead of a new TCP (in production TLS) connection each."""
    c = cluster
    c.pool()
    c.pod("a", "127.0.0.92")
    e = epp_k8s(name="epp-keepalive")
    wait_until(lambda: readiness(e.channel("health")) == health_pb2.HealthCheckResponse.SERVING, what="ready")
    wait_until(lambda: "became leader" in e.logs(), what="leader")
    with c.st.lock:
        conns0, gets0, puts0 = c.st.connections, c.st.requests.get("get", 0), c.st.requests.get("PUT", 0)
    time.sleep(4.5)
    with c.st.lock:
        conns1, gets1, puts1 = c.st.connections, c.st.requests.get("get", 0), c.st.requests.get("PUT", 0)
    assert gets1 - gets0 >= 2 and puts1 - puts0 >= 2, f"renewals: {gets1 - gets0} GET, {puts1 - puts0} PUT"
    assert conns1 - conns0 <= 1, f"{conns1 - conns0} new connections for {gets1 - gets0 + puts1 - puts0} requests"


def test_active_passive_with_ha_leader_election(cluster, epp_k8s):
    """--ha-enable-leader-election (the reference's active-passive mode, which its Helm chart sets for more than one
    replica): only the lease holder reports ready — readiness, "", inference-extension and the ext_proc service —
    while both stay live; when the leader stops, the other takes the lease and becomes ready."""
    c = cluster
    c.pool()
    c.pod("a", "127.0.0.93")
    SERVING = health_pb2.HealthCheckResponse.SERVING
    ready_names = ["readiness", "", "inference-extension", "envoy.service.ext_proc.v3.ExternalProcessor"]
    e1 = epp_k8s(extra=["--ha-enable-leader-election"], name="ha-1")
    e2 = epp_k8s(extra=["--ha-enable-leader-election"], name="ha-2")

    def ready(e):
        with e.channel("health") as ch:
            return [readiness(ch, s) == SERVING for s in ready_names]
    wait_until(lambda: sum(all(ready(e)) for e in (e1, e2)) == 1, timeout=15, what="exactly one ready replica")
    leader, follower = (e1, e2) if all(ready(e1)) else (e2, e1)
    assert not any(ready(follower)), ready(follower)
    for e in (e1, e2):
        with e.channel("health") as ch:
            assert readiness(ch, "liveness") == SERVING
    # The passive replica still answers if a gateway reaches it (it is synced), it just is not advertised.
    with follower.channel() as ch:
        assert route(ch, "facebook/opt-125m")[0] == f"127.0.0.93:{PORT}"
    leader.stop()
    wait_until(lambda: all(ready(follower)), timeout=10, what="the follower takes over")


def test_metrics_endpoint_auth(cluster, epp_k8s):
    """As the reference's --metrics-endpoint-auth (on by default in Kubernetes mode): a scrape needs a bearer token
    that the API server authenticates (TokenReview) and authorizes for `get /metrics` (SubjectAccessReview);
    decisions are cached briefly; a review the API server fails is a 500, never an open door; =false serves anyone."""
    import urllib.error
    import urllib.request
    c = cluster
    c.pool()
    c.pod("a", "127.0.0.94")
    prometheus = "system:serviceaccount:monitoring:prometheus"
    with c.st.lock:
        c.st.review_tokens = {"prom-token": {"username": prometheus}, "prom-token-2": {"username": prometheus},
                              "alice-token": {"username": "alice"}}
        c.st.nonresource_allow = {prometheus: ["/metrics"]}
    e = epp_k8s(name="metrics-auth")

    def scrape(epp, token=None):
        req = urllib.request.Request(f"http://127.0.0.1:{epp.metrics_port}/metrics")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    assert scrape(e)[0] == 401
    assert scrape(e, "bogus")[0] == 401
    status, body = scrape(e, "alice-token")
    assert status == 403 and "alice" in body, (status, body)
    status, body = scrape(e, "prom-token")
    assert status == 200 and "# TYPE" in body, (status, body[:200])
    with c.st.lock:
        reviews = (c.st.requests.get("tokenreview", 0), c.st.requests.get("subjectaccessreview", 0))
    for _ in range(5):
        assert scrape(e, "prom-token")[0] == 200
    with c.st.lock:
        assert (c.st.requests.get("tokenreview", 0), c.st.requests.get("subjectaccessreview", 0)) == reviews, "cached"
    # The API server fails the review once: that scrape gets 500 (not the metrics), the next one gets them.
    c.srv.state.faults.append({"match": "/tokenreviews$", "code": 500, "count": 1, "method": None, "watch": None})
    assert scrape(e, "prom-token-2")[0] == 500
    assert scrape(e, "prom-token-2")[0] == 200
    # Pipelined requests on one connection are answered in order, each after its own check.
    import socket
    with socket.create_connection(("127.0.0.1", e.metrics_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n\r\n"
                     b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer prom-token\r\n\r\n"
                     b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    import re
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [403, 200, 404], (statuses, data[:2000])
    assert e.alive()

    open_epp = epp_k8s(extra=["--metrics-endpoint-auth=false"], name="metrics-open")
    assert scrape(open_epp)[0] == 200


def test_rbac_refusals_are_logged_once_and_routing_goes_on(cluster, epp_k8s):
    """With RBAC that refuses leases and rewrite status (the reference's chart grants neither), routing still
    works; each refusal is logged once however often it is retried; once allowed, leadership and status follow."""
    c = cluster
    c.pool()
    c.pod("a", "127.0.0.95")
    c.rewrite("r1", "m1", [("facebook/opt-125m", 1)])
    lease_fault = {"match": "/leases", "code": 403, "count": -1, "method": None, "watch": None}
    status_fault = {"match": "/inferencemodelrewrites/[^/]+/status$", "code": 403, "count": -1, "method": "PATCH", "watch": None}
    with c.st.lock:
        c.st.faults += [lease_fault, status_fault]
    e = epp_k8s(name="rbac-refused")
    wait_until(lambda: readiness(e.channel("health")) == health_pb2.HealthCheckResponse.SERVING, what="ready")
    assert route(e.channel(), "m1")[1] == "facebook/opt-125m"
    time.sleep(5)  # two or three lease retry periods
    assert e.logs().count("lease access refused") == 1, e.log_tail()
    # Leases allowed: this replica leads; its status writes are refused, retried with backoff, logged once.
    with c.st.lock:
        c.st.faults.remove(lease_fault)
    wait_until(lambda: "became leader" in e.logs(), what="leader")
    assert "lease requests work again" in e.logs()
    time.sleep(5)
    assert e.logs().count("cannot write rewrite status (check RBAC") == 1, e.log_tail()
    assert c.status_patches("r1") == 0
    # Status allowed: the next change writes both rewrites' status at once.
    with c.st.lock:
        c.st.faults.remove(status_fault)
    c.rewrite("r2", "m2", [("facebook/opt-125m", 1)])
    wait_until(lambda: c.status_patches("r1") == 1 and c.status_patches("r2") == 1, what="status written")
