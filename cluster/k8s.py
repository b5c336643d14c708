"""`promptfleet k8s render`: the KubeRay `RayJob` that runs one job config on Kubernetes.

    promptfleet k8s render configs/quickstart.yaml [key=value ...] [--image IMG] [--output FILE]

The RayJob brings up its own Ray cluster (token auth on, head reachable only inside the cluster),
runs `promptfleet train <config> <overrides> --address auto` on it and tears it down when the job
ends. Its worker group follows the job's `cluster` section: `num_workers` pods, each with
`cpus_per_worker` CPUs and one GPU when `use_gpu`. The image holds the project at PROJECT_DIR; two
volumes hold the rest: the task data (read-only, at the `../shared/data` place the shipped task
files expect) and the runs volume (output_dir: checkpoints, adapters, the converted backbone).
Training metrics are exported by rank 0 on `cluster.metrics_port` (METRICS_PORT if unset) as
the `train-metrics` container port that `k8s/podmonitor.yaml` scrapes.

It does not apply anything to a cluster (`kubectl apply -f`), nor write the shared objects
(volumes, RayCluster, RayService, monitors: see `k8s/`).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.jobs import project_root
from tuner.config import ConfigError, JobConfig, load_job_config

PROJECT_DIR = "/workspace/promptfleet"  # the image's copy of this repository (its WORKDIR)
DATA_DIR = "/workspace/shared/data"  # where `configs/tasks/*.yaml` find `../../../shared/data`
RUNS_DIR = "/workspace/runs"  # output_dir: checkpoints, adapters, summaries
METRICS_PORT = 9400
RAY_VERSION = "2.60.0"
LABELS = {"app.kubernetes.io/part-of": "promptfleet"}


@dataclass
class RenderOptions:
    """Deployment choices that are not part of the job config."""

    image: str = "promptfleet:0.1.0"
    namespace: str = "promptfleet"
    runs_claim: str = "promptfleet-runs"
    data_claim: str = "promptfleet-data"
    worker_memory: str = "8Gi"
    head_memory: str = "4Gi"
    ttl_seconds: int = 3600
    backoff_limit: int = 1


def k8s_name(name: str) -> str:
    """A DNS-1123 name from a run name (`multitask_all` -> `promptfleet-multitask-all`)."""
    return ("promptfleet-" + re.sub(r"[^a-z0-9-]+", "-", name.lower())).strip("-")[:63].rstrip("-")


def _volumes(opts: RenderOptions) -> list[dict]:
    return [
        {"name": "runs", "persistentVolumeClaim": {"claimName": opts.runs_claim}},
        {"name": "data", "persistentVolumeClaim": {"claimName": opts.data_claim, "readOnly": True}},
        {"name": "tmp", "emptyDir": {}},  # Ray's session dir: the root filesystem is read-only
    ]


MOUNTS = [
    {"name": "runs", "mountPath": RUNS_DIR},
    {"name": "data", "mountPath": DATA_DIR, "readOnly": True},
    {"name": "tmp", "mountPath": "/tmp"},
]
# The image's non-root `ray` user; no capabilities, no privilege escalation, read-only root fs.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 100,
    "fsGroup": 100,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _pod_spec(container: dict, opts: RenderOptions) -> dict:
    return {
        "automountServiceAccountToken": False,  # Ray pods never talk to the Kubernetes API
        "securityContext": dict(POD_SECURITY),
        "containers": [container],
        "volumes": _volumes(opts),
    }


def _container(name: str, image: str, cpus: int | str, memory: str, gpus: int, ports: list[dict]) -> dict:
    resources = {"cpu": str(cpus), "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": PROJECT_DIR,
        # The converted embedded backbone is cached on the runs volume, so only the first pod converts it.
        "env": [
            {"name": "PROMPTFLEET_CACHE", "value": f"{RUNS_DIR}/.cache/promptfleet"},
            {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        ],
        "ports": ports,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [dict(m) for m in MOUNTS],
        "securityContext": dict(CONTAINER_SECURITY),
    }


def ray_cluster_spec(cfg: JobConfig, opts: RenderOptions, metrics_port: int) -> dict:
    """A RayCluster spec with one worker group sized by `cfg.cluster`."""
    c = cfg.cluster
    head_ports = [
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "metrics", "containerPort": 8080},
    ]
    worker_ports = [
        {"name": "metrics", "containerPort": 8080},
        {"name": "train-metrics", "containerPort": metrics_port},
    ]
    group = "gpu-workers" if c.use_gpu else "cpu-workers"
    worker_params = {"num-cpus": str(c.cpus_per_worker)}
    if c.use_gpu:
        worker_params["num-gpus"] = "1"
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},  # KubeRay creates the token Secret and hands it to every pod
        "headGroupSpec": {
            "serviceType": "ClusterIP",  # the dashboard / Jobs API never leaves the cluster
            # num-cpus 0: the driver and Train controller run here; training ranks only on workers.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {
                "metadata": {"labels": {**LABELS, "app.kubernetes.io/component": "ray-head"}},
                "spec": _pod_spec(
                    _container("ray-head", opts.image, 1, opts.head_memory, 0, head_ports), opts
                ),
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": c.num_workers,
                "minReplicas": c.num_workers,
                "maxReplicas": c.num_workers,
                "rayStartParams": worker_params,
                "template": {
                    "metadata": {"labels": {**LABELS, "app.kubernetes.io/component": "training"}},
                    "spec": _pod_spec(
                        _container(
                            "ray-worker",
                            opts.image,
                            c.cpus_per_worker,
                            opts.worker_memory,
                            1 if c.use_gpu else 0,
                            worker_ports,
                        ),
                        opts,
                    ),
                },
            }
        ],
    }


def render_rayjob(
    config: str | Path, overrides: list[str] | None = None, opts: RenderOptions | None = None
) -> dict:
    """The RayJob manifest (a dict) for job YAML `config` inside the project, with `overrides`."""
    opts = opts or RenderOptions()
    overrides = list(overrides or [])
    root = project_root()
    path = Path(config).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"{config}: k8s render needs a job config inside the project ({root}); the image "
            f"holds the project at {PROJECT_DIR}"
        )
    cfg = load_job_config(path, overrides)
    metrics_port = cfg.cluster.metrics_port or METRICS_PORT
    train_args = [*overrides, f"output_dir={RUNS_DIR}"]
    if not cfg.cluster.metrics_port:
        train_args.append(f"cluster.metrics_port={metrics_port}")
    entrypoint = shlex.join(
        ["promptfleet", "train", path.relative_to(root).as_posix(), *train_args, "--address", "auto"]
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": k8s_name(cfg.name),
            "namespace": opts.namespace,
            "labels": {**LABELS, "app.kubernetes.io/component": "training", "promptfleet/job": cfg.name},
        },
        "spec": {
            "entrypoint": entrypoint,
            # HTTPMode: the operator submits through the head's Jobs API itself (no submitter pod to
            # let through the NetworkPolicy).
            "submissionMode": "HTTPMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.ttl_seconds,
            # Whole-cluster retries on top of Ray Train's in-cluster worker restarts (cluster.max_failures).
            "backoffLimit": opts.backoff_limit,
            "rayClusterSpec": ray_cluster_spec(cfg, opts, metrics_port),
        },
    }


def dump(manifest: dict, source: str) -> str:
    header = f"# Rendered by `promptfleet k8s render {source}`; edit the job config, not this file.\n"
    return header + yaml.safe_dump(manifest, sort_keys=False, width=120)


def _render(args: argparse.Namespace) -> int:
    opts = RenderOptions(image=args.image, namespace=args.namespace)
    text = dump(render_rayjob(args.config, args.overrides, opts), " ".join([args.config, *args.overrides]))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def register(subparsers) -> None:
    """Add `k8s render` to the `promptfleet` parser."""
    k8s = subparsers.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    sub = k8s.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "render",
        help="write the RayJob that trains a job config on Kubernetes",
        description="Render a KubeRay RayJob for a job config: image, one worker pod per rank "
        "(cluster.num_workers x cluster.cpus_per_worker CPUs, a GPU each with "
        "cluster.use_gpu), the runs and data volumes, token auth.",
    )
    p.add_argument("config", help="job YAML inside the project, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides baked into the entrypoint")
    defaults = RenderOptions()
    p.add_argument(
        "--image", default=defaults.image, help=f"container image with the project at {PROJECT_DIR}"
    )
    p.add_argument("--namespace", default=defaults.namespace, help="namespace of the RayJob")
    p.add_argument("--output", "-o", default=None, help="write here instead of stdout")
    p.set_defaults(func=_render)
