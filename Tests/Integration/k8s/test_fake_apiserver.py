"""The test API server keeps the kube-apiserver semantics the Kubernetes layer relies on (see its docstring)."""
from __future__ import annotations

import http.client
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_apiserver import FakeAPIServer  # noqa: E402

PODS = "/api/v1/namespaces/default/pods"
GROUP = "inference.networking.x-k8s.io"
REWRITES = f"/apis/{GROUP}/v1alpha2/namespaces/default/inferencemodelrewrites"


@pytest.fixture
def srv():
    s = FakeAPIServer(token="tok").start()
    yield s
    s.stop()


def req(srv, method, path, body=None, token="tok", ctype="application/json"):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data else None)


def watch(srv, path, max_events=100, max_seconds=10.0):
    """Reads a watch stream line by line (chunked); returns (status, events)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=max_seconds)
    conn.request("GET", path, headers={"Authorization": "Bearer tok"})
    resp = conn.getresponse()
    if resp.status != 200:
        return resp.status, json.loads(resp.read())
    assert resp.getheader("Transfer-Encoding") == "chunked"
    events = []
    deadline = time.monotonic() + max_seconds
    while len(events) < max_events and time.monotonic() < deadline:
        line = resp.readline()
        if not line:
            break
        events.append(json.loads(line))
    conn.close()
    return 200, events


def pod(name, labels=None):
    return {"metadata": {"name": name, "labels": labels or {"app": "vllm"}}, "spec": {"containers": []}}


def test_list_versions_pagination_and_auth(srv):
    assert req(srv, "GET", PODS, token=None)[0] == 401
    assert req(srv, "GET", PODS, token="wrong")[0] == 401
    versions = []
    for i in range(5):
        code, obj = req(srv, "POST", PODS, pod(f"p{i}"))
        assert code == 201
        versions.append(obj["metadata"]["resourceVersion"])
    assert all(isinstance(v, str) for v in versions) and len(set(versions)) == 5
    code, page = req(srv, "GET", PODS + "?limit=2")
    assert code == 200 and page["kind"] == "PodList" and len(page["items"]) == 2
    assert all("kind" not in item and "apiVersion" not in item for item in page["items"])
    list_rv = page["metadata"]["resourceVersion"]
    req(srv, "POST", PODS, pod("late"))  # not in the snapshot being paged
    names = [i["metadata"]["name"] for i in page["items"]]
    token = page["metadata"]["continue"]
    while token:
        code, page = req(srv, "GET", PODS + f"?limit=2&continue={token}")
        assert code == 200 and page["metadata"]["resourceVersion"] == list_rv
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"p{i}" for i in range(5)]
    assert req(srv, "GET", PODS + "?limit=2&continue=bogus")[0] == 410


def test_watch_events_selectors_and_resume(srv):
    _, first = req(srv, "POST", PODS, pod("a"))
    rv = first["metadata"]["resourceVersion"]
    req(srv, "POST", PODS, pod("b"))
    req(srv, "POST", PODS, pod("x", {"app": "other"}))
    req(srv, "PATCH", PODS + "/b", {"metadata": {"labels": {"app": "other"}}}, ctype="application/merge-patch+json")
    req(srv, "DELETE", PODS + "/a")
    code, events = watch(srv, PODS + f"?watch=1&resourceVersion={rv}&labelSelector=app%3Dvllm&timeoutSeconds=1")
    assert code == 200
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"), ("DELETED", "b"), ("DELETED", "a")]  # b left the selector
    code, events = watch(srv, PODS + "?watch=1&resourceVersion=0&fieldSelector=metadata.name%3Dx&timeoutSeconds=1")
    assert events == []
    assert req(srv, "PATCH", PODS + "/x", {}, ctype="application/json")[0] == 415


def test_bookmark_before_timeout_and_clean_end(srv):
    t0 = time.monotonic()
    code, events = watch(srv, PODS + "?watch=1&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=3")
    elapsed = time.monotonic() - t0
    assert code == 200 and 2.5 < elapsed < 6
    assert [e["type"] for e in events] == ["BOOKMARK"]
    assert set(events[0]["object"]["metadata"]) == {"resourceVersion"}


def test_gone_after_compaction(srv):
    _, obj = req(srv, "POST", PODS, pod("a"))
    old = obj["metadata"]["resourceVersion"]
    req(srv, "POST", PODS, pod("b"))
    req(srv, "POST", "/admin/compact", {})
    code, events = watch(srv, PODS + f"?watch=1&resourceVersion={old}")
    assert code == 200 and events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410
    req(srv, "POST", "/admin/config", {"expired_mode": "http"})
    code, status = watch(srv, PODS + f"?watch=1&resourceVersion={old}")
    assert code == 410 and status["reason"] == "Gone"


def test_status_subresource_generation_and_discovery(srv):
    assert req(srv, "GET", f"/apis/{GROUP}")[0] == 404
    assert req(srv, "GET", REWRITES)[0] == 404
    req(srv, "POST", "/admin/install", {"group": GROUP})
    assert req(srv, "GET", f"/apis/{GROUP}")[0] == 200
    rw = {"metadata": {"name": "r"}, "spec": {"poolRef": {"name": "p"}, "rules": [{"targets": [{"modelRewrite": "m"}]}]}}
    code, obj = req(srv, "POST", REWRITES, rw)
    assert code == 201 and obj["metadata"]["generation"] == 1
    code, obj = req(srv, "PATCH", REWRITES + "/r/status",
                    {"status": {"conditions": [{"type": "Accepted", "status": "True"}]}}, ctype="application/merge-patch+json")
    assert code == 200 and obj["metadata"]["generation"] == 1 and obj["status"]["conditions"][0]["status"] == "True"
    # Status cannot be changed through the main resource; a spec change bumps the generation.
    changed = dict(obj, spec={"poolRef": {"name": "p"}, "rules": [{"targets": [{"modelRewrite": "n"}]}]}, status={})
    code, obj2 = req(srv, "PUT", REWRITES + "/r", changed)
    assert code == 200 and obj2["metadata"]["generation"] == 2 and obj2["status"]["conditions"]
    stale = dict(obj2, metadata=dict(obj2["metadata"], resourceVersion=obj["metadata"]["resourceVersion"]))
    assert req(srv, "PUT", REWRITES + "/r", stale)[0] == 409
    _, stats = req(srv, "GET", "/admin/stats")
    assert stats["statusPatches"] == {"inferencemodelrewrites/r": 1}


def test_fault_injection_and_drop(srv):
    req(srv, "POST", "/admin/fault", {"match": "/pods$", "code": 403, "count": 1})
    code, status = req(srv, "GET", PODS)
    assert code == 403 and status["reason"] == "Forbidden"
    assert req(srv, "GET", PODS)[0] == 200
    import threading
    result = {}

    def run():
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", PODS + "?watch=1&resourceVersion=0", headers={"Authorization": "Bearer tok"})
        resp = conn.getresponse()
        try:
            resp.read()
            result["outcome"] = "clean end"
        except http.client.IncompleteRead:
            result["outcome"] = "dropped"
        except (ConnectionError, OSError) as exc:
            result["outcome"] = f"dropped ({exc.__class__.__name__})"
    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    req(srv, "POST", "/admin/drop-watches", {})
    t.join(5)
    assert result.get("outcome", "").startswith("dropped")
