#!/usr/bin/env python3
"""Local demo: fake vLLM backends + the EPP in standalone mode + Envoy 1.40 on 127.0.0.1:8081.

  demo/run-demo.sh            run until Ctrl-C
  demo/run-demo.sh --check    send ~200 requests, print the split, exit (0 when it looks right)

Options: --port (Envoy listener, 8081), --backends 127.0.0.2:8000,127.0.0.3:8000,
--config-dir (demo/config), --release (use the release build), --requests N (with --check).
"""
import argparse
import collections
import http.client
import json
import os
import signal
import sys
import time

import stack

CURL = ("curl localhost:{port}/v1/completions -H 'content-type: application/json' "
        "-d '{{\"model\":\"opt-stable\",\"prompt\":\"hi\",\"max_tokens\":5}}' -i")


def check(port, n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen = collections.Counter()
    backends = collections.Counter()
    restored = errors = 0
    for i in range(n):
        body = json.dumps({"model": "opt-stable", "prompt": f"hello {i}", "max_tokens": 5})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            errors += 1
            continue
        seen[r.getheader("x-gateway-target-model")] += 1
        backends[r.getheader("x-fake-backend")] += 1
        if json.loads(data).get("model") == "opt-stable":
            restored += 1
    total = sum(seen.values())
    print(f"{n} requests to 'opt-stable' through Envoy :{port} → EPP → fake vLLM")
    for model, c in seen.most_common():
        print(f"  {model:28s} {c:5d}  {100.0 * c / max(total, 1):5.1f}%")
    print(f"  backends: " + ", ".join(f"{b} {c}" for b, c in sorted(backends.items())))
    print(f"  response model restored to 'opt-stable': {restored}/{total}; errors: {errors}")
    canary = seen.get("facebook/opt-125m-canary", 0)
    ok = errors == 0 and restored == total == n and set(seen) <= {"facebook/opt-125m", "facebook/opt-125m-canary"} \
        and 0 < canary < n * 0.25
    print("CHECK " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8081")))
    p.add_argument("--epp-port", type=int, default=None)
    p.add_argument("--backends", default="127.0.0.2:8000,127.0.0.3:8000")
    p.add_argument("--config-dir", default=str(stack.DEMO / "config"))
    p.add_argument("--release", action="store_true")
    a = p.parse_args(argv)

    def interrupt(*_):
        raise KeyboardInterrupt
    # Ctrl-C and SIGTERM both stop everything (SIGINT may start ignored when launched in the background).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    st = stack.Stack()
    try:
        backends = [b.strip() for b in a.backends.split(",") if b.strip()]
        for b in backends:
            host, port = b.rsplit(":", 1)
            st.fake_vllm(host, int(port))
        epp = st.epp(backends, config_dir=a.config_dir, grpc_port=a.epp_port,
                     configuration="release" if a.release else "debug")
        envoy = st.envoy(epp_port=epp.grpc_port, port=a.port)
        print(f"ready: Envoy 127.0.0.1:{a.port} (admin :{envoy.admin_port}) → EPP 127.0.0.1:{epp.grpc_port} "
              f"→ fake vLLM {', '.join(backends)}; rules in {a.config_dir}; logs in {st.logdir}", flush=True)
        if a.check:
            return check(a.port, a.requests)
        print("\nTry:\n  " + CURL.format(port=a.port))
        print("  (look for x-gateway-target-model and x-fake-model in the headers, \"model\": \"opt-stable\" in the body)")
        print(f"Edit {a.config_dir}/opt-stable.yaml to change the weights: no restart needed. Ctrl-C stops.", flush=True)
        while True:
            for proc in st.procs:
                if proc.poll() is not None:
                    print(f"{proc.name} exited ({proc.poll()}):\n{proc.tail()}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        st.stop()


if __name__ == "__main__":
    sys.exit(main())
