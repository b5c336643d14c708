"""Every manifest in k8s/ (and the RayJob rendered for every shipped job config) against real schemas.

KubeRay objects: the v1 openAPIV3Schema of the KubeRay v1.7.0 CRDs in ../shared/kuberay-crds, made
strict (unknown fields are errors, as with `kubectl apply --validate=strict`; the API server would
silently drop them). Core objects: kubernetes-validate's bundled schemas (offline), strict.
PodMonitor / ServiceMonitor (prometheus-operator CRDs, not available offline): their required
structure. Plus the properties the design promises: token auth, ClusterIP-only heads, dashboard
series that exist in the code.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.k8s import RenderOptions, dump, render_rayjob

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "kuberay-crds"
JOB_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")

# prometheus-operator's required structure for the fields we use.
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
        "authorization": {  # prometheus-operator's SafeAuthorization: a key from a Secret
            "type": "object",
            "required": ["credentials"],
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "credentials": {
                    "type": "object",
                    "required": ["name", "key"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                },
            },
        },
    },
}
MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
                },
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        },
    },
}
MONITOR_ENDPOINTS = {"PodMonitor": "podMetricsEndpoints", "ServiceMonitor": "endpoints"}


def _strict(schema: dict) -> dict:
    """Forbid properties a structural schema does not declare (the API server would prune them)."""
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            if isinstance(value, (dict, list)):
                _strict(value)
    elif isinstance(schema, list):
        for item in schema:
            _strict(item)
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for kind, file in zip(
        KUBERAY_KINDS, ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
    ):
        crd = yaml.safe_load((CRDS / file).read_text())
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft7Validator(_strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"])))
    return out


def shipped_objects() -> list[tuple[str, dict]]:
    objs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objs += [(path.name, o) for o in yaml.safe_load_all(path.read_text()) if o]
    return objs


def validate(obj: dict, crd_validators) -> None:
    kind = obj["kind"]
    if kind in KUBERAY_KINDS:
        assert obj["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validators[kind].iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
        )
    elif kind in MONITOR_ENDPOINTS:
        jsonschema.validate(obj, MONITOR_SCHEMA)
        assert MONITOR_ENDPOINTS[kind] in obj["spec"]
    else:
        kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)


def ray_clusters(obj: dict) -> list[dict]:
    """The RayCluster specs inside a KubeRay object."""
    spec = obj.get("spec", {})
    return {
        "RayCluster": [spec],
        "RayJob": [spec.get("rayClusterSpec")],
        "RayService": [spec.get("rayClusterConfig")],
    }.get(obj["kind"], [])


@pytest.mark.parametrize("name,obj", shipped_objects(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_shipped_manifest_validates(name, obj, crd_validators):
    validate(obj, crd_validators)


def test_a_strict_schema_catches_typos(crd_validators):
    """Guard for the checker itself: a misspelt field must fail (the API server would drop it)."""
    job = render_rayjob(REPO / "configs" / "quickstart.yaml")
    job["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
        validate(job, crd_validators)
    job = render_rayjob(REPO / "configs" / "quickstart.yaml")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(AssertionError, match="resource"):
        validate(job, crd_validators)


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda p: p.name)
def test_rendered_rayjob_validates(config, crd_validators):
    job = render_rayjob(config)
    validate(job, crd_validators)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["entrypoint"].startswith(f"promptfleet train configs/{config.name} ")
    assert spec["entrypoint"].endswith("--address auto")


def test_render_follows_the_cluster_section(crd_validators):
    job = render_rayjob(
        REPO / "configs" / "quickstart.yaml",
        ["cluster.num_workers=3", "cluster.cpus_per_worker=4", "cluster.use_gpu=true"],
        RenderOptions(image="registry.example/promptfleet:1.2"),
    )
    validate(job, crd_validators)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert group["rayStartParams"] == {"num-cpus": "4", "num-gpus": "1"}
    (container,) = group["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/promptfleet:1.2"
    assert (
        container["resources"]["limits"]["cpu"] == "4"
        and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    )
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in group["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"promptfleet-runs", "promptfleet-data"}
    assert "output_dir=/workspace/runs" in job["spec"]["entrypoint"]
    assert "cluster.num_workers=3" in job["spec"]["entrypoint"]


def test_render_rejects_configs_outside_the_project(tmp_path):
    from tuner.config import ConfigError

    outside = tmp_path / "job.yaml"
    outside.write_text((REPO / "configs" / "quickstart.yaml").read_text())
    with pytest.raises(ConfigError, match="inside the project"):
        render_rayjob(outside)


def test_shipped_rendered_rayjob_is_up_to_date():
    text = (K8S / "rayjob-quickstart.yaml").read_text()
    assert text == dump(render_rayjob(REPO / "configs" / "quickstart.yaml"), "configs/quickstart.yaml"), (
        "regenerate: promptfleet k8s render configs/quickstart.yaml -o k8s/rayjob-quickstart.yaml"
    )


def test_every_ray_cluster_has_token_auth_and_no_external_head():
    objs = [o for _, o in shipped_objects()] + [render_rayjob(p) for p in JOB_CONFIGS]
    clusters = [c for o in objs for c in ray_clusters(o)]
    assert len(clusters) >= 3 + len(JOB_CONFIGS)
    for c in clusters:
        assert c["authOptions"] == {"mode": "token"}
        assert c["headGroupSpec"]["serviceType"] == "ClusterIP"
    kinds = {o["kind"] for o in objs}
    assert {"RayCluster", "RayJob", "RayService", "NetworkPolicy", "PodMonitor", "ServiceMonitor"} <= kinds
    raycluster = next(o for o in objs if o["kind"] == "RayCluster")
    assert {g["groupName"] for g in raycluster["spec"]["workerGroupSpecs"]} == {"cpu-workers", "gpu-workers"}


def test_kustomization_lists_existing_files():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert all((K8S / r).is_file() for r in listed)
    # Every shared manifest is applied by the kustomization; rendered RayJobs are applied one by one.
    assert {p.name for p in K8S.glob("*.yaml")} - listed == {"kustomization.yaml", "rayjob-quickstart.yaml"}
    for gen in kust["configMapGenerator"]:
        for f in gen["files"]:
            json.loads((K8S / f).read_text())


def test_rayservice_import_path_builds_the_serve_application(tmp_path, monkeypatch):
    """Row 3: the import_path named a module attribute that did not exist. Import it and build the
    application the way Serve does (its own builder call), with the manifest's args; the paths
    that live on volumes in the pod point at local stand-ins."""
    import importlib

    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serving.auth import hash_key

    service = next(o for _, o in shipped_objects() if o["kind"] == "RayService")
    (spec,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, attr = spec["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)

    (tmp_path / "store").mkdir()
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": {"ops": {"key_sha256": [hash_key("k")], "tasks": "*"}}}))
    local = {
        spec["args"]["prompt_store"]: str(tmp_path / "store"),
        "/workspace/secrets/tenants.yaml": str(tenants),
    }
    args = {
        "config": str(REPO / spec["args"]["config"]),  # workingDir is the project in the pod
        "prompt_store": local[spec["args"]["prompt_store"]],
        "overrides": [
            o.replace("/workspace/secrets/tenants.yaml", str(tenants)) for o in spec["args"]["overrides"]
        ],
    }
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    assert isinstance(app, serve.Application)
    deployment = app._bound_deployment
    config, keyring = deployment.init_args
    assert config.engine.prompt_store == str(tmp_path / "store") and config.api.host == "0.0.0.0"
    assert keyring.authenticate("Bearer k").name == "ops"


def _pod_specs(obj: dict) -> list[dict]:
    return [
        group["template"]["spec"]
        for cluster in ray_clusters(obj)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    ]


def test_every_pod_runs_unprivileged():
    objs = [o for _, o in shipped_objects()] + [render_rayjob(p) for p in JOB_CONFIGS]
    pods = [p for o in objs for p in _pod_specs(o)]
    assert len(pods) >= 5
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert any(v["name"] == tmp["name"] and "emptyDir" in v for v in pod["volumes"])


def test_the_image_runs_as_a_non_root_user():
    users = [
        line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("USER ")
    ]
    assert users and users[-1].split(":")[0] not in ("root", "0")


# ---- NetworkPolicy semantics (a direct reading of the Kubernetes rules, for the cases we rely on)


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In"
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def _peer_matches(peer: dict, ns: str, labels: dict) -> bool:
    ns_labels = {"kubernetes.io/metadata.name": ns}
    if "namespaceSelector" in peer:
        ok = _selects(peer["namespaceSelector"], ns_labels)
    else:
        ok = ns == "promptfleet"  # a podSelector alone selects in the policy's namespace
    return ok and _selects(peer.get("podSelector", {}), labels)


def _rule_allows(rule: dict, side: str, ns: str, labels: dict, port: int) -> bool:
    peers = rule.get(side)
    if peers is not None and not any(_peer_matches(p, ns, labels) for p in peers):
        return False
    return "ports" not in rule or any(p["port"] == port for p in rule["ports"])


def _allowed(policies, direction: str, pod: dict, peer_ns: str, peer: dict, port: int) -> bool:
    side, key = ("from", "ingress") if direction == "Ingress" else ("to", "egress")
    applying = [
        p
        for p in policies
        if _selects(p["spec"]["podSelector"], pod) and direction in p["spec"]["policyTypes"]
    ]
    if not applying:
        return True  # no policy isolates this pod in that direction
    return any(_rule_allows(r, side, peer_ns, peer, port) for p in applying for r in p["spec"].get(key, []))


def _can_connect(policies, src_ns, src, dst, port) -> bool:
    """src (in src_ns) -> dst (in promptfleet) on `port`: the egress of src and the ingress of dst."""
    egress = src_ns != "promptfleet" or _allowed(policies, "Egress", src, "promptfleet", dst, port)
    return egress and _allowed(policies, "Ingress", dst, src_ns, src, port)


def test_network_policies_keep_serving_away_from_the_training_head():
    policies = [o for _, o in shipped_objects() if o["kind"] == "NetworkPolicy"]
    part = {"app.kubernetes.io/part-of": "promptfleet"}
    head, worker = (
        {**part, "app.kubernetes.io/component": "ray-head"},
        {**part, "app.kubernetes.io/component": "training"},
    )
    serving = {**part, "app.kubernetes.io/component": "serving"}
    prometheus, client = {"app": "prometheus"}, {"app": "some-client"}
    for port in (6379, 8265, 10001, 52365, 8080):
        assert not _can_connect(policies, "promptfleet", serving, head, port), port
        assert _can_connect(policies, "promptfleet", worker, head, port), port
        assert _can_connect(policies, "promptfleet", serving, serving, port), port  # its own Ray cluster
    assert not _can_connect(policies, "promptfleet", serving, worker, 9400)
    assert _can_connect(policies, "default", client, serving, 8000)  # the API, behind its keys
    assert not _can_connect(policies, "default", client, serving, 6379)
    assert not _can_connect(policies, "default", client, head, 8265)
    assert _can_connect(policies, "monitoring", prometheus, serving, 8000)
    assert _can_connect(policies, "monitoring", prometheus, worker, 9400)
    assert _can_connect(policies, "kuberay-system", {}, serving, 52365)
    # serving egress: nothing outside its own pods but cluster DNS
    serving_egress = [
        p
        for p in policies
        if _selects(p["spec"]["podSelector"], serving) and "Egress" in p["spec"]["policyTypes"]
    ]
    assert serving_egress
    assert not _allowed(policies, "Egress", serving, "default", {"app": "anything"}, 443)
    assert _allowed(policies, "Egress", serving, "kube-system", {"k8s-app": "kube-dns"}, 53)


def test_serving_metrics_are_scraped_with_a_key():
    monitor = next(
        o
        for _, o in shipped_objects()
        if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "promptfleet-serving"
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"]["name"]
    assert "metrics_public: false" in (REPO / "configs" / "serving" / "default.yaml").read_text()


def _exposed_names(registry) -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + s for f in registry.collect() for s in suffixes.get(f.type, [""])}


def test_dashboard_queries_only_series_the_code_exports():
    from cluster.metrics import TrainingMetrics
    from serving.metrics import ENGINE_SERIES, ApiMetrics

    exported = _exposed_names(TrainingMetrics().registry)
    exported |= _exposed_names(ApiMetrics(lambda: dict.fromkeys(ENGINE_SERIES, 0)).registry)
    dashboard = json.loads((K8S / "grafana" / "promptfleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bpromptfleet_[a-z_]+", e)}
    assert used and used <= exported, sorted(used - exported)
    assert any(m.startswith("promptfleet_train_") for m in used) and "promptfleet_requests_total" in used
