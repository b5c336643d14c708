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
# The placeholder every shipped manifest names (kustomization.yaml `images` maps it to the real one).
IMAGE = "registry.example.com/promptfleet:0.1.0"
OPTS = RenderOptions(image=IMAGE)

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
        # libyaml's safe loader when PyYAML has it: the three CRDs are 3.3 MB, ~9 s in pure Python.
        crd = yaml.load((CRDS / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
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
    job = render_rayjob(REPO / "configs" / "quickstart.yaml", opts=OPTS)
    job["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
        validate(job, crd_validators)
    job = render_rayjob(REPO / "configs" / "quickstart.yaml", opts=OPTS)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(AssertionError, match="resource"):
        validate(job, crd_validators)


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda p: p.name)
def test_rendered_rayjob_validates(config, crd_validators):
    job = render_rayjob(config, opts=OPTS)
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
        render_rayjob(outside, opts=OPTS)


def test_shipped_rendered_rayjob_is_up_to_date():
    text = (K8S / "rayjob-quickstart.yaml").read_text()
    source = f"configs/quickstart.yaml --image {IMAGE}"
    assert text == dump(render_rayjob(REPO / "configs" / "quickstart.yaml", opts=OPTS), source), (
        f"regenerate: promptfleet k8s render {source} -o k8s/rayjob-quickstart.yaml"
    )


def test_every_ray_cluster_has_token_auth_and_no_external_head():
    objs = [o for _, o in shipped_objects()] + [render_rayjob(p, opts=OPTS) for p in JOB_CONFIGS]
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
    # The data loader runs once, with its required values filled in, so it is applied on its own too.
    # The 8B tensor-parallel RayService is an alternative to rayservice.yaml (GPU nodes), applied alone.
    unlisted = {"kustomization.yaml", "rayjob-quickstart.yaml", "data-loader-job.yaml", "rayservice-8b.yaml"}
    assert {p.name for p in K8S.glob("*.yaml")} - listed == unlisted
    for gen in kust["configMapGenerator"]:
        for f in gen["files"]:
            json.loads((K8S / f).read_text())


RAYSERVICES = [name for name, o in shipped_objects() if o["kind"] == "RayService"]


@pytest.mark.parametrize("manifest", RAYSERVICES)
def test_rayservice_import_path_builds_the_serve_application(manifest, tmp_path, monkeypatch):
    """Row 3: the import_path named a module attribute that did not exist. Import it and build the
    application the way Serve does (its own builder call), with the manifest's args; the paths
    that live on volumes in the pod point at local stand-ins."""
    import importlib

    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serving.auth import hash_key

    service = next(o for name, o in shipped_objects() if name == manifest and o["kind"] == "RayService")
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
    if obj["kind"] == "Job":  # the data loader
        return [obj["spec"]["template"]["spec"]]
    return [
        group["template"]["spec"]
        for cluster in ray_clusters(obj)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    ]


def test_every_pod_runs_unprivileged():
    objs = [o for _, o in shipped_objects()] + [render_rayjob(p, opts=OPTS) for p in JOB_CONFIGS]
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
    assert _can_connect(policies, "monitoring", prometheus, head, "train-metrics")  # a named port
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


# ---- issue 38: the image as a required value, the baked backbone, volumes an operator can use, recovery


def _containers(obj: dict) -> list[dict]:
    return [c for pod in _pod_specs(obj) for c in pod["containers"]]


def test_render_needs_an_image_said_in_one_line(capsys, monkeypatch):
    from cluster.cli import main as cli_main
    from tuner.config import ConfigError

    with pytest.raises(ConfigError, match="needs --image"):
        render_rayjob(REPO / "configs" / "quickstart.yaml")  # no silent default image
    monkeypatch.delenv("PROMPTFLEET_IMAGE", raising=False)
    assert cli_main(["k8s", "render", str(REPO / "configs" / "quickstart.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("promptfleet: error: k8s render needs --image (or PROMPTFLEET_IMAGE)")
        and "\n" not in err
    )
    assert (
        cli_main(["k8s", "render", str(REPO / "configs" / "quickstart.yaml"), "--image", "Team/pf\u200b"])
        == 2
    )
    assert "'Team/pf\\u200b': not an image reference" in capsys.readouterr().err
    monkeypatch.setenv("PROMPTFLEET_IMAGE", "ghcr.io/team/promptfleet:1.0")
    assert cli_main(["k8s", "render", str(REPO / "configs" / "quickstart.yaml")]) == 0
    assert "image: ghcr.io/team/promptfleet:1.0" in capsys.readouterr().out


def test_every_shipped_image_is_the_placeholder_kustomize_replaces():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (entry,) = kust["images"]
    assert f"{entry['newName']}:{entry['newTag']}" == IMAGE
    assert entry["name"].split("/")[0].endswith("example.com")  # a reserved domain: never a stranger's image
    images = {c["image"] for _, o in shipped_objects() for c in _containers(o)}
    assert images == {IMAGE}


def test_pods_use_the_backbone_baked_into_the_image():
    from cluster.image import Dockerfile
    from cluster.k8s import IMAGE_CACHE

    baked = Dockerfile.read(REPO / "Dockerfile").env["PROMPTFLEET_CACHE"]
    assert baked == IMAGE_CACHE
    containers = [c for _, o in shipped_objects() for c in _containers(o) if o["kind"] in KUBERAY_KINDS]
    containers += [c for p in JOB_CONFIGS for c in _containers(render_rayjob(p, opts=OPTS))]
    assert len(containers) >= 6
    for c in containers:
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["PROMPTFLEET_CACHE"] == baked, c["name"]
        # no volume shadows the image's copy; Hub downloads go to a writable mount
        assert not any(baked.startswith(m["mountPath"]) for m in c["volumeMounts"])
        hf = [m for m in c["volumeMounts"] if env["HF_HOME"].startswith(m["mountPath"] + "/")]
        assert hf and not hf[0].get("readOnly"), c["name"]


def test_volumes_name_a_storage_class_and_the_data_loader_fills_the_data_volume():
    claims = {
        o["metadata"]["name"]: o["spec"] for _, o in shipped_objects() if o["kind"] == "PersistentVolumeClaim"
    }
    assert set(claims) == {"promptfleet-runs", "promptfleet-data"}
    for spec in claims.values():
        assert spec["storageClassName"] and spec["accessModes"] == ["ReadWriteMany"]
    (job,) = [o for _, o in shipped_objects() if o["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    data = next(
        v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "promptfleet-data"
    )
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == data["name"]]
    assert not mount.get("readOnly") and mount["mountPath"] == "/workspace/shared/data"
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["DATA_DIR"] == mount["mountPath"] and env["DATA_URL"] == "" and env["DATA_SHA256"] == ""


def _run_loader(tmp_path, url: str, sha: str, dest):
    import subprocess
    import sys

    (job,) = [o for _, o in shipped_objects() if o["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    env = {"PATH": "/usr/bin:/bin", "DATA_URL": url, "DATA_SHA256": sha, "DATA_DIR": str(dest)}
    return subprocess.run(
        [sys.executable, "-c", container["command"][2]], env=env, capture_output=True, text=True
    )


def test_the_data_loader_checks_the_archive_then_loads_it_once(tmp_path):
    import hashlib
    import tarfile

    src = tmp_path / "src"
    (src / "sst2").mkdir(parents=True)
    (src / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = tmp_path / "volume"
    dest.mkdir()

    refused = _run_loader(tmp_path, archive.as_uri(), "0" * 64, dest)
    assert refused.returncode != 0 and "expected " + "0" * 64 in refused.stderr
    assert list(dest.iterdir()) == []  # nothing unpacked from an archive that is not the one named
    empty = _run_loader(tmp_path, "", "", dest)
    assert empty.returncode != 0 and "set DATA_URL" in empty.stderr

    loaded = _run_loader(tmp_path, archive.as_uri(), sha, dest)
    assert loaded.returncode == 0, loaded.stderr
    assert (dest / "sst2" / "train.tsv").read_text() == "sentence\tlabel\ngood\t1\n"
    assert sorted(p.name for p in dest.iterdir()) == [".promptfleet-data-complete", "sst2"]
    archive.write_bytes(b"changed")  # a second run leaves a loaded volume alone
    again = _run_loader(tmp_path, archive.as_uri(), sha, dest)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_rendered_jobs_restart_lost_workers_from_checkpoints_on_the_shared_volume():
    from cluster.k8s import MAX_FAILURES, RUNS_DIR, TRAIN_STORAGE

    job = render_rayjob(REPO / "configs" / "quickstart.yaml", opts=OPTS)
    args = job["spec"]["entrypoint"].split()
    assert f"cluster.max_failures={MAX_FAILURES}" in args and MAX_FAILURES > 0
    assert f"cluster.storage={TRAIN_STORAGE}" in args and TRAIN_STORAGE.startswith(RUNS_DIR + "/")
    claims = {
        o["metadata"]["name"]: o["spec"] for _, o in shipped_objects() if o["kind"] == "PersistentVolumeClaim"
    }
    for pod in _pod_specs(job):
        runs = next(v for v in pod["volumes"] if v["name"] == "runs")
        assert claims[runs["persistentVolumeClaim"]["claimName"]]["accessModes"] == ["ReadWriteMany"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "runs"]
        assert mount["mountPath"] == RUNS_DIR and not mount.get("readOnly")
    # what the job sets itself is kept, 0 included, and never repeated
    for overrides in (["cluster.max_failures=0"], ["cluster.max_failures=5", "cluster.storage=s3://b/ckpt"]):
        args = render_rayjob(REPO / "configs" / "quickstart.yaml", overrides, OPTS)["spec"][
            "entrypoint"
        ].split()
        for o in overrides:
            assert args.count(o) == 1
        assert sum(a.startswith("cluster.max_failures=") for a in args) == 1
    assert sum(a.startswith("cluster.storage=") for a in args) == 1


def _container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}


def test_training_metrics_are_scraped_on_the_head_only_at_the_port_the_job_serves():
    """Issue 38: only the job's driver serves the training metrics, on the Ray head pod (cluster.launch).
    The monitor that scrapes `train-metrics` selects head pods only (KubeRay labels every pod with
    `ray.io/node-type`), no worker pod declares that port (no target that is down by design), and the
    head's port is the number the entrypoint sets, let through by the NetworkPolicy."""
    monitors = [o for _, o in shipped_objects() if o["kind"] in MONITOR_ENDPOINTS]
    scrapes = [
        (m, e)
        for m in monitors
        for e in m["spec"][MONITOR_ENDPOINTS[m["kind"]]]
        if e["port"] == "train-metrics"
    ]
    ((monitor, endpoint),) = scrapes
    assert monitor["kind"] == "PodMonitor" and endpoint["path"] == "/metrics"
    selector = monitor["spec"]["selector"]
    policies = [o for _, o in shipped_objects() if o["kind"] == "NetworkPolicy"]
    quickstart = REPO / "configs" / "quickstart.yaml"
    rendered = [render_rayjob(p, opts=OPTS) for p in JOB_CONFIGS]
    rendered.append(render_rayjob(quickstart, ["cluster.metrics_port=9555"], OPTS))
    training = [o for _, o in shipped_objects() if o["kind"] in ("RayCluster", "RayJob")] + rendered
    assert len(training) >= 2 + len(JOB_CONFIGS)
    for obj in [o for _, o in shipped_objects()] + rendered:
        for cluster in ray_clusters(obj):
            for group in cluster["workerGroupSpecs"]:
                labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
                assert not _selects(selector, labels), group["groupName"]
                assert "train-metrics" not in _container_ports(group["template"]), group["groupName"]
    for obj in training:
        (cluster,) = ray_clusters(obj)
        head = cluster["headGroupSpec"]["template"]
        labels = {**head["metadata"]["labels"], "ray.io/node-type": "head"}
        assert _selects(selector, labels)
        port = _container_ports(head)["train-metrics"]
        assert _can_connect(policies, "monitoring", {"app": "prometheus"}, labels, "train-metrics")
        if obj["kind"] == "RayJob":  # the driver listens where the head declares the port
            ports = re.findall(r"cluster\.metrics_port=(\d+)", obj["spec"]["entrypoint"])
            assert [int(x) for x in ports] == [port], (ports, port)
    assert (
        _container_ports(rendered[-1]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])["train-metrics"]
        == 9555
    )
