#!/usr/bin/env python3
"""A test Kubernetes API server for swift-epp's Kubernetes layer.

No real kube-apiserver (or etcd) can be installed in this environment, so this server mimics the
kube-apiserver semantics written down in docs/../shared/notes/kubernetes-api.md, closely enough to
exercise a list+watch client the way a real cluster does:

* one global resourceVersion counter (opaque decimal strings), every write bumps it; each collection
  keeps a bounded event history; `metadata.generation` is bumped on spec changes only (status
  subresource writes keep it);
* list: `{"kind": "...List", "metadata": {"resourceVersion": RV, "continue"?}, "items": [...]}`, items
  carry no kind/apiVersion; `limit` + `continue` paginate over a consistent snapshot;
* watch (`watch=1`/`true`): a chunked HTTP/1.1 stream of newline-separated JSON events
  ADDED / MODIFIED / DELETED / BOOKMARK / ERROR. Starting from a resourceVersion older than the
  compacted history gives `ERROR` with a Status `code: 410` (reason `Expired`), or an HTTP 410 when the
  server is told so. `timeoutSeconds` ends the watch cleanly; with `allowWatchBookmarks=true` a BOOKMARK
  (only `metadata.resourceVersion`) arrives about 2 s before the end (and every `bookmark_interval`).
  Label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = AND) and field selectors
  (`metadata.name`, `metadata.namespace`) filter lists and watches; an object leaving a selector arrives
  as DELETED, one entering it as ADDED, as in kube-apiserver;
* watch-list (`sendInitialEvents=true&resourceVersionMatch=NotOlderThan`): the current objects as ADDED,
  then a BOOKMARK annotated `k8s.io/initial-events-end: "true"`; can be switched off, then answered with
  an ERROR event like a server without the storage feature;
* discovery `GET /apis/GROUP` (and `/apis/GROUP/VERSION`) is 404 until the group is "installed" (a CRD);
  requests to resources of a group not installed are 404;
* create (POST), replace (PUT, 409 on a stale resourceVersion), merge-patch (PATCH
  `application/merge-patch+json`, also on the `/status` subresource), delete;
* optional TLS (a CA and server certificate generated with the `openssl` CLI, see `generate_certs`)
  and bearer-token auth (401 without the token; client certificates signed by the CA also accepted).
* TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`) and SubjectAccessReview
  (`POST /apis/authorization.k8s.io/v1/subjectaccessreviews`, non-resource attributes) as a delegating
  authenticator/authorizer uses them: the tokens and the users' allowed paths are set by the test
  (`admin/config` `review_tokens`, `nonresource_allow`);

A control API under `/admin/` (never authenticated) lets tests create/update/delete objects, drop all
watch connections mid-stream, compact the history (forcing 410s), inject 401/403/404/5xx answers,
switch watch-list support, install CRD groups and read counters (PATCH /status calls per object,
requests per kind). Run: `fake_apiserver.py --port 0 [--tls-dir DIR] [--token T]`; it prints
`READY <port>` on stdout once it listens. It can also be embedded: `FakeAPIServer(...).start()`.
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CORE_GROUPS = {"", "coordination.k8s.io"}
KIND_BY_PLURAL = {
    "pods": "Pod",
    "leases": "Lease",
    "inferencepools": "InferencePool",
    "inferencemodelrewrites": "InferenceModelRewrite",
    "inferenceobjectives": "InferenceObjective",
}
HISTORY_LIMIT = 1000


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def parse_label_selector(text: str):
    reqs = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append(("ne", k.strip(), v.strip()))
        elif "==" in part:
            k, v = part.split("==", 1)
            reqs.append(("eq", k.strip(), v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            reqs.append(("eq", k.strip(), v.strip()))
        elif part.startswith("!"):
            reqs.append(("absent", part[1:].strip(), None))
        else:
            reqs.append(("exists", part, None))
    return reqs


def labels_match(reqs, labels) -> bool:
    labels = labels or {}
    for op, k, v in reqs:
        if op == "eq" and labels.get(k) != v:
            return False
        if op == "ne" and labels.get(k) == v:
            return False
        if op == "exists" and k not in labels:
            return False
        if op == "absent" and k in labels:
            return False
    return True


def parse_field_selector(text: str):
    reqs = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        neg = "!=" in part
        k, v = re.split(r"!=|==|=", part, maxsplit=1)
        reqs.append((k.strip(), v.strip(), neg))
    return reqs


def fields_match(reqs, obj) -> bool:
    meta = obj.get("metadata", {})
    for k, v, neg in reqs:
        if k == "metadata.name":
            actual = meta.get("name")
        elif k == "metadata.namespace":
            actual = meta.get("namespace")
        else:
            return False
        if (actual == v) == neg:
            return False
    return True


class Collection:
    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        # (rv:int, type, new_obj, old_obj_or_None)
        self.history: deque = deque(maxlen=HISTORY_LIMIT)
        self.compacted_rv = 0  # watches from rv < compacted_rv get 410


class TooSlow(Exception):
    pass


class State:
    def __init__(self, token=None, installed_groups=None):
        self.lock = threading.Condition()
        self.rv = 100
        self.collections: dict[tuple[str, str], Collection] = {}
        self.installed_groups = set(CORE_GROUPS) | set(installed_groups or [])
        self.token = token
        self.drop_epoch = 0
        self.faults = []  # dicts: {match, code, count, method}
        self.expired_mode = "event"  # or "http"
        self.watchlist_supported = True
        self.bookmark_interval = 60.0
        self.split_events = False  # send each event in two chunks (tests incremental line parsing)
        self.status_patches: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.watch_starts: list[dict] = []
        self.continue_snapshots: dict[str, tuple[int, list]] = {}
        self.open_watches = 0
        self.connections = 0  # TCP connections accepted (clients should reuse keep-alive ones)
        # TokenReview / SubjectAccessReview: token -> {"username", "groups"}; users allowed to get a path
        self.review_tokens: dict[str, dict] = {}
        self.nonresource_allow: dict[str, list[str]] = {}  # username -> allowed non-resource paths

    def collection(self, group, plural) -> Collection:
        key = (group, plural)
        if key not in self.collections:
            self.collections[key] = Collection()
        return self.collections[key]

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    # --- mutations (lock held by caller) ---
    def _record(self, coll, etype, obj, old):
        rv = int(obj["metadata"]["resourceVersion"])
        coll.history.append((rv, etype, copy.deepcopy(obj), copy.deepcopy(old) if old else None))
        if len(coll.history) == coll.history.maxlen:
            coll.compacted_rv = max(coll.compacted_rv, coll.history[0][0] - 1)
        self.lock.notify_all()

    def create(self, group, version, plural, ns, obj):
        coll = self.collection(group, plural)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if ns is not None:
            meta["namespace"] = ns
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["name"] = name
        if not name:
            return 422, status_obj(422, "Invalid", "metadata.name is required")
        key = (meta.get("namespace", ""), name)
        if key in coll.objects:
            return 409, status_obj(409, "AlreadyExists", f'{plural} "{name}" already exists')
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = meta.get("creationTimestamp") or now_rfc3339()
        meta["generation"] = 1
        meta["resourceVersion"] = str(self.next_rv())
        obj.setdefault("apiVersion", f"{group}/{version}" if group else version)
        obj.setdefault("kind", KIND_BY_PLURAL.get(plural, plural))
        coll.objects[key] = obj
        self._record(coll, "ADDED", obj, None)
        return 201, obj

    def replace(self, group, plural, ns, name, new, check_rv=True, subresource=None):
        coll = self.collection(group, plural)
        key = (ns or "", name)
        old = coll.objects.get(key)
        if old is None:
            return 404, status_obj(404, "NotFound", f'{plural} "{name}" not found')
        given_rv = (new.get("metadata") or {}).get("resourceVersion")
        if check_rv and given_rv and given_rv != old["metadata"]["resourceVersion"]:
            return 409, status_obj(409, "Conflict",
                                   f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
                                   f'please apply your changes to the latest version and try again')
        obj = copy.deepcopy(new)
        if subresource == "status":
            merged = copy.deepcopy(old)
            merged["status"] = obj.get("status")
            obj = merged
        elif subresource is None and plural not in ("pods", "leases"):
            # main resource: status is not changed through it for CRDs with a status subresource
            if "status" in old:
                obj["status"] = old["status"]
            else:
                obj.pop("status", None)
        meta = obj.setdefault("metadata", {})
        for keep in ("uid", "creationTimestamp", "namespace", "name"):
            if keep in old["metadata"]:
                meta[keep] = old["metadata"][keep]
        gen = old["metadata"].get("generation", 1)
        if json.dumps(old.get("spec"), sort_keys=True) != json.dumps(obj.get("spec"), sort_keys=True):
            gen += 1
        meta["generation"] = gen
        obj["apiVersion"] = old.get("apiVersion")
        obj["kind"] = old.get("kind")
        if json.dumps(obj, sort_keys=True) == json.dumps(old, sort_keys=True):
            return 200, old  # no-op write: no new resourceVersion, no event
        meta["resourceVersion"] = str(self.next_rv())
        coll.objects[key] = obj
        self._record(coll, "MODIFIED", obj, old)
        return 200, obj

    def patch(self, group, plural, ns, name, patch, subresource=None):
        coll = self.collection(group, plural)
        old = coll.objects.get((ns or "", name))
        if old is None:
            return 404, status_obj(404, "NotFound", f'{plural} "{name}" not found')
        if subresource == "status":
            new = copy.deepcopy(old)
            new["status"] = merge_patch(old.get("status") or {}, patch.get("status") or {})
        else:
            new = merge_patch(old, patch)
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        if subresource is None and plural not in ("pods", "leases") and "status" in old:
            new["status"] = old["status"]
        return self.replace(group, plural, ns, name, new, check_rv=False,
                            subresource="raw" if subresource == "status" or plural in ("pods", "leases") else None)

    def delete(self, group, plural, ns, name):
        coll = self.collection(group, plural)
        old = coll.objects.pop((ns or "", name), None)
        if old is None:
            return 404, status_obj(404, "NotFound", f'{plural} "{name}" not found')
        obj = copy.deepcopy(old)
        obj["metadata"]["resourceVersion"] = str(self.next_rv())
        self._record(coll, "DELETED", obj, old)
        return 200, obj

    def compact(self):
        # New watches from an older version get 410. Live watches keep streaming (kube-apiserver serves
        # them from its watch cache), so the history stays for them; it is bounded by HISTORY_LIMIT.
        for coll in self.collections.values():
            coll.compacted_rv = self.rv
        self.continue_snapshots.clear()


def status_obj(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


PATH_RE = re.compile(
    r"^/(?:api/(?P<corev>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver/1.0"
    # As Go's net/http (kube-apiserver): TCP_NODELAY, so a kept-alive connection's header and body
    # writes are not held back by Nagle waiting for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # quiet unless asked
        if self.server.verbose:
            sys.stderr.write("fake-apiserver: " + (fmt % args) + "\n")

    @property
    def st(self) -> State:
        return self.server.state

    def setup(self):
        super().setup()
        with self.st.lock:
            self.st.connections += 1

    # --- plumbing ---
    def send_json(self, code, obj, extra_headers=None):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        return json.loads(raw)

    def authorized(self) -> bool:
        tok = self.st.token
        if tok is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {tok}":
            return True
        try:
            cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        except Exception:
            cert = None
        return bool(cert)

    def bump(self, key):
        with self.st.lock:
            self.st.requests[key] = self.st.requests.get(key, 0) + 1

    def injected_fault(self, path):
        with self.st.lock:
            for f in self.st.faults:
                if f["count"] == 0:
                    continue
                if f.get("method") and f["method"] != self.command:
                    continue
                if f.get("watch") is not None:
                    q = parse_qs(urlsplit(self.path).query)
                    is_watch = q.get("watch", ["0"])[0] in ("1", "true")
                    if f["watch"] != is_watch:
                        continue
                if re.search(f["match"], path):
                    if f["count"] > 0:
                        f["count"] -= 1
                    return f["code"]
        return None

    # --- verbs ---
    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method):
        try:
            url = urlsplit(self.path)
            if url.path.startswith("/admin/"):
                return self.admin(method, url.path, self.read_body() if method != "GET" else None)
            if not self.authorized():
                self.bump("401")
                self.read_body()
                return self.send_json(401, status_obj(401, "Unauthorized", "Unauthorized"))
            code = self.injected_fault(url.path)
            if code == -1:  # close the connection unanswered, as a server dropping an idle keep-alive one
                self.read_body()
                self.close_connection = True
                return
            if code:
                self.read_body()
                reason = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 410: "Gone",
                          429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}.get(code, "Unknown")
                msg = "forbidden: injected" if code == 403 else f"injected {code}"
                return self.send_json(code, status_obj(code, reason, msg))
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if method == "POST" and url.path == "/apis/authentication.k8s.io/v1/tokenreviews":
                return self.token_review(self.read_body() or {})
            if method == "POST" and url.path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
                return self.access_review(self.read_body() or {})
            if url.path in ("/api", "/api/v1", "/apis", "/version", "/healthz"):
                return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"]})
            m = re.match(r"^/apis/([^/]+)(?:/([^/]+))?/?$", url.path)
            if m and method == "GET":
                group = m.group(1)
                self.bump("discovery")
                if group not in self.st.installed_groups:
                    return self.send_json(404, status_obj(404, "NotFound", "the server could not find the requested resource"))
                return self.send_json(200, {"kind": "APIGroup", "name": group, "versions": []})
            m = PATH_RE.match(url.path)
            if not m:
                return self.send_json(404, status_obj(404, "NotFound", "the server could not find the requested resource"))
            group = m.group("group") or ""
            version = m.group("version") or "v1"
            if group not in self.st.installed_groups:
                return self.send_json(404, status_obj(404, "NotFound", "the server could not find the requested resource"))
            ns, plural, name, sub = m.group("ns"), m.group("plural"), m.group("name"), m.group("sub")
            if method == "GET" and name is None:
                if q.get("watch") in ("1", "true"):
                    self.bump("watch")
                    return self.watch(group, plural, ns, q)
                self.bump("list")
                return self.list(group, plural, ns, q)
            if method == "GET":
                self.bump("get")
                with self.st.lock:
                    obj = self.st.collection(group, plural).objects.get((ns or "", name))
                if obj is None:
                    return self.send_json(404, status_obj(404, "NotFound", f'{plural} "{name}" not found'))
                return self.send_json(200, obj)
            body = self.read_body()
            with self.st.lock:
                if method == "POST":
                    code, out = self.st.create(group, version, plural, ns, body or {})
                elif method == "PUT":
                    code, out = self.st.replace(group, plural, ns, name, body or {}, subresource=sub)
                elif method == "PATCH":
                    ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                    if ctype != "application/merge-patch+json":
                        code, out = 415, status_obj(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
                    else:
                        if sub == "status":
                            k = f"{plural}/{name}"
                            self.st.status_patches[k] = self.st.status_patches.get(k, 0) + 1
                        code, out = self.st.patch(group, plural, ns, name, body or {}, subresource=sub)
                elif method == "DELETE":
                    code, out = self.st.delete(group, plural, ns, name)
                else:
                    code, out = 405, status_obj(405, "MethodNotAllowed", "method not allowed")
            self.bump(method)
            return self.send_json(code, out)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True
        except Exception as exc:  # pragma: no cover - surfaced to the test
            import traceback
            traceback.print_exc()
            try:
                self.send_json(500, status_obj(500, "InternalError", repr(exc)))
            except Exception:
                pass

    def token_review(self, review):
        """As kube-apiserver: who the token is (status.authenticated, status.user), the spec echoed back."""
        self.bump("tokenreview")
        token = (review.get("spec") or {}).get("token", "")
        with self.st.lock:
            user = self.st.review_tokens.get(token)
        status = {"authenticated": True, "user": {"username": user["username"], "uid": "uid-" + user["username"],
                                                  "groups": user.get("groups", [])}} if user else \
            {"authenticated": False, "error": "invalid bearer token"}
        return self.send_json(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                    "spec": review.get("spec") or {}, "status": status})

    def access_review(self, review):
        """As kube-apiserver: whether the user may use the verb on the non-resource path (status.allowed)."""
        self.bump("subjectaccessreview")
        spec = review.get("spec") or {}
        attrs = spec.get("nonResourceAttributes") or {}
        with self.st.lock:
            allowed = attrs.get("verb") == "get" and attrs.get("path") in self.st.nonresource_allow.get(spec.get("user"), [])
        status = {"allowed": True, "reason": "allowed by the test"} if allowed else {"allowed": False, "reason": "no rule"}
        return self.send_json(201, {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                                    "spec": spec, "status": status})

    def selectors(self, q):
        return parse_label_selector(q.get("labelSelector", "")), parse_field_selector(q.get("fieldSelector", ""))

    def list(self, group, plural, ns, q):
        lsel, fsel = self.selectors(q)
        limit = int(q.get("limit") or 0)
        cont = q.get("continue")
        with self.st.lock:
            if cont:
                snap = self.st.continue_snapshots.pop(cont, None)
                if snap is None:
                    return self.send_json(410, status_obj(
                        410, "Expired", "The provided continue parameter is too old to display a consistent list result."))
                rv, remaining = snap
            else:
                coll = self.st.collection(group, plural)
                rv = self.st.rv
                remaining = [copy.deepcopy(o) for k, o in sorted(coll.objects.items())
                             if (ns is None or k[0] == ns) and labels_match(lsel, o["metadata"].get("labels"))
                             and fields_match(fsel, o)]
            page, rest = (remaining[:limit], remaining[limit:]) if limit > 0 else (remaining, [])
            meta = {"resourceVersion": str(rv)}
            if rest:
                token = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
                self.st.continue_snapshots[token] = (rv, rest)
                meta["continue"] = token
                meta["remainingItemCount"] = len(rest)
        items = []
        for o in page:
            o = dict(o)
            o.pop("kind", None)
            o.pop("apiVersion", None)
            items.append(o)
        kind = KIND_BY_PLURAL.get(plural, plural) + "List"
        api_version = f"{group}/v1" if group else "v1"
        self.send_json(200, {"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items})

    def write_chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_event(self, etype, obj):
        line = json.dumps({"type": etype, "object": obj}).encode() + b"\n"
        if self.st.split_events and len(line) > 4:
            cut = len(line) // 2
            self.write_chunk(line[:cut])
            time.sleep(0.005)
            self.write_chunk(line[cut:])
        else:
            self.write_chunk(line)

    def watch(self, group, plural, ns, q):
        lsel, fsel = self.selectors(q)
        timeout = float(q.get("timeoutSeconds") or 1800)
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
        send_initial = q.get("sendInitialEvents") in ("1", "true")
        rv_param = q.get("resourceVersion") or ""
        st = self.st

        def visible(o):
            meta = o.get("metadata", {})
            return (ns is None or meta.get("namespace", "") == ns) and labels_match(lsel, meta.get("labels")) \
                and fields_match(fsel, o)

        with st.lock:
            coll = st.collection(group, plural)
            st.watch_starts.append({"plural": plural, "resourceVersion": rv_param, "query": q})
            epoch = st.drop_epoch
            if send_initial:
                if not st.watchlist_supported:
                    initial = None
                else:
                    initial = [copy.deepcopy(o) for k, o in sorted(coll.objects.items()) if visible(o)]
                    start_rv = st.rv
            else:
                initial = []
                if rv_param in ("", "0"):
                    start_rv = st.rv
                else:
                    try:
                        start_rv = int(rv_param)
                    except ValueError:
                        return self.send_json(400, status_obj(400, "BadRequest", f"invalid resource version {rv_param!r}"))
                    if start_rv < coll.compacted_rv:
                        if st.expired_mode == "http":
                            return self.send_json(410, status_obj(410, "Gone", f"too old resource version: {start_rv} ({coll.compacted_rv})"))
                        start_rv = None  # answered below with an ERROR event
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with st.lock:
            st.open_watches += 1
        try:
            if initial is None:
                self.send_event("ERROR", status_obj(500, "InternalError", "sendInitialEvents is not supported by the storage"))
                return self.finish_chunked()
            if start_rv is None:
                self.send_event("ERROR", status_obj(410, "Expired", f"too old resource version: {rv_param} ({coll.compacted_rv})"))
                return self.finish_chunked()
            for o in initial:
                self.send_event("ADDED", o)
            if send_initial:
                self.send_event("BOOKMARK", {"kind": KIND_BY_PLURAL.get(plural, plural),
                                             "apiVersion": f"{group}/v1" if group else "v1",
                                             "metadata": {"resourceVersion": str(start_rv),
                                                          "annotations": {"k8s.io/initial-events-end": "true"}}})
            pos = start_rv
            started = time.monotonic()
            deadline = started + timeout
            bookmark_at = deadline - min(2.0, timeout / 2)
            next_periodic = started + st.bookmark_interval
            bookmark_sent = False
            while True:
                pending = []
                with st.lock:
                    if st.drop_epoch != epoch:
                        raise ConnectionAbortedError()
                    if coll.history and coll.history[0][0] > pos + 1 and len(coll.history) == coll.history.maxlen:
                        # this watcher fell further behind than the bounded history: like a too-slow
                        # watcher in kube-apiserver, it is ended with 410 and must relist
                        raise TooSlow()
                    for h in coll.history:
                        if h[0] > pos:
                            pending.append(h)
                    if not pending:
                        st.lock.wait(0.05)
                        for h in coll.history:
                            if h[0] > pos:
                                pending.append(h)
                for rv, etype, obj, old in pending:
                    pos = rv
                    now_vis = visible(obj)
                    old_vis = old is not None and visible(old)
                    if etype == "ADDED" and now_vis:
                        self.send_event("ADDED", obj)
                    elif etype == "MODIFIED":
                        if now_vis and old_vis:
                            self.send_event("MODIFIED", obj)
                        elif now_vis:
                            self.send_event("ADDED", obj)
                        elif old_vis:
                            self.send_event("DELETED", obj)
                    elif etype == "DELETED" and (now_vis or old_vis):
                        self.send_event("DELETED", obj)
                now = time.monotonic()
                if bookmarks and ((not bookmark_sent and now >= bookmark_at) or now >= next_periodic):
                    with st.lock:
                        cur = max(pos, st.rv)
                        # only advance past events this watch has already delivered
                        if not any(h[0] > pos for h in coll.history):
                            pos = cur
                    self.send_event("BOOKMARK", {"kind": KIND_BY_PLURAL.get(plural, plural),
                                                 "apiVersion": f"{group}/v1" if group else "v1",
                                                 "metadata": {"resourceVersion": str(pos)}})
                    bookmark_sent = bookmark_sent or now >= bookmark_at
                    next_periodic = now + st.bookmark_interval
                if now >= deadline:
                    return self.finish_chunked()
        except TooSlow:
            self.send_event("ERROR", status_obj(410, "Expired", "watcher fell behind the event history"))
            self.finish_chunked()
        except ConnectionAbortedError:
            # drop mid-stream: no terminating chunk, just a reset connection
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            with st.lock:
                st.open_watches -= 1

    def finish_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # --- control API ---
    def admin(self, method, path, body):
        st = self.st
        body = body or {}
        op = path[len("/admin/"):]
        with st.lock:
            if op == "apply":  # {group, version, plural, namespace, object}: create or merge-patch
                g, v, p, ns = body.get("group", ""), body.get("version", "v1"), body["plural"], body.get("namespace")
                obj = body["object"]
                name = obj["metadata"]["name"]
                if (ns or "", name) in st.collection(g, p).objects:
                    code, out = st.replace(g, p, ns, name, obj, check_rv=False, subresource="raw")
                else:
                    code, out = st.create(g, v, p, ns, obj)
                return self.send_json(code, out)
            if op == "patch":  # {group, plural, namespace, name, patch, subresource?}
                code, out = st.patch(body.get("group", ""), body["plural"], body.get("namespace"), body["name"],
                                     body["patch"], subresource=body.get("subresource"))
                return self.send_json(code, out)
            if op == "delete":
                code, out = st.delete(body.get("group", ""), body["plural"], body.get("namespace"), body["name"])
                return self.send_json(code, out)
            if op == "get":
                obj = st.collection(body.get("group", ""), body["plural"]).objects.get(
                    (body.get("namespace") or "", body["name"]))
                return self.send_json(200 if obj else 404, obj or {})
            if op == "drop-watches":
                st.drop_epoch += 1
                st.lock.notify_all()
                return self.send_json(200, {"dropped": st.open_watches})
            if op == "compact":
                st.compact()
                return self.send_json(200, {"compactedAt": str(st.rv)})
            if op == "fault":  # {match, code (-1: close unanswered), count (-1 = until cleared), method?, watch?}
                st.faults.append({"match": body.get("match", ".*"), "code": int(body["code"]),
                                  "count": int(body.get("count", -1)), "method": body.get("method"),
                                  "watch": body.get("watch")})
                return self.send_json(200, {})
            if op == "clear-faults":
                st.faults.clear()
                return self.send_json(200, {})
            if op == "config":  # any of expired_mode, watchlist_supported, bookmark_interval, split_events, token,
                # review_tokens, nonresource_allow
                for k in ("expired_mode", "watchlist_supported", "bookmark_interval", "split_events", "token",
                          "review_tokens", "nonresource_allow"):
                    if k in body:
                        setattr(st, k, body[k])
                return self.send_json(200, {})
            if op == "install":
                st.installed_groups.add(body["group"])
                return self.send_json(200, {})
            if op == "uninstall":
                st.installed_groups.discard(body["group"])
                return self.send_json(200, {})
            if op == "stats":
                return self.send_json(200, {"statusPatches": st.status_patches, "requests": st.requests,
                                            "connections": st.connections,
                                            "watchStarts": st.watch_starts[-200:], "openWatches": st.open_watches,
                                            "resourceVersion": str(st.rv)})
            if op == "reset-stats":
                st.status_patches.clear()
                st.requests.clear()
                st.watch_starts.clear()
                return self.send_json(200, {})
        return self.send_json(404, {"error": f"unknown admin op {op}"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class FakeAPIServer:
    """Embeddable server: `srv = FakeAPIServer(token=...).start(); srv.url; srv.stop()`."""

    def __init__(self, host="127.0.0.1", port=0, token=None, tls_dir=None, installed_groups=None, verbose=False):
        self.state = State(token=token, installed_groups=installed_groups)
        self.httpd = Server((host, port), Handler)
        self.httpd.state = self.state
        self.httpd.verbose = verbose
        self.tls_dir = tls_dir
        if tls_dir:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(os.path.join(tls_dir, "server.crt"), os.path.join(tls_dir, "server.key"))
            ctx.load_verify_locations(os.path.join(tls_dir, "ca.crt"))
            ctx.verify_mode = ssl.CERT_OPTIONAL
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = None

    @property
    def url(self):
        return f"{'https' if self.tls_dir else 'http'}://127.0.0.1:{self.port}"

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        with self.state.lock:
            self.state.drop_epoch += 1
            self.state.lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()


def generate_certs(directory: str, hosts=("127.0.0.1", "localhost")) -> None:
    """CA + server cert (SANs: the given IPs/DNS names) + a client cert, with the openssl CLI."""
    os.makedirs(directory, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, cwd=directory, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=fake-kubernetes-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sans = ",".join(("IP:" + h) if re.match(r"^[0-9.]+$|:", h) else ("DNS:" + h) for h in hosts)
    with open(os.path.join(directory, "server.ext"), "w") as f:
        f.write(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    with open(os.path.join(directory, "client.ext"), "w") as f:
        f.write("extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=epp/O=test")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.crt", "-days", "2", "-extfile", "client.ext")
    # A second, unrelated CA: verification against it must fail.
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.crt",
        "-days", "2", "-subj", "/CN=other-ca")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", default=None, help="require this bearer token")
    ap.add_argument("--tls-dir", default=None, help="serve TLS with DIR/server.crt+key (generated with --gen-certs)")
    ap.add_argument("--gen-certs", action="store_true", help="generate CA/server/client certs into --tls-dir first")
    ap.add_argument("--install", action="append", default=[], help="CRD group installed from the start")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.gen_certs and args.tls_dir:
        generate_certs(args.tls_dir)
    srv = FakeAPIServer(args.host, args.port, token=args.token, tls_dir=args.tls_dir,
                        installed_groups=args.install, verbose=args.verbose)
    srv.start()
    print(f"READY {srv.port}", flush=True)
    try:
        # exit when the parent closes our stdin (the test process went away)
        while sys.stdin.read(1024):
            pass
    except KeyboardInterrupt:
        pass
    srv.stop()


if __name__ == "__main__":
    main()
