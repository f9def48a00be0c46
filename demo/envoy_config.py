#!/usr/bin/env python3
"""Generates the Envoy 1.40 bootstrap for the demo, the tests and the benchmarks.

Modelled on ../../shared/reference/envoy.yaml (how GIE gateways drive an endpoint picker):
all six ext_proc phases SEND, both bodies FULL_DUPLEX_STREAMED, failure_mode_allow false, an
ORIGINAL_DST upstream cluster keyed on the `x-gateway-destination-endpoint` header, plus (as the
notes require for the dynamic-metadata route) `original_dst_lb_config.metadata_key` envoy.lb /
x-gateway-destination-endpoint and the filter's `metadata_options.receiving_namespaces.untyped:
["envoy.lb"]`. Everything binds 127.0.0.1; the picker cluster is plaintext h2c.

With pool_endpoints (render() only) the gateway routes instead to a STATIC cluster of those endpoints
whose load balancer is Envoy's override_host policy (the one Envoy documents for endpoint pickers):
it reads the picker's comma-separated list (first the picked endpoint, then fallbacks)
from the envoy.lb metadata, retries go down the list, and the endpoint that served is written back
to envoy.lb / x-gateway-destination-endpoint-served, which the ext_proc filter forwards to the picker
with the response (metadata_options.forwarding_namespaces).

Listeners (each optional):
  gateway  (--port)            HTTP/1.1 + h2c, ext_proc filter → router → original_destination_cluster
  direct   (--direct-port)     the same without ext_proc (clients set x-gateway-destination-endpoint)
  backend  (--backend-port)    a direct_response listener answering a small OpenAI-style JSON body
                               (a benchmark backend that is never the bottleneck)

Usage: envoy_config.py --port 8081 --admin-port 19000 --epp-port 9002 [--direct-port N]
                       [--backend-port N] [--access-log PATH|none] [--body-mode FULL_DUPLEX_STREAMED] > envoy.yaml
"""
import argparse
import json
import sys

ORIG_DST = "original_destination_cluster"


def _hcm(name, port, http_filters, access_log, routes=None, buffer_limit=32768):
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"http-{port}",
        "codec_type": "AUTO",
        "route_config": {
            "name": name,
            "virtual_hosts": [{
                "name": f"{name}-default",
                "domains": ["*"],
                "routes": routes or [{
                    "match": {"prefix": "/"},
                    "route": {"cluster": ORIG_DST, "timeout": "86400s", "idle_timeout": "86400s"},
                }],
            }],
        },
        "http_filters": http_filters,
        "http2_protocol_options": {
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "server_header_transformation": "PASS_THROUGH",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
    }
    if access_log:
        hcm["access_log"] = [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": access_log,
                "log_format": {"json_format": {
                    "listener": name,
                    "start_time": "%START_TIME%",
                    "method": "%REQ(:METHOD)%",
                    "path": "%REQ(:PATH)%",
                    "protocol": "%PROTOCOL%",
                    "code": "%RESPONSE_CODE%",
                    "flags": "%RESPONSE_FLAGS%",
                    "details": "%RESPONSE_CODE_DETAILS%",
                    "bytes_in": "%BYTES_RECEIVED%",
                    "bytes_out": "%BYTES_SENT%",
                    "upstream_host": "%UPSTREAM_HOST%",
                    "dest_header": "%REQ(X-GATEWAY-DESTINATION-ENDPOINT)%",
                    "lb_metadata": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%",
                    "served": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint-served)%",
                    "request_id": "%REQ(X-REQUEST-ID)%",
                    "duration_ms": "%DURATION%",
                }},
            },
        }]
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "per_connection_buffer_limit_bytes": buffer_limit,
        "filter_chains": [{"name": name, "filters": [{
            "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                           "suppress_envoy_headers": True}}


def ext_proc_filter(epp_port, body_mode="FULL_DUPLEX_STREAMED", response_body_mode=None, forward_lb=False):
    metadata_options = {"receiving_namespaces": {"untyped": ["envoy.lb"]}}
    if forward_lb:
        metadata_options["forwarding_namespaces"] = {"untyped": ["envoy.lb"]}
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc", "authority": f"localhost:{epp_port}"},
                             "timeout": "10s"},
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": body_mode,
                "response_body_mode": response_body_mode or body_mode,
                "request_trailer_mode": "SEND",
                "response_trailer_mode": "SEND",
            },
            "message_timeout": "1000s",
            "failure_mode_allow": False,
            "metadata_options": metadata_options,
        },
    }


POOL = "inference_pool"


def override_host_pool(endpoints):
    """A STATIC cluster of `endpoints` (ip:port) load-balanced by the override_host policy."""
    def address(ep):
        host, port = ep.rsplit(":", 1)
        return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
    key = lambda k: {"key": "envoy.lb", "path": [{"key": k}]}  # noqa: E731
    return {
        "name": POOL,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": POOL, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": address(ep)}} for ep in endpoints]}]},
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"metadata": key("x-gateway-destination-endpoint")},
                                          {"header": "x-gateway-destination-endpoint"}],
                "selected_host_key": key("x-gateway-destination-endpoint-served"),
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"},
                }}]},
            },
        }}]},
    }


def render(port=8081, admin_port=19000, epp_port=9002, direct_port=None, backend_port=None,
           access_log="/dev/stdout", body_mode="FULL_DUPLEX_STREAMED", buffer_limit=32768, header_routing=True,
           pool_endpoints=None, retries=2):
    """header_routing=False: the ORIGINAL_DST cluster uses only the envoy.lb dynamic metadata.
    pool_endpoints: route through an override_host cluster of these endpoints, with `retries` retries on
    connection failures, resets and 5xx (each to the next endpoint of the picker's list)."""
    listeners = []
    if port:
        routes = None
        if pool_endpoints is not None:
            routes = [{"match": {"prefix": "/"}, "route": {
                "cluster": POOL, "timeout": "86400s", "idle_timeout": "86400s",
                "retry_policy": {"retry_on": "connect-failure,refused-stream,reset,5xx", "num_retries": retries},
            }}]
        listeners.append(_hcm("gateway", port, [ext_proc_filter(epp_port, body_mode, forward_lb=pool_endpoints is not None),
                                                ROUTER], access_log, routes=routes, buffer_limit=buffer_limit))
    if direct_port:
        listeners.append(_hcm("direct", direct_port, [ROUTER], access_log, buffer_limit=buffer_limit))
    if backend_port:
        body = json.dumps({"id": "cmpl-direct", "object": "text_completion", "model": "facebook/opt-125m",
                           "choices": [{"index": 0, "text": " hello", "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}})
        listeners.append(_hcm("backend", backend_port, [ROUTER], None, routes=[{
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        }], buffer_limit=1 << 20))
    clusters = [{
        "name": ORIG_DST,
        "type": "ORIGINAL_DST",
        "connect_timeout": "1000s",
        "lb_policy": "CLUSTER_PROVIDED",
        "circuit_breakers": {"thresholds": [
            {"max_connections": 40000, "max_pending_requests": 40000, "max_requests": 40000}]},
        "original_dst_lb_config": dict(
            {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"} if header_routing else {},
            metadata_key={"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}),
    }]
    if pool_endpoints is not None:
        clusters.append(override_host_pool(pool_endpoints))
    if port:
        clusters.append({
            "name": "ext_proc",
            "type": "STATIC",
            "connect_timeout": "86400s",
            "lb_policy": "LEAST_REQUEST",
            "circuit_breakers": {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000,
                                                 "max_requests": 40000, "max_retries": 1024}]},
            "health_checks": [{
                "timeout": "2s", "interval": "10s", "unhealthy_threshold": 3, "healthy_threshold": 2,
                "reuse_connection": True,
                "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
            }],
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {
                    "initial_stream_window_size": 65536, "initial_connection_window_size": 1048576}},
            }},
            "load_assignment": {"cluster_name": "ext_proc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": epp_port}}}}]}]},
        })
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def to_yaml(cfg):
    try:
        import yaml
        return "# generated by demo/envoy_config.py\n" + yaml.safe_dump(cfg, sort_keys=False, width=120)
    except ImportError:  # JSON is valid YAML
        return json.dumps(cfg, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8081, help="gateway listener (0 = none)")
    p.add_argument("--admin-port", type=int, default=19000)
    p.add_argument("--epp-port", type=int, default=9002)
    p.add_argument("--direct-port", type=int, default=None)
    p.add_argument("--backend-port", type=int, default=None)
    p.add_argument("--access-log", default="/dev/stdout", help="path, or 'none'")
    p.add_argument("--body-mode", default="FULL_DUPLEX_STREAMED")
    a = p.parse_args(argv)
    sys.stdout.write(to_yaml(render(a.port, a.admin_port, a.epp_port, a.direct_port, a.backend_port,
                                    None if a.access_log == "none" else a.access_log, a.body_mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
