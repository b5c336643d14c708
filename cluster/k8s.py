"""`promptfleet k8s render`: the KubeRay `RayJob` that runs one job config on Kubernetes.

    promptfleet k8s render configs/quickstart.yaml [key=value ...] --image IMG [--output FILE]

The RayJob brings up its own Ray cluster (token auth on, head reachable only inside the cluster),
runs `promptfleet train <config> <overrides> --address auto` on it and tears it down when the job
ends. Its worker group follows the job's `cluster` section: `num_workers` pods, each with
`cpus_per_worker` CPUs and one GPU when `use_gpu`.

The image is a required value (`--image` or PROMPTFLEET_IMAGE): the one built from the Dockerfile and
pushed to your registry. It holds the project at PROJECT_DIR and the converted embedded backbone at
IMAGE_CACHE (the Dockerfile's PROMPTFLEET_CACHE). Two volumes hold the rest: the task data (read-only,
at the `../shared/data` place the shipped task files expect; `k8s/data-loader-job.yaml` fills it) and
the runs volume (ReadWriteMany: output_dir, and Ray Train's checkpoints under TRAIN_STORAGE, which
every pod mounts, so a replacement worker group resumes from them). What a cluster needs and a laptop
does not is added to the entrypoint unless the job sets it: `cluster.storage` (TRAIN_STORAGE),
`cluster.max_failures` (MAX_FAILURES worker-group restarts inside the RayJob before its whole-cluster
retry, `backoffLimit`) and `cluster.metrics_port` (METRICS_PORT). Training metrics are served by the
job's driver, which runs on the head pod, on that port: the head's `train-metrics` container port,
which the head-only PodMonitor in `k8s/monitoring.yaml` scrapes (worker pods serve none).

It does not apply anything to a cluster (`kubectl apply -f`), nor write the shared objects
(volumes, RayCluster, RayService, monitors: see `k8s/`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.jobs import project_root
from tuner.config import ConfigError, JobConfig, load_job_config, read_yaml
from tuner.schema import shown

PROJECT_DIR = "/workspace/promptfleet"  # the image's copy of this repository (its WORKDIR)
DATA_DIR = "/workspace/shared/data"  # where `configs/tasks/*.yaml` find `../../../shared/data`
RUNS_DIR = "/workspace/runs"  # output_dir: adapters, summaries (the ReadWriteMany runs volume)
TRAIN_STORAGE = f"{RUNS_DIR}/ray-train"  # cluster.storage: Ray Train's checkpoints, seen by every pod
IMAGE_CACHE = "/opt/promptfleet/cache"  # the Dockerfile's PROMPTFLEET_CACHE: the backbone baked in
HF_HOME = f"{RUNS_DIR}/.cache/huggingface"  # Hub backbones download once, onto the shared volume
METRICS_PORT = 9400
MAX_FAILURES = 3  # a lost pod restarts the worker group (from the last checkpoint) up to this often
RAY_VERSION = "2.60.0"
LABELS = {"app.kubernetes.io/part-of": "promptfleet"}
IMAGE_ENV = "PROMPTFLEET_IMAGE"
# A pullable image reference: [host[:port]/]path[:tag][@digest], path components lowercase.
_IMAGE_REF = re.compile(
    r"^(?:(?:[a-zA-Z0-9-]+\.)+[a-zA-Z0-9-]+(?::[0-9]+)?/|[a-zA-Z0-9-]+:[0-9]+/|localhost/)?"
    r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


def check_image(image: str) -> str:
    """`image` if it is a pullable reference; a one-line ConfigError if it is missing or malformed."""
    if not image:
        raise ConfigError(
            f"k8s render needs --image (or {IMAGE_ENV}): the image built from the Dockerfile and pushed "
            "to your registry, e.g. registry.example.com/team/promptfleet:0.1.0"
        )
    if not _IMAGE_REF.match(image):
        raise ConfigError(
            f"--image {shown(image)}: not an image reference ([registry/]name[:tag], lowercase)"
        )
    return image


@dataclass
class RenderOptions:
    """Deployment choices that are not part of the job config."""

    image: str = ""  # required: the registry's name for the Dockerfile's image (check_image)
    namespace: str = "promptfleet"
    runs_claim: str = "promptfleet-runs"
    data_claim: str = "promptfleet-data"
    worker_memory: str = "8Gi"
    head_memory: str = "4Gi"
    ttl_seconds: int = 3600
    backoff_limit: int = 1
    max_failures: int = MAX_FAILURES  # cluster.max_failures unless the job sets it


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
        # The embedded backbone is converted in the image (read-only here): no pod converts it.
        "env": [
            {"name": "PROMPTFLEET_CACHE", "value": IMAGE_CACHE},
            {"name": "HF_HOME", "value": HF_HOME},
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
        {"name": "train-metrics", "containerPort": metrics_port},  # the driver's (cluster.launch)
    ]
    worker_ports = [{"name": "metrics", "containerPort": 8080}]
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
    check_image(opts.image)
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
    for key, value in (("storage", TRAIN_STORAGE), ("max_failures", opts.max_failures)):
        if not _job_sets(path, overrides, "cluster", key):  # a value the job sets, 0 included, is kept
            train_args.append(f"cluster.{key}={value}")
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
            # Whole-cluster retries, after Ray Train's in-cluster worker-group restarts (cluster.max_failures).
            "backoffLimit": opts.backoff_limit,
            "rayClusterSpec": ray_cluster_spec(cfg, opts, metrics_port),
        },
    }


def _job_sets(path: Path, overrides: list[str], section: str, key: str) -> bool:
    """Whether the job YAML at `path` or an override sets `section.key` (a value of 0 included)."""
    if any(o.partition("=")[0].strip() == f"{section}.{key}" for o in overrides):
        return True
    return key in (read_yaml(path).get(section) or {})


def dump(manifest: dict, source: str) -> str:
    header = f"# Rendered by `promptfleet k8s render {source}`; edit the job config, not this file.\n"
    return header + yaml.safe_dump(manifest, sort_keys=False, width=120)


def _render(args: argparse.Namespace) -> int:
    opts = RenderOptions(image=args.image, namespace=args.namespace, max_failures=args.max_failures)
    source = shlex.join([args.config, *args.overrides, "--image", args.image])
    text = dump(render_rayjob(args.config, args.overrides, opts), source)
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
        "--image",
        default=os.environ.get(IMAGE_ENV, ""),
        help=f"required (or {IMAGE_ENV}): the image built from the Dockerfile, with its registry",
    )
    p.add_argument("--namespace", default=defaults.namespace, help="namespace of the RayJob")
    p.add_argument(
        "--max-failures",
        type=int,
        default=defaults.max_failures,
        help="cluster.max_failures when the job does not set it: worker-group restarts after a lost pod "
        f"(default {defaults.max_failures})",
    )
    p.add_argument("--output", "-o", default=None, help="write here instead of stdout")
    p.set_defaults(func=_render)
