"""deploy/ checks: the kustomization renders, every object parses, the CRD schemas accept the examples and
reject invalid rewrites, RBAC is least-privilege, the Deployment/Service/Dockerfile follow the rules.

Rendering uses `kubectl kustomize` when kubectl is on PATH; a minimal renderer (the `resources` list and
`namespace` of a kustomization, which is all deploy/ uses) is always run too, and the two must agree.
Schema validation uses `jsonschema` on the CRDs' openAPIV3Schema (the `x-kubernetes-*` extensions are
ignored by jsonschema; the one CEL rule, "all targets or none set weight", is checked by hand here).
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
EXAMPLES = DEPLOY / "examples"
CLUSTER_SCOPED = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Namespace"}


def minimal_kustomize(directory: Path) -> list[dict]:
    """The subset of kustomize deploy/ uses: `resources` (files or directories with a kustomization) and
    `namespace` (set on namespaced objects and on RoleBinding ServiceAccount subjects)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "namespace", "resources"}, f"unsupported kustomize fields: {set(kust)}"
    objects: list[dict] = []
    for res in kust.get("resources", []):
        path = directory / res
        if path.is_dir():
            objects += minimal_kustomize(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    ns = kust.get("namespace")
    if ns:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = ns
            if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for s in obj.get("subjects", []):
                    if s.get("kind") == "ServiceAccount":
                        s["namespace"] = ns
    return objects


def render(directory: Path) -> list[dict]:
    objects = minimal_kustomize(directory)
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True,
                             timeout=60).stdout
        rendered = [d for d in yaml.safe_load_all(out) if d]
        key = lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])  # noqa: E731
        assert sorted(map(key, rendered)) == sorted(map(key, objects)), "kubectl kustomize and the minimal renderer disagree"
        return rendered
    return objects


@pytest.fixture(scope="module")
def deploy_objects() -> list[dict]:
    return render(DEPLOY)


@pytest.fixture(scope="module")
def example_objects() -> list[dict]:
    return render(EXAMPLES)


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind, name=None):
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def crd_validator(objects, kind) -> jsonschema.protocols.Validator:
    crd = next(o for o in by_kind(objects, "CustomResourceDefinition") if o["spec"]["names"]["kind"] == kind)
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    schema = version["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


def cel_all_or_none_weights(obj) -> list[str]:
    errors = []
    for i, rule in enumerate(obj.get("spec", {}).get("rules", []) or []):
        targets = rule.get("targets") or []
        weighted = [("weight" in t) for t in targets]
        if any(weighted) and not all(weighted):
            errors.append(f"rules[{i}].targets: either all targets or none set weight")
    return errors


def rewrite_errors(objects, obj) -> list[str]:
    v = crd_validator(objects, "InferenceModelRewrite")
    return [e.message for e in v.iter_errors(obj)] + cel_all_or_none_weights(obj)


# --- every object parses and is well-formed ---------------------------------------------------------

def test_every_object_parses(deploy_objects, example_objects):
    assert deploy_objects and example_objects
    for obj in deploy_objects + example_objects:
        assert isinstance(obj.get("apiVersion"), str) and "/" in obj["apiVersion"] or obj["apiVersion"] == "v1"
        assert obj.get("kind")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"]), obj["metadata"]["name"]
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == "default"
    kinds = sorted(o["kind"] for o in deploy_objects)
    assert kinds == sorted(["CustomResourceDefinition"] * 3 + ["ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"])


def test_every_yaml_file_under_deploy_is_rendered():
    """No manifest is forgotten in a kustomization."""
    listed = set()
    for kust in DEPLOY.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kust.read_text()).get("resources", []):
            listed.add((kust.parent / res).resolve())
    for f in DEPLOY.rglob("*.yaml"):
        if f.name != "kustomization.yaml":
            assert f.resolve() in listed, f"{f} is not listed in a kustomization"


def test_crds_are_structural_with_printer_columns(deploy_objects):
    crds = {o["spec"]["names"]["kind"]: o for o in by_kind(deploy_objects, "CustomResourceDefinition")}
    assert set(crds) == {"InferencePool", "InferenceModelRewrite", "InferenceObjective"}
    expected = {"InferencePool": ("inference.networking.k8s.io", "v1"),
                "InferenceModelRewrite": ("inference.networking.x-k8s.io", "v1alpha2"),
                "InferenceObjective": ("inference.networking.x-k8s.io", "v1alpha2")}
    for kind, crd in crds.items():
        group, version = expected[kind]
        assert crd["spec"]["group"] == group
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{group}"
        assert crd["spec"]["scope"] == "Namespaced"
        versions = crd["spec"]["versions"]
        assert [v["name"] for v in versions if v["storage"]] == [version]
        v = versions[0]
        assert v["served"] and "status" in v["subresources"]
        schema = v["schema"]["openAPIV3Schema"]
        jsonschema.Draft7Validator.check_schema(schema)
        assert schema["type"] == "object" and "spec" in schema["required"]

        def walk(node, path="$"):  # structural: every node (except preserve-unknown) has a type
            if not isinstance(node, dict):
                return
            if not node.get("x-kubernetes-preserve-unknown-fields"):
                assert "type" in node, f"{kind}: {path} has no type"
            for k, sub in (node.get("properties") or {}).items():
                walk(sub, f"{path}.{k}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{path}[]")
            if isinstance(node.get("additionalProperties"), dict):
                walk(node["additionalProperties"], f"{path}{{}}")
        walk(schema)
        columns = {c["name"]: c["jsonPath"] for c in v.get("additionalPrinterColumns", [])}
        assert "Age" in columns
        if kind != "InferencePool":
            assert columns.get("Pool") == ".spec.poolRef.name"


# --- the examples against the schemas --------------------------------------------------------------

def test_examples_validate_against_crds(deploy_objects, example_objects):
    checked = 0
    for obj in example_objects:
        if obj["kind"] in ("InferencePool", "InferenceModelRewrite", "InferenceObjective"):
            errors = [e.message for e in crd_validator(deploy_objects, obj["kind"]).iter_errors(obj)]
            if obj["kind"] == "InferenceModelRewrite":
                errors += cel_all_or_none_weights(obj)
            assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"
            checked += 1
    assert checked == 3
    rewrite = one(example_objects, "InferenceModelRewrite", "opt-stable")
    rule = rewrite["spec"]["rules"][0]
    assert rule["matches"][0]["model"] == {"type": "Exact", "value": "opt-stable"}
    assert rule["targets"] == [{"modelRewrite": "facebook/opt-125m", "weight": 90},
                               {"modelRewrite": "facebook/opt-125m-canary", "weight": 10}]


@pytest.mark.parametrize("mutate,why", [
    (lambda o: o["spec"]["rules"][0]["targets"][0].__setitem__("weight", 0), "weight 0"),
    (lambda o: o["spec"]["rules"][0]["targets"][0].__setitem__("weight", 1_000_001), "weight above 1000000"),
    (lambda o: o["spec"]["rules"][0]["targets"][0].__setitem__("weight", "90"), "weight as a string"),
    (lambda o: o["spec"]["rules"][0]["targets"][0].pop("modelRewrite"), "missing modelRewrite"),
    (lambda o: o["spec"]["rules"][0]["targets"][0].__setitem__("modelRewrite", ""), "empty modelRewrite"),
    (lambda o: o["spec"]["rules"][0]["matches"][0]["model"].__setitem__("type", "Prefix"), "bad match type"),
    (lambda o: o["spec"]["rules"][0]["matches"][0]["model"].pop("value"), "match without value"),
    (lambda o: o["spec"]["rules"][0].__setitem__("targets", []), "no targets"),
    (lambda o: o["spec"].__setitem__("rules", []), "no rules"),
    (lambda o: o["spec"].pop("poolRef"), "missing poolRef"),
    (lambda o: o["spec"]["poolRef"].pop("name"), "poolRef without name"),
    (lambda o: o["spec"]["rules"][0]["targets"][1].pop("weight"), "mixed weighted and unweighted targets"),
])
def test_invalid_rewrites_are_rejected(deploy_objects, example_objects, mutate, why):
    bad = copy.deepcopy(one(example_objects, "InferenceModelRewrite", "opt-stable"))
    mutate(bad)
    assert rewrite_errors(deploy_objects, bad), f"schema accepted a rewrite with {why}"


def test_unweighted_and_match_all_rewrites_are_valid(deploy_objects):
    ok = {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModelRewrite",
          "metadata": {"name": "all"},
          "spec": {"poolRef": {"name": "p"}, "rules": [{"targets": [{"modelRewrite": "a"}, {"modelRewrite": "b"}]}]}}
    assert rewrite_errors(deploy_objects, ok) == []


def test_invalid_pools_and_objectives_are_rejected(deploy_objects, example_objects):
    pool_v = crd_validator(deploy_objects, "InferencePool")
    pool = one(example_objects, "InferencePool")
    for mutate in (lambda p: p["spec"].__setitem__("targetPorts", []),
                   lambda p: p["spec"].__setitem__("targetPorts", [{"number": n} for n in range(8000, 8009)]),
                   lambda p: p["spec"]["targetPorts"][0].__setitem__("number", 70000),
                   lambda p: p["spec"]["selector"].__setitem__("matchLabels", {}),
                   lambda p: p["spec"].__setitem__("appProtocol", "grpc"),
                   lambda p: p["spec"]["endpointPickerRef"].__setitem__("failureMode", "Sometimes"),
                   lambda p: p["spec"].pop("endpointPickerRef")):
        bad = copy.deepcopy(pool)
        mutate(bad)
        assert list(pool_v.iter_errors(bad)), bad["spec"]
    obj_v = crd_validator(deploy_objects, "InferenceObjective")
    objective = one(example_objects, "InferenceObjective")
    bad = copy.deepcopy(objective)
    bad["spec"]["priority"] = "high"
    assert list(obj_v.iter_errors(bad))
    bad = copy.deepcopy(objective)
    bad["spec"].pop("poolRef")
    assert list(obj_v.iter_errors(bad))


# --- RBAC, Deployment, Service ---------------------------------------------------------------------

def test_rbac_is_least_privilege(deploy_objects):
    role = one(deploy_objects, "Role", "epp")
    grants = set()
    for rule in role["rules"]:
        for verb in rule["verbs"]:
            assert verb != "*"
            for group in rule["apiGroups"]:
                assert group != "*"
                for res in rule["resources"]:
                    assert res != "*"
                    grants.add((group, res, verb))
    expected = {("", "pods", v) for v in ("get", "list", "watch")}
    expected |= {(g, "inferencepools", v) for g in ("inference.networking.k8s.io", "inference.networking.x-k8s.io")
                 for v in ("get", "list", "watch")}
    for g in ("inference.networking.x-k8s.io", "llm-d.ai"):
        expected |= {(g, r, v) for r in ("inferencemodelrewrites", "inferenceobjectives") for v in ("get", "list", "watch")}
        expected.add((g, "inferencemodelrewrites/status", "patch"))
    expected |= {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    assert grants == expected
    assert not by_kind(deploy_objects, "ClusterRole")
    binding = one(deploy_objects, "RoleBinding", "epp")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "epp"}
    sa = one(deploy_objects, "ServiceAccount", "epp")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "epp", "namespace": sa["metadata"]["namespace"]}]


def test_deployment_and_service(deploy_objects, example_objects):
    dep = one(deploy_objects, "Deployment", "epp")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["serviceAccountName"] == one(deploy_objects, "ServiceAccount")["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    args = c["args"]
    pool = one(example_objects, "InferencePool")
    assert f"--pool-name={pool['metadata']['name']}" in args
    assert "--secure-serving=true" in args
    assert all(a.startswith("--") for a in args)
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert {p["containerPort"] for p in c["ports"]} == {9002, 9003, 9090}
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    svc = one(deploy_objects, "Service", "epp")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {9002, 9003, 9090}
    assert ports[9002].get("appProtocol") == "http2"
    # The pool's endpoint picker reference points at this Service.
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == svc["metadata"]["name"] and ref["port"]["number"] == 9002


def test_examples_wire_together(example_objects):
    pool = one(example_objects, "InferencePool")
    vllm = one(example_objects, "Deployment", "vllm-opt-125m")
    labels = vllm["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = vllm["spec"]["template"]["spec"]["containers"]
    assert "--model=facebook/opt-125m" in c["args"]
    assert "facebook/opt-125m-canary" in c["args"], "the canary target name is served"
    assert {p["containerPort"] for p in c["ports"]} >= {t["number"] for t in pool["spec"]["targetPorts"]}
    for kind in ("InferenceModelRewrite", "InferenceObjective"):
        assert one(example_objects, kind)["spec"]["poolRef"]["name"] == pool["metadata"]["name"]
    gw = one(example_objects, "Gateway")
    route = one(example_objects, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["name"] == gw["metadata"]["name"]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}


# --- Dockerfile --------------------------------------------------------------------------------------

def test_dockerfile_is_multi_stage_and_minimal():
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    stages = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(stages) == 2
    args = {m.group(1): m.group(2) for m in (re.match(r"ARG (\w+)=(\S+)", ln) for ln in lines) if m}
    builder = stages[0].split()[1]
    builder = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), builder)
    assert re.match(r"swift:6\.\d+-bookworm$", builder), builder
    assert stages[1].split()[1] == "debian:bookworm-slim"
    runtime = lines[lines.index(stages[1]):]
    build = lines[:lines.index(stages[1])]
    installs = lambda section: set(  # noqa: E731
        pkg for ln in section for m in [re.search(r"apt-get install (.*?)(&&|$)", ln)] if m
        for pkg in m.group(1).split() if not pkg.startswith("-"))
    assert {"libnghttp2-dev", "libssl-dev"} <= installs(build)
    assert installs(runtime) == {"libnghttp2-14", "libssl3", "ca-certificates"}
    copies = [ln for ln in runtime if ln.startswith("COPY")]
    assert len(copies) == 1 and copies[0].startswith("COPY --from=") and "epp" in copies[0]
    user = [ln for ln in runtime if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert any(ln.startswith("ENTRYPOINT") and "epp" in ln for ln in runtime)


def test_deployment_args_are_flags_the_binary_accepts(deploy_objects):
    """Every flag the Deployment passes exists in `epp --help` (a renamed flag would crash-loop the pod)."""
    import os
    binary = os.environ.get("EPP_BINARY") or str(REPO / ".build" / "debug" / "epp")
    dep = one(deploy_objects, "Deployment", "epp")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    known = set(re.findall(r"(--[a-z0-9-]+)", help_text))
    unknown = [a for a in c["args"] if a.split("=", 1)[0] not in known]
    assert not unknown, f"flags not in epp --help: {unknown}"
    assert "--scrape-model-server-metrics=true" in c["args"]
