"""Load-aware endpoint picking and load shedding, driven over real Process streams (grpcio + xds-protos).

The backends are the fake vLLM from demo/ (demo/fake_vllm.py) on 127.0.0.x loopback addresses: the EPP scrapes
their /metrics, and each test sets what those serve through the fake's POST /fake/load knob (waiting requests,
KV-cache usage, or a broken /metrics: garbage, a request that never gets an answer, 404). Covered:

* picking: the endpoint with the better score (2·queue + 2·KV cache) gets every request once the EPP has
  scraped the loads, and traffic follows when the loads flip;
* shedding: a request naming a sheddable InferenceObjective (priority < 0, header x-gateway-inference-objective
  or x-llm-d-inference-objective) gets an ImmediateResponse 429 with an OpenAI-style error body and details
  `epp_pool_saturated` while the pool is saturated (mean over endpoints of max(waiting/5, kv/0.8), stale or
  missing metrics counting as 1.0, ≥ 1.0); priority ≥ 0, no objective and unknown objectives are never shed;
  routing resumes when the load goes away;
* broken metrics: an endpoint whose /metrics is garbage, hangs or answers 404 loses its traffic to an endpoint
  with fresh metrics, the EPP stays up and keeps serving, and the endpoint wins again once its metrics recover;
* `--scrape-model-server-metrics=false`: no scrapes at all, nothing shed;
* the pool gauges inference_pool_average_queue_size / inference_pool_average_kv_cache_utilization on the
  EPP's --metrics-port (means over endpoints with fresh metrics).

The EPP counts requests it sent to an endpoint since that endpoint's last scrape into its queue, so request
loops that check "every request goes to X" are paced (a few per scrape interval), as real traffic would be
between scrapes; every wait is bounded.
"""
import asyncio
import collections
import json
import re
import time
import urllib.request

import grpc
import pytest

import stack
from extproc_lib import BUFFERED, Stream, destination, joined_request_body, kind, req_body, req_headers, \
    req_trailers, resp_body, resp_headers, streamed_body, top_model

POOL = "vllm-pool"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
LLMD_OBJECTIVE_HEADER = "x-llm-d-inference-objective"
SETTLE = 5.0    # seconds the EPP gets to act on a new load (scrape every 0.05 s, staleness ≤ 2 s)
PACE = 0.02     # seconds between requests in the "every request goes to X" loops


def objective(name, priority, pool=POOL):
    return "\n".join(["apiVersion: inference.networking.x-k8s.io/v1alpha2", "kind: InferenceObjective",
                      f"metadata: {{ name: {name} }}", "spec:", f"  priority: {priority}",
                      f"  poolRef: {{ name: {pool} }}"]) + "\n"


RULES = stack.SEED_RULE + "---\n" + objective("batch", -1) + "---\n" + objective("critical", 5)


# -- backends ---------------------------------------------------------------------------------------------------

def start_backends(tmp_path_factory, hosts, label, metrics_flavor=None):
    st = stack.Stack(tmp_path_factory.mktemp(label) / "logs")
    try:
        procs = [st.fake_vllm(h, stack.free_port(h), name=f"{label}-{h}", metrics_flavor=metrics_flavor) for h in hosts]
    except Exception:
        st.stop()
        raise
    return st, procs


def set_load(backend, **knobs):
    status, body = stack.http_post(f"http://{backend.address}/fake/load", knobs)
    assert status == 200, body
    return json.loads(body)


def backend_stats(backend):
    return json.loads(stack.http_get(f"http://{backend.address}/fake/stats")[1])


def reset_stats(backend):
    stack.http_post(f"http://{backend.address}/fake/reset", {})


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """Two fake vLLM backends (A, B), shared by the tests of this module; their loads are reset around each test."""
    st, procs = start_backends(tmp_path_factory, ["127.0.0.41", "127.0.0.42"], "lb-backends")
    yield procs
    st.stop()


@pytest.fixture(autouse=True)
def default_loads(request):
    if "backends" not in request.fixturenames:
        yield
        return
    bs = request.getfixturevalue("backends")
    for b in bs:
        set_load(b)
    yield
    for b in bs:
        set_load(b)


@pytest.fixture(scope="module")
def lb_epp(epp_factory, backends):
    """An EPP with the default load-aware flags (scraping on, 0.05 s interval, 2 s staleness) over A and B."""
    return epp_factory(endpoints=[b.address for b in backends], rules=RULES, name="epp-load-aware")


@pytest.fixture(scope="module")
def short_stale_epp(epp_factory, backends):
    """Like lb_epp, with --metrics-staleness-threshold 0.5."""
    return epp_factory(extra=["--metrics-staleness-threshold", "0.5"], endpoints=[b.address for b in backends],
                       rules=RULES, name="epp-stale-0.5")


# -- driving Process streams ------------------------------------------------------------------------------------

Outcome = collections.namedtuple("Outcome", "dest immediate code")


def run(epp, coro_fn, timeout=120):
    async def main():
        async with grpc.aio.insecure_channel(epp.address) as ch:
            return await asyncio.wait_for(coro_fn(ch), timeout)
    return asyncio.run(main())


async def exchange(ch, objective_name=None, header=OBJECTIVE_HEADER, model="opt-stable", prompt="load-aware picking"):
    """One request as Envoy drives it (FULL_DUPLEX, whole body in one message). Routed: the response phase is
    played too (the backend echoes the model) and dest is the destination header. Refused: immediate is the
    ImmediateResponse."""
    hdrs = {header: objective_name} if objective_name is not None else {}
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 3}).encode()
    s = Stream(ch)
    try:
        await s.send(req_headers(headers=hdrs), req_body(body, eos=True))
    except asyncio.InvalidStateError:
        pass  # the picker answered (and ended the stream) before the body was written: read the answer below
    first = await s.recv()
    assert first is not None, "stream ended without a reply"
    if kind(first) == "immediate_response":
        rest, code = await s.close()
        assert rest == []
        return Outcome(None, first.immediate_response, code)
    assert kind(first) == "request_headers", first
    hdr, md = destination(first)
    assert hdr and md == hdr, (hdr, md)
    reqs = [first] + await s.collect_request()
    assert kind(reqs[-1]) == "request_body" and streamed_body(reqs[-1])[1]
    sent_model = top_model(joined_request_body(reqs))
    await s.send(resp_headers())
    assert kind(await s.recv()) == "response_headers"
    await s.send(resp_body(json.dumps({"id": "x", "object": "text_completion", "model": sent_model,
                                       "choices": []}).encode(), eos=True))
    while True:
        r = await s.recv()
        assert r is not None
        if kind(r) == "response_body" and streamed_body(r)[1]:
            break
    rest, code = await s.close()
    return Outcome(hdr, None, code)


async def poll(ch, predicate, timeout=SETTLE, streak=1, what="", **kw):
    """Sends requests (paced) until `streak` consecutive outcomes satisfy `predicate`; fails after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    run_len, seen = 0, []
    while True:
        o = await exchange(ch, **kw)
        seen.append(o.dest or (o.immediate and o.immediate.status.code))
        run_len = run_len + 1 if predicate(o) else 0
        if run_len >= streak:
            return o
        if loop.time() > deadline:
            raise AssertionError(f"{what or 'condition'} not reached within {timeout}s; last outcomes {seen[-20:]}")
        await asyncio.sleep(PACE)


async def paced(ch, n, **kw):
    out = []
    for _ in range(n):
        out.append(await exchange(ch, **kw))
        await asyncio.sleep(PACE)
    return out


def to(address):
    return lambda o: o.dest == address


def is_shed(o):
    return o.immediate is not None and o.immediate.status.code == 429


def is_routed(o):
    return o.dest is not None


def assert_shed(o, epp):
    assert o.immediate is not None, f"expected a 429, got routed to {o.dest}\n{epp.tail()}"
    ir = o.immediate
    assert ir.status.code == 429, ir
    assert ir.details == "epp_pool_saturated", ir.details
    err = json.loads(ir.body)["error"]
    assert err["type"] == "too_many_requests", err
    assert err["code"] == 429, err
    assert isinstance(err["message"], str) and err["message"], err
    assert o.code == grpc.StatusCode.OK


def assert_all_to(outcomes, address, epp):
    dests = collections.Counter(o.dest or "shed" for o in outcomes)
    assert dests == {address: len(outcomes)}, f"expected every request on {address}, got {dict(dests)}\n{epp.tail()}"


# -- EPP Prometheus ---------------------------------------------------------------------------------------------

def epp_gauge(epp, metric, **labels):
    with urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line.strip())
        if not m or m.group(1) != metric:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def epp_sum(epp, metric, **labels):
    """Sum over every series of `metric` whose labels include `labels` (0 when there is none)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{epp.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line.strip())
        if line.startswith("#") or not m or m.group(1) != metric:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def wait_gauges(epp, queue, kv, timeout=SETTLE):
    deadline = time.monotonic() + timeout
    while True:
        got = (epp_gauge(epp, "inference_pool_average_queue_size", name=POOL),
               epp_gauge(epp, "inference_pool_average_kv_cache_utilization", name=POOL))
        if got[0] is not None and got[1] is not None and abs(got[0] - queue) <= 1e-6 and abs(got[1] - kv) <= 1e-6:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"gauges (queue, kv) = {got}, want ({queue}, {kv}) within {timeout}s\n{epp.tail()}")
        time.sleep(0.05)


async def settled(epp, queue, kv):
    """Waits until the EPP's pool gauges show these means, i.e. it holds the samples just set. Polling for an
    outcome alone is not enough: between two endpoints' scrapes the EPP sees one new and one old sample, a mix
    that can give the awaited outcome once and then flip (found in CI)."""
    await asyncio.to_thread(wait_gauges, epp, queue, kv)


# -- tests ------------------------------------------------------------------------------------------------------

def follow_flip(epp, a, b, n):
    """A light and B heavy, then the reverse: each phase's `n` requests all go to the light one. Every mix of old
    and new samples on the way favours the new winner too (A 10 is worse than B's old 8, B 0/0.0 beats A's old
    0/0.1), so no state in between sends traffic back. Returns both phases' outcomes."""
    set_load(a, waiting=0, kv=0.1)
    set_load(b, waiting=8, kv=0.9)

    async def go(ch):
        await settled(epp, 4.0, 0.5)
        await poll(ch, to(a.address), streak=3, what=f"routing to A ({a.address})")
        first = await paced(ch, n)
        set_load(a, waiting=10, kv=0.95)
        set_load(b, waiting=0, kv=0.0)
        await settled(epp, 5.0, 0.475)
        await poll(ch, to(b.address), streak=3, what=f"routing to B ({b.address}) after the flip")
        return first, await paced(ch, n)
    first, second = run(epp, go)
    assert_all_to(first, a.address, epp)
    assert_all_to(second, b.address, epp)
    return first, second


def test_traffic_follows_load(lb_epp, backends):
    a, b = backends
    scrapes = [backend_stats(x)["metrics_scrapes"] for x in backends]
    first, second = follow_flip(lb_epp, a, b, 40)
    assert all(o.code == grpc.StatusCode.OK for o in first + second)
    # Scraping is on by default: both backends' /metrics were read meanwhile.
    assert all(backend_stats(x)["metrics_scrapes"] > s for x, s in zip(backends, scrapes))
    assert lb_epp.poll() is None


def test_a_pod_that_refuses_connections_loses_its_load_sample_at_once(epp_factory, tmp_path_factory):
    """A pod that died keeps its last (idle-looking) sample only until a scrape is refused, not for the whole
    staleness threshold (60 s here), so traffic leaves it at once."""
    st, (a, b) = start_backends(tmp_path_factory, ["127.0.0.45", "127.0.0.46"], "lb-refused")
    try:
        epp = epp_factory(extra=["--metrics-staleness-threshold", "60"], endpoints=[a.address, b.address], rules=RULES,
                          name="epp-refused")
        set_load(a, waiting=0, kv=0.0)
        set_load(b, waiting=6, kv=0.7)
        run(epp, lambda ch: poll(ch, to(a.address), streak=5, what="the idle pod preferred"))
        a.stop()
        run(epp, lambda ch: poll(ch, to(b.address), timeout=10, streak=10, what="traffic off the dead pod"))
        assert epp.poll() is None
    finally:
        st.stop()


def test_sheddable_requests_refused_when_saturated(lb_epp, backends):
    a, b = backends
    for x in backends:
        set_load(x, waiting=10)

    async def go(ch):
        await settled(lb_epp, 10.0, 0.0)
        shed = await poll(ch, is_shed, what="a 429 for objective batch", objective_name="batch")
        others = {"critical": await exchange(ch, objective_name="critical"),
                  "none": await exchange(ch),
                  "unknown": await exchange(ch, objective_name="no-such-objective"),
                  "critical-llm-d": await exchange(ch, objective_name="critical", header=LLMD_OBJECTIVE_HEADER)}
        llmd = await exchange(ch, objective_name="batch", header=LLMD_OBJECTIVE_HEADER)
        again = await exchange(ch, objective_name="batch")
        for x in backends:
            set_load(x)
        recovered = await poll(ch, is_routed, streak=3, what="batch routed again after the load went away",
                               objective_name="batch")
        return shed, others, llmd, again, recovered
    exhausted = 'inference_objective_request_error_total'
    # One series per model/target pair: the seed rule's split gives the refused requests two targets.
    before = epp_sum(lb_epp, exhausted, error_code="InferencePoolResourceExhausted")
    shed, others, llmd, again, recovered = run(lb_epp, go)
    assert_shed(shed, lb_epp)
    # The refusals are counted under the reference's error code (shed, llmd, again; poll may add more).
    assert epp_sum(lb_epp, exhausted, error_code="InferencePoolResourceExhausted") - before >= 3
    for name, o in others.items():
        assert o.dest in (a.address, b.address), f"{name}: {o}\n{lb_epp.tail()}"
        assert o.code == grpc.StatusCode.OK
    assert_shed(llmd, lb_epp)
    assert_shed(again, lb_epp)
    assert recovered.dest in (a.address, b.address)


def test_saturation_threshold(lb_epp, backends):
    """Pool saturation = mean over endpoints of max(waiting/5, kv/0.8), ≥ 1.0; stale or missing metrics count 1.0."""
    a, b = backends

    async def go(ch):
        out = {}
        # 0.8 + 0.8 → 0.8: not saturated (first make sure the EPP sheds at all, so "routed" means it saw the load).
        # Each step waits for the EPP to hold both new samples (its gauges) before judging: one new sample
        # beside an old one can be saturated when neither state is (kv 0.8 + waiting 0 → 0.5).
        for x in backends:
            set_load(x, waiting=10)
        await settled(lb_epp, 10.0, 0.0)
        await poll(ch, is_shed, what="a 429 at waiting 10", objective_name="batch")
        for x in backends:
            set_load(x, waiting=4)
        await settled(lb_epp, 4.0, 0.0)
        await poll(ch, is_routed, streak=3, what="batch routed at waiting 4", objective_name="batch")
        out["waiting 4"] = await paced(ch, 10, objective_name="batch")
        # kv 0.8 on both → exactly 1.0: saturated.
        for x in backends:
            set_load(x, waiting=0, kv=0.8)
        await settled(lb_epp, 0.0, 0.8)
        await poll(ch, is_shed, what="a 429 at kv 0.8", objective_name="batch")
        out["kv 0.8"] = await paced(ch, 5, objective_name="batch")
        # One endpoint hot (10 → 2.0), one idle (0): mean exactly 1.0, saturated.
        set_load(a, waiting=10, kv=0.0)
        set_load(b, waiting=0, kv=0.0)
        await settled(lb_epp, 5.0, 0.0)
        await poll(ch, is_shed, what="a 429 with A at waiting 10, B idle", objective_name="batch")
        out["A 10, B 0"] = await paced(ch, 5, objective_name="batch")
        # A's metrics gone (404: stale after 2 s → 1.0), B at 1.2: mean 1.1, saturated; counting A as
        # empty would give 0.6.
        for x in backends:
            set_load(x)
        await settled(lb_epp, 0.0, 0.0)
        await poll(ch, is_routed, streak=3, what="batch routed at idle", objective_name="batch")
        set_load(a, metrics="404")
        set_load(b, waiting=6)
        await settled(lb_epp, 6.0, 0.0)  # B's sample alone: A's is stale
        await poll(ch, is_shed, what="a 429 with A's metrics missing and B at waiting 6", objective_name="batch")
        out["A missing, B 6"] = await paced(ch, 5, objective_name="batch")
        return out
    out = run(lb_epp, go)
    assert all(is_routed(o) for o in out["waiting 4"]), out["waiting 4"]
    for case in ("kv 0.8", "A 10, B 0", "A missing, B 6"):
        for o in out[case]:
            assert_shed(o, lb_epp)


def test_garbage_metrics(lb_epp, backends):
    a, b = backends
    set_load(a, waiting=0, kv=0.1)
    set_load(b, waiting=2, kv=0.2)

    async def go(ch):
        await poll(ch, to(a.address), streak=3, what="routing to A while its metrics are good")
        set_load(a, metrics="garbage")
        await poll(ch, to(b.address), streak=3, what="routing to B while A's /metrics is garbage")
        on_b = await paced(ch, 20)
        # Other streams, concurrently: all served.
        together = await asyncio.gather(*[exchange(ch, objective_name="critical") for _ in range(20)])
        set_load(a, waiting=0, kv=0.1)
        await poll(ch, to(a.address), streak=3, timeout=10, what="A winning again once its metrics recover")
        return on_b, together
    on_b, together = run(lb_epp, go)
    assert_all_to(on_b, b.address, lb_epp)
    assert all(o.dest in (a.address, b.address) and o.code == grpc.StatusCode.OK for o in together), together
    assert lb_epp.poll() is None, lb_epp.tail()
    assert epp_gauge(lb_epp, "inference_pool_average_queue_size", name=POOL) is not None


@pytest.mark.parametrize("mode", ["hang", "404"])
def test_unanswered_or_missing_metrics(short_stale_epp, backends, mode):
    epp = short_stale_epp
    a, b = backends
    set_load(a, waiting=0, kv=0.1)
    set_load(b, waiting=2, kv=0.2)

    async def go(ch):
        await poll(ch, to(a.address), streak=3, what="routing to A while its metrics are good")
        set_load(a, metrics=mode)
        await poll(ch, to(b.address), streak=3, what=f"routing to B while A's /metrics is {mode}")
        on_b = await paced(ch, 20)
        together = await asyncio.gather(*[exchange(ch) for _ in range(20)])
        set_load(a, waiting=0, kv=0.1)
        await poll(ch, to(a.address), streak=3, timeout=10, what=f"A winning again after {mode}")
        return on_b, together
    on_b, together = run(epp, go)
    assert_all_to(on_b, b.address, epp)
    assert all(o.dest in (a.address, b.address) and o.code == grpc.StatusCode.OK for o in together), together
    assert epp.poll() is None, epp.tail()


def test_scraping_off(epp_factory, tmp_path_factory):
    # Backends of its own: the other EPPs of this module scrape A and B.
    st, quiet = start_backends(tmp_path_factory, ["127.0.0.43", "127.0.0.44"], "lb-quiet")
    try:
        for x in quiet:
            set_load(x, waiting=10, kv=0.9)
            reset_stats(x)
        epp = epp_factory(extra=["--scrape-model-server-metrics=false"], endpoints=[x.address for x in quiet],
                          rules=RULES, name="epp-no-scrape")
        time.sleep(1.0)
        assert [backend_stats(x)["metrics_scrapes"] for x in quiet] == [0, 0], epp.tail()

        async def go(ch):
            return [await exchange(ch, objective_name="batch") for _ in range(5)] + \
                [await exchange(ch, objective_name="batch", header=LLMD_OBJECTIVE_HEADER), await exchange(ch)]
        outs = run(epp, go)
        for o in outs:
            assert o.dest in (quiet[0].address, quiet[1].address), f"{o}\n{epp.tail()}"
            assert o.code == grpc.StatusCode.OK
        assert [backend_stats(x)["metrics_scrapes"] for x in quiet] == [0, 0]
        assert epp.poll() is None
    finally:
        st.stop()


def per_pod_queue(epp, backend):
    return epp_gauge(epp, "inference_pool_per_pod_queue_size", name=POOL, model_server_pod=backend.address)


def test_pool_gauges(lb_epp, backends):
    a, b = backends
    set_load(a, waiting=2, kv=0.2)
    set_load(b, waiting=4, kv=0.4)
    wait_gauges(lb_epp, 3.0, 0.3)
    # Per pod (standalone endpoints have no pod name: the address stands for it).
    assert (per_pod_queue(lb_epp, a), per_pod_queue(lb_epp, b)) == (2, 4)
    # Means over endpoints with fresh metrics only: once A's metrics are gone (404, stale after 2 s), B's alone,
    # and A's per-pod series is gone too rather than frozen at its last value.
    set_load(a, waiting=2, kv=0.2, metrics="404")
    wait_gauges(lb_epp, 4.0, 0.4)
    assert (per_pod_queue(lb_epp, a), per_pod_queue(lb_epp, b)) == (None, 4)
    set_load(a, waiting=0, kv=0.0)
    set_load(b, waiting=1, kv=0.5)
    wait_gauges(lb_epp, 0.5, 0.25)


# -- admission queue (--sheddable-queue-timeout) -----------------------------------------------------------------

async def open_batch(ch):
    """A sheddable request whose headers and whole body are sent; returns the stream (its reply not read)."""
    s = Stream(ch)
    body = json.dumps({"model": "opt-stable", "prompt": "queued", "max_tokens": 3}).encode()
    await s.send(req_headers(headers={OBJECTIVE_HEADER: "batch"}), req_body(body, eos=True))
    return s


def test_sheddable_requests_wait_for_room(epp_factory, backends):
    """With --sheddable-queue-timeout, a sheddable request in a saturated pool waits instead of getting 429 at
    once: routed as soon as the pool has room, 429 (epp_queue_timeout) when it stays full, and never more than
    --sheddable-queue-capacity waiting (the rest get 429 at once); a waiter the gateway abandons frees its place."""
    epp = epp_factory(extra=["--sheddable-queue-timeout", "1.5", "--sheddable-queue-capacity", "2"],
                      endpoints=[b.address for b in backends], rules=RULES, name="epp-queue")

    async def go(ch):
        out = {}
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        # Admitted once the load goes away.
        t0 = time.monotonic()
        s = await open_batch(ch)
        out["quiet while saturated"] = await s.no_reply_within(0.5)
        for x in backends:
            set_load(x)
        first = await s.recv_pending(timeout=5)
        out["admitted after"] = time.monotonic() - t0
        out["admitted reply"] = kind(first)
        out["admitted dest"] = destination(first)[0] if kind(first) == "request_headers" else None
        s.call.cancel()
        # Stays saturated: 429 epp_queue_timeout after the timeout.
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        t0 = time.monotonic()
        s = await open_batch(ch)
        out["timeout reply"] = await s.recv(timeout=5)
        out["timed out after"] = time.monotonic() - t0
        # Capacity 2: two wait, a third is refused at once; cancelling one frees its place.
        waiters = [await open_batch(ch) for _ in range(2)]
        for w in waiters:
            assert await w.no_reply_within(0.2)
        out["queued gauge"] = await asyncio.to_thread(epp_sum, epp, "inference_extension_flow_control_queue_size",
                                                      fairness_id="batch", priority="-1", inference_pool=POOL)
        t0 = time.monotonic()
        third = await open_batch(ch)
        out["third reply"] = await third.recv(timeout=5)
        out["third after"] = time.monotonic() - t0
        waiters[0].call.cancel()
        await asyncio.sleep(0.2)
        fourth = await open_batch(ch)
        out["fourth waits"] = await fourth.no_reply_within(0.5)
        for x in backends:
            set_load(x)
        for w in (waiters[1], fourth):
            r = await w.recv_pending(timeout=5)
            out.setdefault("later admitted", []).append(kind(r))
            w.call.cancel()
        # BUFFERED (other gateways): the body reply, which carries the routing, waits the same way.
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        s = Stream(ch)
        await s.send(req_headers(mode=BUFFERED, headers={OBJECTIVE_HEADER: "batch"}))
        out["buffered headers reply"] = kind(await s.recv())
        await s.send(req_body(json.dumps({"model": "opt-stable", "prompt": "queued"}).encode(), eos=True))
        out["buffered quiet"] = await s.no_reply_within(0.5)
        for x in backends:
            set_load(x)
        r = await s.recv_pending(timeout=5)
        out["buffered routed"] = kind(r) == "request_body" and destination(r)[0] in [b.address for b in backends]
        s.call.cancel()
        # Request trailers while waiting (the body ends with them): answered after the routing and the body.
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        s = Stream(ch)
        body = json.dumps({"model": "opt-stable", "prompt": "queued with trailers"}).encode()
        await s.send(req_headers(headers={OBJECTIVE_HEADER: "batch"}), req_body(body[:20]), req_body(body[20:]),
                     req_trailers())
        out["trailers quiet"] = await s.no_reply_within(0.5)
        for x in backends:
            set_load(x)
        replies = [await s.recv_pending(timeout=5)]
        while kind(replies[-1]) != "request_trailers":
            replies.append(await s.recv(timeout=5))
        out["trailers replies"] = [kind(r) for r in replies]
        out["trailers body"] = joined_request_body(replies)
        out["trailers body eos"] = [streamed_body(r)[1] for r in replies if kind(r) == "request_body"]
        s.call.cancel()
        # Critical requests never wait.
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        out["critical"] = await exchange(ch, objective_name="critical")
        return out
    out = run(epp, go)
    # The reference flow control's metrics: how many wait now, and how each wait ended.
    assert out["queued gauge"] == 2, out["queued gauge"]
    assert epp_sum(epp, "inference_extension_flow_control_queue_size") == 0
    waits = {o: epp_sum(epp, "inference_extension_flow_control_request_queue_duration_seconds_count", outcome=o)
             for o in ("Dispatched", "EvictedTTL", "EvictedContextCancelled")}
    assert waits == {"Dispatched": 5, "EvictedTTL": 1, "EvictedContextCancelled": 1}, waits
    assert out["quiet while saturated"], "a sheddable request got an answer while the pool was saturated"
    assert out["admitted reply"] == "request_headers" and out["admitted dest"] in [b.address for b in backends], out
    assert 0.5 <= out["admitted after"] < 5, out
    ir = out["timeout reply"].immediate_response
    assert ir.status.code == 429 and ir.details == "epp_queue_timeout", ir
    assert json.loads(ir.body)["error"]["type"] == "too_many_requests"
    assert 1.4 <= out["timed out after"] < 4, out
    ir = out["third reply"].immediate_response
    assert ir.status.code == 429 and ir.details == "epp_pool_saturated", ir
    assert out["third after"] < 1.0, out
    assert out["fourth waits"], "the place of a cancelled waiter was not given back"
    assert out["later admitted"] == ["request_headers", "request_headers"], out
    assert out["buffered headers reply"] == "request_headers" and out["buffered quiet"] and out["buffered routed"], out
    assert out["trailers quiet"], out
    assert out["trailers replies"][0] == "request_headers" and out["trailers replies"][-1] == "request_trailers", out
    assert set(out["trailers replies"][1:-1]) == {"request_body"}, out
    assert top_model(out["trailers body"]) in ("facebook/opt-125m", "facebook/opt-125m-canary"), out["trailers body"]
    assert not any(out["trailers body eos"]), "the trailers end the body, not a body reply"
    assert out["critical"].dest in [b.address for b in backends], out["critical"]
    assert epp.poll() is None, epp.tail()


def test_waiting_requests_get_room_by_priority_then_fairly_between_objectives(epp_factory, backends):
    """When room opens one request at a time, waiting sheddable requests are admitted in order: higher priority
    first; within a priority, round robin between objectives (a second objective's first request does not wait
    behind the first objective's backlog); then arrival."""
    rules = RULES + "---\n" + objective("other", -1) + "---\n" + objective("bulk", -5)
    epp = epp_factory(extra=["--sheddable-queue-timeout", "30"], endpoints=[b.address for b in backends], rules=rules,
                      name="epp-queue-order")
    a, b = backends
    arrivals = ["bulk-1", "batch-1", "batch-2", "other-1", "batch-3", "other-2"]

    async def go(ch):
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        streams = {}
        for name in arrivals:
            s = Stream(ch)
            body = json.dumps({"model": "opt-stable", "prompt": name}).encode()
            await s.send(req_headers(headers={OBJECTIVE_HEADER: name.split("-")[0]}), req_body(body, eos=True))
            streams[name] = s
            await asyncio.sleep(0.02)
        assert all([await s.no_reply_within(0.3) for s in streams.values()]), "a request got an answer while saturated"
        # Room for one at a time: A full (5/5), B one short (4/5); each admitted request goes to B, stays in flight
        # and fills it until B's next sample counts it.
        set_load(a, waiting=5)
        set_load(b, waiting=4)

        async def admitted(name):
            r = await streams[name].recv_pending(timeout=20)
            return time.monotonic(), name, kind(r), destination(r)[0] if kind(r) == "request_headers" else None
        results = await asyncio.gather(*[admitted(n) for n in arrivals])
        for s in streams.values():
            s.call.cancel()
        return sorted(results)
    results = run(epp, go)
    assert all(k == "request_headers" for _, _, k, _ in results), results
    order = [name for _, name, _, _ in results]
    assert order == ["batch-1", "other-1", "batch-2", "other-2", "batch-3", "bulk-1"], results
    assert epp.poll() is None, epp.tail()


def test_waiting_requests_share_room_fairly_between_fairness_ids(epp_factory, backends):
    """Requests naming a fairness ID (x-gateway-inference-fairness-id, or llm-d's x-llm-d-inference-fairness-id:
    a tenant or a session, as the reference's flow control keys its queues) share the room round robin by that ID
    within one objective, so one tenant's backlog does not hold back another tenant's first request; the queue
    gauge is labelled with it."""
    epp = epp_factory(extra=["--sheddable-queue-timeout", "30"], endpoints=[b.address for b in backends], rules=RULES,
                      name="epp-queue-fairness")
    a, b = backends
    arrivals = [("t1-1", "x-gateway-inference-fairness-id"), ("t1-2", "x-gateway-inference-fairness-id"),
                ("t1-3", "x-gateway-inference-fairness-id"), ("t2-1", "x-llm-d-inference-fairness-id")]

    async def go(ch):
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        streams = {}
        for name, header in arrivals:
            s = Stream(ch)
            body = json.dumps({"model": "opt-stable", "prompt": name}).encode()
            await s.send(req_headers(headers={OBJECTIVE_HEADER: "batch", header: name.split("-")[0]}),
                         req_body(body, eos=True))
            streams[name] = s
            await asyncio.sleep(0.02)
        assert all([await s.no_reply_within(0.3) for s in streams.values()]), "a request got an answer while saturated"
        gauges = [await asyncio.to_thread(epp_sum, epp, "inference_extension_flow_control_queue_size", fairness_id=t)
                  for t in ("t1", "t2", "batch")]
        set_load(a, waiting=5)
        set_load(b, waiting=4)

        async def admitted(name):
            r = await streams[name].recv_pending(timeout=20)
            return time.monotonic(), name, kind(r)
        results = await asyncio.gather(*[admitted(n) for n, _ in arrivals])
        for s in streams.values():
            s.call.cancel()
        return sorted(results), gauges
    results, gauges = run(epp, go)
    assert all(k == "request_headers" for _, _, k in results), results
    assert [name for _, name, _ in results] == ["t1-1", "t2-1", "t1-2", "t1-3"], results
    assert gauges[:2] == [3, 1] and not gauges[2], gauges
    assert epp.poll() is None, epp.tail()


def test_admission_queue_under_churn(epp_factory, backends):
    """300 sheddable requests of three objectives wait in a saturated pool while a third of them are cancelled
    at random moments and room opens a little at a time: every stream ends either routed or cancelled, none is
    answered twice or lost, the EPP keeps serving, and the queue gauge returns to 0 (no waiter is leaked)."""
    import random
    rules = RULES + "---\n" + objective("other", -1) + "---\n" + objective("bulk", -5)
    epp = epp_factory(extra=["--sheddable-queue-timeout", "30", "--sheddable-queue-capacity", "400"],
                      endpoints=[b.address for b in backends], rules=rules, name="epp-queue-churn")
    a, b = backends
    rng = random.Random(7)

    async def go(ch):
        for x in backends:
            set_load(x, waiting=10)
        await settled(epp, 10.0, 0.0)
        streams = []
        for i in range(300):
            s = Stream(ch)
            body = json.dumps({"model": "opt-stable", "prompt": f"churn {i}"}).encode()
            await s.send(req_headers(headers={OBJECTIVE_HEADER: ("batch", "other", "bulk")[i % 3]}), req_body(body, eos=True))
            streams.append(s)
        doomed = set(rng.sample(range(300), 100))

        async def cancel_later(i):
            await asyncio.sleep(rng.uniform(0, 1.5))
            streams[i].call.cancel()

        async def outcome(i):
            try:
                r = await streams[i].recv(timeout=30)
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                return "cancelled"
            if r is None:
                return "ended"
            return "routed" if kind(r) == "request_headers" and destination(r)[0] else f"other {r}"
        waits = [asyncio.ensure_future(outcome(i)) for i in range(300)]
        cancels = [asyncio.ensure_future(cancel_later(i)) for i in doomed]
        # Room opens gradually: first one request's worth on B, then the load goes away.
        await asyncio.sleep(0.3)
        set_load(a, waiting=5)
        set_load(b, waiting=4)
        await asyncio.sleep(1.0)
        for x in backends:
            set_load(x)
        await asyncio.gather(*cancels)
        results = await asyncio.gather(*waits)
        for s in streams:
            s.call.cancel()
        return results, doomed
    results, doomed = run(epp, go, timeout=90)
    routed = [i for i, r in enumerate(results) if r == "routed"]
    assert all(r in ("routed", "cancelled") for r in results), collections.Counter(results)
    assert all(results[i] == "routed" for i in range(300) if i not in doomed), "a request that stayed was not routed"
    assert len(routed) >= 200, len(routed)
    deadline = time.monotonic() + SETTLE
    while epp_sum(epp, "inference_extension_flow_control_queue_size") != 0:
        assert time.monotonic() < deadline, "waiters leaked in the queue"
        time.sleep(0.05)
    assert epp.poll() is None, epp.tail()
    assert run(epp, lambda ch: exchange(ch)).dest in [a.address, b.address]


# -- LoRA affinity ----------------------------------------------------------------------------------------------

def settled_scrapes(backends, n=2, timeout=SETTLE):
    """Waits until each backend served `n` more /metrics scrapes: the EPP scraping only these has read the
    knobs set before the call."""
    start = [backend_stats(x)["metrics_scrapes"] for x in backends]
    deadline = time.monotonic() + timeout
    while any(backend_stats(x)["metrics_scrapes"] < s + n for x, s in zip(backends, start)):
        assert time.monotonic() < deadline, "backends not scraped"
        time.sleep(0.02)


def test_lora_affinity(epp_factory, tmp_path_factory):
    """vllm:lora_requests_info steers adapter requests: to the server running the adapter, else to one with a
    free adapter slot; requests for the served base model ignore adapters; --lora-affinity-scoring=false spreads.
    Equal queue and KV cache everywhere, so only the adapters differ. Backends of its own, scraped by one EPP at
    a time, so the scrape counter says when the EPP has read a change."""
    st, (a, b) = start_backends(tmp_path_factory, ["127.0.0.45", "127.0.0.46"], "lb-lora")
    try:
        epp = epp_factory(endpoints=[a.address, b.address], rules=RULES, name="epp-lora")
        base = "facebook/opt-125m"  # the fakes' model_name label

        async def spread(ch, model, n=30):
            return collections.Counter([(await exchange(ch, model=model)).dest for _ in range(n)])

        async def go(ch):
            out = {}
            # A runs sql-lora (1.0); B's only slot holds another adapter (0).
            set_load(a, waiting=1, kv=0.2, lora_running=["sql-lora"], max_lora=1)
            set_load(b, waiting=1, kv=0.2, lora_running=["tweet-summary"], max_lora=1)
            await asyncio.to_thread(settled_scrapes, [a, b])
            out["sql-lora on A"] = await paced(ch, 20, model="sql-lora")
            out["tweet-summary on B"] = await paced(ch, 20, model="tweet-summary")
            # The base model is no adapter: both share it although B's slots are full.
            out["base"] = await spread(ch, base)
            # A's slot freed (0.8), B now runs sql-lora (1.0): sql-lora moves to B, a new adapter goes to A.
            set_load(a, waiting=1, kv=0.2, lora_running=[], max_lora=1)
            set_load(b, waiting=1, kv=0.2, lora_running=["sql-lora"], max_lora=1)
            await asyncio.to_thread(settled_scrapes, [a, b])
            out["sql-lora on B"] = await paced(ch, 20, model="sql-lora")
            out["new adapter on A"] = await paced(ch, 20, model="food-review")
            return out
        out = run(epp, go)
        assert_all_to(out["sql-lora on A"], a.address, epp)
        assert_all_to(out["tweet-summary on B"], b.address, epp)
        assert set(out["base"]) == {a.address, b.address} and min(out["base"].values()) >= 3, out["base"]
        assert_all_to(out["sql-lora on B"], b.address, epp)
        assert_all_to(out["new adapter on A"], a.address, epp)
        epp.stop()

        off = epp_factory(extra=["--lora-affinity-scoring=false"], endpoints=[a.address, b.address], rules=RULES,
                          name="epp-lora-off")
        settled_scrapes([a, b])
        dests = run(off, lambda ch: spread(ch, "sql-lora", 40))
        assert set(dests) == {a.address, b.address} and min(dests.values()) >= 5, dests
    finally:
        st.stop()


def test_endpoint_picker_config_sets_the_scorer_weights(lb_epp, epp_factory, backends):
    """The reference's EndpointPickerConfig (--config-text, as --config-file): a profile with only the KV-cache
    scorer sends traffic to the emptier KV cache although its queue is longer; the default weights (queue ×2,
    KV ×2) prefer the empty queue for the same loads."""
    kv_only = "\n".join(["apiVersion: inference.networking.x-k8s.io/v1alpha1", "kind: EndpointPickerConfig",
                         "plugins:", "- type: queue-scorer", "- type: kv-cache-utilization-scorer",
                         "schedulingProfiles:", "- name: default", "  plugins:",
                         "  - pluginRef: kv-cache-utilization-scorer"]) + "\n"
    a, b = backends
    epp = epp_factory(extra=["--config-text", kv_only], endpoints=[a.address, b.address], rules=RULES, name="epp-kv-only")
    set_load(a, waiting=0, kv=0.9)
    set_load(b, waiting=4, kv=0.1)

    async def go(ch, target, e):
        await settled(e, 2.0, 0.5)
        await poll(ch, to(target.address), streak=3, what=f"routing to {target.address}")
        return await paced(ch, 15, model=DIRECT, prompt="weights")
    assert_all_to(run(epp, lambda ch: go(ch, b, epp)), b.address, epp)
    assert_all_to(run(lb_epp, lambda ch: go(ch, a, lb_epp)), a.address, lb_epp)


# -- other model servers ----------------------------------------------------------------------------------------

SGLANG_FLAGS = ["--total-queued-requests-metric", "sglang:num_queue_reqs",
                "--total-running-requests-metric", "sglang:num_running_reqs",
                "--kv-cache-usage-percentage-metric", "sglang:token_usage"]
# Triton's TensorRT-LLM metrics share one family per kind, told apart by a label (bare or quoted values);
# the family also holds a `max` series (512) that must not count as waiting.
TRTLLM_FLAGS = ["--total-queued-requests-metric", "nv_trt_llm_request_metrics{request_type=waiting}",
                "--total-running-requests-metric", 'nv_trt_llm_request_metrics{request_type="scheduled"}',
                "--kv-cache-usage-percentage-metric", "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
                "--lora-info-metric="]


@pytest.mark.parametrize("flavor, flags", [("sglang", SGLANG_FLAGS), ("trtllm", TRTLLM_FLAGS)])
def test_other_model_servers_through_the_metric_flags(epp_factory, tmp_path_factory, flavor, flags):
    """The reference's metric flags point the scraper at another server's names (SGLang, TensorRT-LLM under
    Triton): the pool gauges show exactly the loads the fakes serve under those names, and traffic follows the
    load as with vLLM. With vLLM's names the same servers give no samples, and the EPP logs what it looked for."""
    st, (a, b) = start_backends(tmp_path_factory, ["127.0.0.47", "127.0.0.48"], f"lb-{flavor}", metrics_flavor=flavor)
    try:
        epp = epp_factory(extra=flags, endpoints=[a.address, b.address], rules=RULES, name=f"epp-{flavor}")
        follow_flip(epp, a, b, 20)
        epp.stop()

        plain = epp_factory(endpoints=[a.address, b.address], rules=RULES, name=f"epp-{flavor}-vllm-names")
        plain.wait_log("model server metrics unavailable", count=2)
        assert "no vllm:num_requests_waiting or vllm:kv_cache_usage_perc in the response" in plain.log_text()
        assert epp_sum(plain, "inference_pool_per_pod_queue_size") == 0, "no samples (A serves 10 waiting)"
        dests = run(plain, lambda ch: paced(ch, 6))
        assert all(is_routed(o) for o in dests), "without samples it still routes (fewest in flight)"
    finally:
        st.stop()


def test_metrics_over_https(epp_factory, tmp_path_factory, cert_factory):
    """--model-server-metrics-scheme https scrapes over TLS (OpenSSL, as every TLS of the EPP): with the default
    insecure-skip-verify the self-signed servers' loads arrive; verifying them against the system's trust roots
    refuses the certificates, logs why, and leaves the endpoints without samples (still routed)."""
    hosts = ["127.0.0.49", "127.0.0.50"]
    certs = cert_factory(tmp_path_factory.mktemp("fake-vllm-tls"), "fake-vllm")
    # One port number free on both addresses: --model-server-metrics-port is one for the pool.
    tls_port = next(p for p in (stack.free_port(hosts[0]) for _ in range(50)) if _port_free(hosts[1], p))
    st = stack.Stack(tmp_path_factory.mktemp("lb-tls") / "logs")
    try:
        a, b = [st.fake_vllm(h, stack.free_port(h), name=f"tls-{h}", tls=(tls_port, certs / "tls.crt", certs / "tls.key"))
                for h in hosts]
        for h in hosts:
            stack.wait_tcp(h, tls_port)
        set_load(a, waiting=3, kv=0.25)
        set_load(b, waiting=6, kv=0.75)
        flags = ["--model-server-metrics-scheme", "https", "--model-server-metrics-port", str(tls_port)]
        epp = epp_factory(extra=flags, endpoints=[a.address, b.address], rules=RULES, name="epp-metrics-https")
        wait_gauges(epp, 4.5, 0.5)
        assert per_pod_queue(epp, a) == 3 and per_pod_queue(epp, b) == 6
        epp.stop()

        strict = epp_factory(extra=flags + ["--model-server-metrics-https-insecure-skip-verify=false"],
                             endpoints=[a.address, b.address], rules=RULES, name="epp-metrics-https-verify")
        strict.wait_log("model server metrics unavailable", count=2)
        assert "https://127.0.0.49" in strict.log_text()
        assert "certificate" in strict.log_text().lower(), strict.tail()
        assert epp_sum(strict, "inference_pool_per_pod_queue_size") == 0
        assert all(is_routed(o) for o in run(strict, lambda ch: paced(ch, 4)))
    finally:
        st.stop()


def _port_free(host, port):
    import socket
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


# -- prefix-cache affinity ---------------------------------------------------------------------------------------

# No rewrite rule matches this model: the seed rule's 90/10 split would give one prompt two target models,
# and prefix blocks are hashed per target model (the KV cache holds one model's blocks).
DIRECT = "facebook/opt-125m"


def shared_prefix(j):
    """A long system prompt (~1.2 KB, about 18 blocks of 64 bytes) that differs per conversation j."""
    return f"conversation {j:03d}: " + "You are a helpful assistant who answers briefly. " * 24


def test_prefix_affinity_keeps_a_prompt_prefix_on_one_endpoint(lb_epp, backends):
    """With equal load, requests sharing a prompt prefix go where that prefix went before (its KV cache is
    there); different prefixes still spread over the pool; a loaded endpoint loses its prefixes."""
    a, b = backends
    for x in backends:
        set_load(x, waiting=0, kv=0.1)

    async def go(ch):
        await poll(ch, is_routed, what="first routed request")
        await asyncio.sleep(1.0)  # both endpoints scraped since the loads were set: fresh, equal samples
        homes, followers = {}, {}
        for j in range(12):
            first = await exchange(ch, prompt=shared_prefix(j) + "first question", model=DIRECT)
            homes[j] = first.dest
            followers[j] = [(await exchange(ch, prompt=shared_prefix(j) + f"question {i}", model=DIRECT)).dest for i in range(6)]
            await asyncio.sleep(PACE)
        # Load beats affinity: conversation 0's home becomes busy, its next requests go elsewhere.
        home = homes[0]
        other = b.address if home == a.address else a.address
        set_load(a if home == a.address else b, waiting=8, kv=0.9)
        moved = await poll(ch, to(other), streak=3, what="conversation 0 leaving its loaded home",
                           prompt=shared_prefix(0) + "later question", model=DIRECT)
        return homes, followers, moved
    homes, followers, moved = run(lb_epp, go)
    for j, dests in followers.items():
        assert set(dests) == {homes[j]}, f"conversation {j}: first on {homes[j]}, then {dests}\n{lb_epp.tail()}"
    assert set(homes.values()) == {a.address, b.address}, f"12 prefixes all on one endpoint: {homes}"


def test_prefix_affinity_off(epp_factory, backends):
    """--prefix-cache-scoring=false: the same prefix spreads like any other request (equal load)."""
    epp = epp_factory(extra=["--prefix-cache-scoring=false"], endpoints=[b.address for b in backends], rules=RULES,
                      name="epp-no-prefix")
    for x in backends:
        set_load(x, waiting=0, kv=0.1)

    async def go(ch):
        await poll(ch, is_routed, what="first routed request")
        await asyncio.sleep(1.0)
        return [(await exchange(ch, prompt=shared_prefix(99) + f"question {i}", model=DIRECT)).dest for i in range(40)]
    dests = collections.Counter(run(epp, go))
    assert set(dests) == {b.address for b in backends} and min(dests.values()) >= 5, dests


def test_prefix_blocks_are_awaited_then_the_body_streams(lb_epp, backends):
    """With fresh load samples and prefix affinity on, routing waits for the prompt's hashed blocks (4 KiB)
    instead of routing on the model alone, so one conversation matches on the same blocks however the
    gateway chunks its bodies; after that the rest of a large body still streams before it ends."""
    for x in backends:
        set_load(x, waiting=0, kv=0.1)
    head = json.dumps({"model": DIRECT, "max_tokens": 3})[:-1].encode() + b', "prompt": "'
    system = shared_prefix(500).encode()

    async def one(ch, chunk, tail=b"x" * 20_000):
        s = Stream(ch)
        await s.send(req_headers(), req_body(head))
        early_quiet = await s.no_reply_within(0.3)  # only the model so far: no routing yet
        body = system * 4 + tail + b'"}'
        pos = 0
        while True:
            piece = body[pos:pos + chunk]
            pos += len(piece)
            await s.send(req_body(piece, eos=pos >= len(body)))
            if pos >= len(body) or not await s.no_reply_within(0.05):
                break
        reply = await s.recv_pending()
        assert kind(reply) == "request_headers", reply
        routed_after = pos
        rest = body[pos:]
        if rest:
            await s.send(req_body(rest, eos=True))
        await s.collect_request()
        await s.send(resp_headers())
        await s.recv()
        await s.send(resp_body(b'{"model":"' + DIRECT.encode() + b'","choices":[]}', eos=True))
        while True:
            r = await s.recv()
            if r is None or (kind(r) == "response_body" and streamed_body(r)[1]):
                break
        await s.close()
        return early_quiet, routed_after, destination(reply)[0], len(rest)

    async def go(ch):
        await poll(ch, is_routed, what="first routed request")
        await asyncio.sleep(1.0)
        return [await one(ch, chunk) for chunk in (100_000, 97, 1000, 513, 4096, 256)]
    results = run(lb_epp, go)
    homes = set()
    for early_quiet, routed_after, dest, unsent in results:
        assert early_quiet, "routed on the model alone"
        assert routed_after >= 4096, routed_after  # not before the first 4 KiB of prompt
        homes.add(dest)
    # Chunkings 97 … 4096 all left data unsent when routed (the body kept streaming afterwards).
    assert all(unsent > 0 for _, _, _, unsent in results[1:]), results
    assert len(homes) == 1, f"one conversation over {homes}"


@pytest.mark.parametrize("flags, message", [
    (["--refresh-metrics-interval", "0"], "--refresh-metrics-interval must be a positive number of seconds"),
    (["--metrics-staleness-threshold=-1"], "--metrics-staleness-threshold must be a positive number of seconds"),
    (["--model-server-metrics-port", "70000"], "--model-server-metrics-port must be 0"),
    (["--model-server-metrics-path", "metrics"], "--model-server-metrics-path must start with '/'"),
    (["--prefix-cache-block-bytes", "60"], "--prefix-cache-block-bytes must be a positive multiple of 8"),
    (["--prefix-cache-max-blocks", "0"], "--prefix-cache-max-blocks must be 1-4096"),
    (["--prefix-cache-capacity", "0"], "--prefix-cache-capacity must be positive"),
    (["--sheddable-queue-timeout=-1"], "--sheddable-queue-timeout must be 0"),
    (["--sheddable-queue-capacity", "0"], "--sheddable-queue-capacity must be positive"),
    (["--model-server-metrics-scheme", "ftp"], "--model-server-metrics-scheme must be http or https"),
    (["--total-queued-requests-metric", "9lives"], "--total-queued-requests-metric: invalid metric selector '9lives'"),
    (["--kv-cache-usage-percentage-metric", "kv{type=fraction"], "missing '}'"),
    (["--total-running-requests-metric", 'r{a="x}'], "unterminated label value"),
])
def test_bad_load_flags_stop_the_epp_with_a_clear_message(flags, message):
    import subprocess
    out = subprocess.run([stack.epp_bin(), "--secure-serving=false", "--endpoints", "127.0.0.1:1",
                          "--grpc-port", str(stack.free_port()), "--grpc-health-port", str(stack.free_port()),
                          "--metrics-port", "0"] + flags, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout, out.stderr[-500:]
