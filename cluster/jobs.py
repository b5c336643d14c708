"""`promptfleet submit` and `promptfleet jobs`: training jobs on a running Ray cluster (Ray Jobs API).

    promptfleet submit configs/quickstart.yaml optim.max_steps=50 --address http://head:8265 [--follow]
    promptfleet jobs list | status ID | logs ID [--follow] | stop ID [--wait]

`submit` checks the job config here (keys, types, task files), then hands Ray's job server an
entrypoint `python -m cluster.cli train <config> <overrides> --address auto` with the project
root as the runtime environment's `working_dir` (uploaded without .venv, runs, .git, caches; for
a remote cluster, with the job's own files that are not in the project, see Paths). Ray's own log
lines while it packages and uploads (a dozen INFO/WARNING lines) are kept off the console.
The job's driver asks for no CPUs of its own (`--entrypoint-num-cpus`, default 0); its Ray Train
workers ask for `cluster.num_workers` x (`cluster.cpus_per_worker` CPUs [+ 1 GPU]). Holding the
workers' CPUs on the driver would starve its own workers, so jobs queue where Ray schedules the
workers: a job whose workers do not fit waits (Ray Train retries the worker group's placement)
until an earlier job frees them.

Paths. A config whose files (the YAML, its task files and their data) all live inside the project
is passed by its path inside the uploaded copy, so it works on any cluster. Otherwise the rule
depends on where the job server is (`submission_paths`):

- a cluster on this machine (loopback address): absolute paths are passed as they are (e.g. data
  in ../shared/data), and a relative `output_dir` is made absolute here (the uploaded copy is
  temporary), unless `cluster.storage` is a shared path, under which the cluster puts it;
- a remote cluster (any other address, or `--remote` / `--cluster-root` for a tunnelled one such as
  `kubectl port-forward`): the job names no path of this machine. Each file (config, task file,
  data, local backbone, prompt.init_from) is read where the cluster has it: mapped by
  `cluster.path_map`, inside the uploaded project, under `cluster.storage` (a path mounted on every
  node), or beside the project on the cluster (`--cluster-root`); job and task YAMLs and small data
  files only this machine has are uploaded with the job (`cluster.remote_paths`). Anything else is
  refused with one line naming the file and how to fix it. A relative `output_dir` stays relative:
  the cluster puts it under `cluster.storage`; an absolute one must be mapped or on the storage.

Auth. Ray 2.60 clusters use token authentication by default; the token is sent as a bearer
header (see `auth_headers`): `--token`, `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or for a cluster
on this machine ~/.ray/auth_token.

This module does not start or size clusters (`cluster.k8s` renders KubeRay manifests) and does
not run training itself (`cluster.launch`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.auth import is_local_address, ray_auth_token
from cluster.remote_paths import EXCLUDES, ClusterView, job_files, plan_remote, stage_upload
from cluster.storage import cluster_output_dir, storage_path
from tuner.config import ConfigError, JobConfig, load_job_config

# `promptfleet train` sets these through ray.init(runtime_env=...); Ray refuses a job env that sets them too.
TRAIN_ENV_VARS = {"TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(ConfigError):
    """A problem with what the user asked of the job server (unknown job, unreachable address)."""


def project_root() -> Path:
    """The directory holding `tuner/`, `cluster/` and `configs/`: what a job uploads."""
    return Path(__file__).resolve().parents[1]


@dataclass
class Submission:
    """Everything `JobSubmissionClient.submit_job` gets for one training job."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    entrypoint_num_cpus: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the user should know (paths on the cluster)
    staging: Path | None = None  # the working dir built for this job (project links + job files), if any

    def discard(self) -> None:
        """Remove the staged working dir (once Ray has uploaded it, or if the job is not submitted)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


@dataclass
class SubmissionPaths:
    """How a job's paths reach the cluster: the config's path there, extra overrides, notes for the user,
    and the job's own files to upload beside the project (a remote cluster, `cluster.remote_paths`)."""

    config_arg: str
    overrides: list[str]
    notes: list[str]
    uploads: dict[str, Path | str] = field(default_factory=dict)


def submission_paths(
    config: Path,
    overrides: list[str],
    cfg: JobConfig,
    root: Path,
    remote: bool,
    cluster_root: str | None = None,
) -> SubmissionPaths:
    """Apply the path rule of the module docstring; `ConfigError` names a path a remote cluster cannot see."""
    storage = cfg.cluster.storage
    shared = storage_path(storage) if storage else None
    if remote:
        plan = plan_remote(config, overrides, cfg, root, cluster_root)
        config_arg, extra, notes = plan.config_arg, plan.overrides, plan.notes
        view = ClusterView.for_job(config, cfg, root, cluster_root)
    else:
        files = job_files(config, overrides, cfg)
        extra, notes, view = [], [], None
        if all(_inside(f.path, root) for f in files):
            config_arg = config.resolve().relative_to(root).as_posix()
        else:
            config_arg = str(config.resolve())
            notes.append(
                f"the config or its data lie outside {root}: the cluster reads {config_arg} and its "
                "data at these absolute paths"
            )
    out = Path(cfg.output_dir).expanduser()
    mapped = view.mapped(out) if view is not None and out.is_absolute() else None
    if mapped is not None:
        extra.append(f"output_dir={mapped}")
        notes.append(f"outputs go to {mapped}/{cfg.name} on the cluster")
    elif out.is_absolute():
        if remote and shared is not None and not _inside(out, shared):
            raise ConfigError(
                f"output_dir {out} is on this machine only, the cluster cannot write it: map it "
                f"(cluster.path_map={{{out}: <path on the cluster>}}), or name a path under "
                f"cluster.storage={shared}, or a relative one (it lies under the storage)"
            )
        if remote and shared is None:
            notes.append(f"outputs go to {out}/{cfg.name} on the filesystem of the cluster's rank-0 node")
    elif shared is not None:  # the cluster's driver puts it under the shared storage
        notes.append(f"outputs go to {cluster_output_dir(cfg.output_dir, storage)}/{cfg.name}")
    elif remote:
        raise ConfigError(
            f"output_dir={cfg.output_dir} is relative and a remote cluster has no place for it: set "
            "cluster.storage=<path mounted on every node> (outputs go under it) or an absolute output_dir"
        )
    else:
        extra.append(f"output_dir={out.resolve()}")
        notes.append(f"outputs go to {out.resolve()}/{cfg.name} on the cluster's filesystem")
    init_from = Path(cfg.prompt.init_from).expanduser()
    if not remote and cfg.prompt.init_from and not init_from.is_absolute():  # the working dir is the upload
        extra.append(f"prompt.init_from={init_from.resolve()}")
    return SubmissionPaths(config_arg, extra, notes, plan.uploads if remote else {})


def build_submission(
    config: str | os.PathLike,
    overrides: list[str],
    *,
    root: Path | None = None,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float = 0.0,
    remote: bool = False,
    cluster_root: str | None = None,
) -> Submission:
    """Check the job config and turn it into a Ray job (entrypoint, runtime env, metadata).

    `remote`: the job server is on another machine, so the job's paths are mapped, uploaded or
    refused (see `submission_paths`); `cluster_root`: where the project lives on that cluster. The
    caller submits the result with `submit` (which removes its staged working dir) or `discard`s it.
    """
    root = (root or project_root()).resolve()
    config = Path(config)
    cfg = load_job_config(config, overrides)  # strict keys and types, task files exist
    clash = sorted(TRAIN_ENV_VARS & set(env or {}))
    if clash:
        raise ConfigError(f"--env {clash[0]} is set by `promptfleet train` itself; leave it out")
    paths = submission_paths(config, overrides, cfg, root, remote, cluster_root)
    config_arg, overrides, notes = paths.config_arg, [*overrides, *paths.overrides], paths.notes
    staging = stage_upload(root, paths.uploads) if paths.uploads else None
    runtime_env: dict = {"working_dir": str(staging or root), "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = dict(env)
    c = cfg.cluster
    entrypoint = shlex.join(
        ["python", "-m", "cluster.cli", "train", config_arg, *overrides, "--address", "auto"]
    )
    metadata = {
        "promptfleet_job": cfg.name,
        "config": config_arg,
        "num_workers": str(c.num_workers),
        "cpus_per_worker": str(c.cpus_per_worker),
        "use_gpu": str(c.use_gpu).lower(),
    }
    sid = submission_id or f"promptfleet-{cfg.name}-{uuid.uuid4().hex[:8]}"
    return Submission(sid, entrypoint, runtime_env, metadata, entrypoint_num_cpus, notes, staging)


# ---------------------------------------------------------------------------------------- client


def auth_headers(token: str | None = None, address: str = "") -> dict[str, str]:
    """Bearer header for Ray token auth ({} when no token is known): the token `cluster.auth.ray_auth_token`
    finds (`token`, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token for a cluster on this machine),
    the same one `promptfleet train --address` joins with."""
    token = ray_auth_token(token, address)
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_server_address(address: str | None = None) -> str:
    """`address`, else RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, or the local head's job server."""
    return (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or _http_address(os.environ.get("RAY_ADDRESS"))
        or DEFAULT_ADDRESS
    )


def connect(address: str | None = None, token: str | None = None):
    """A `JobSubmissionClient` for `address` (default: see `job_server_address`)."""
    from ray.job_submission import JobSubmissionClient

    address = job_server_address(address)
    try:
        return JobSubmissionClient(address, headers=auth_headers(token, address))
    except ConnectionError as e:
        raise JobsError(f"cannot reach the Ray job server at {address}: {_last_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - ray.exceptions.AuthenticationError, without importing ray early
        if type(e).__name__ == "AuthenticationError":
            raise JobsError(_auth_message(e)) from None
        raise


def _http_address(address: str | None) -> str | None:
    return address if address and address.startswith(("http://", "https://")) else None


def _last_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def _auth_message(e: BaseException) -> str:
    return (
        f"the job server refused the request ({str(e).splitlines()[0]}); pass --token or set RAY_AUTH_TOKEN"
    )


def _call(fn, *args, **kwargs):
    """Run one client call, turning 'no such job' and auth failures into one-line user errors."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        text = str(e)
        if "404" in text or "does not exist" in text:
            what = f"job {args[0]!r}" if args else "such job"
            raise JobsError(f"no {what} on this cluster (see `promptfleet jobs list`)") from None
        raise
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "AuthenticationError":
            raise JobsError(_auth_message(e)) from None
        raise


def follow_logs(client, job_id: str, out=None) -> str:
    """Stream a job's logs to `out` until it ends; returns its final status."""
    out = out or sys.stdout
    _call(client.get_job_status, job_id)  # unknown ids fail here with a clear message

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with _quiet_ray_client():  # (its "WebSocket closed" INFO line at the end)
        asyncio.run(tail())
    return wait_for(client, job_id)


def wait_for(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or `timeout_s` passes); returns the status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(_call(client.get_job_status, job_id))
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


@contextlib.contextmanager
def _quiet_ray_client():
    """Ray's logger at ERROR for the block: packaging the working dir logs a dozen INFO/WARNING lines
    (each .gitignore it honours, the default excludes, the upload) that say nothing the user asked."""
    names = ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]
    loggers = [logging.getLogger(n) for n in names]
    loggers = [x for x in loggers if x.name == "ray" or x.level != logging.NOTSET]  # with their own level
    levels = [x.level for x in loggers]
    for x in loggers:
        x.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for x, level in zip(loggers, levels):
            x.setLevel(level)


def submit(client, sub: Submission, agent_wait_s: float = 60.0) -> str:
    """Submit `sub`; returns the job id. Retries while the head's job agent is still starting. The
    staged working dir (if any) is uploaded by then, and removed."""
    deadline = time.monotonic() + agent_wait_s
    try:
        while True:
            try:
                with _quiet_ray_client():
                    return _call(
                        client.submit_job,
                        entrypoint=sub.entrypoint,
                        runtime_env=sub.runtime_env,
                        metadata=sub.metadata,
                        submission_id=sub.submission_id,
                        entrypoint_num_cpus=sub.entrypoint_num_cpus,
                    )
            except RuntimeError as e:
                # A freshly started head answers 500 "No available agent" for a few seconds.
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    finally:
        sub.discard()


# ---------------------------------------------------------------------------------------- commands


def _submit(args: argparse.Namespace) -> int:
    env = dict(_key_value(x, "--env") for x in args.env)
    sub = build_submission(
        args.config,
        args.overrides,
        env=env,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        remote=bool(args.remote or args.cluster_root)
        or not is_local_address(job_server_address(args.address)),
        cluster_root=args.cluster_root,
    )
    try:
        client = connect(args.address, args.token)
        job_id = submit(client, sub)
    finally:
        sub.discard()
    for note in sub.notes:
        print(f"note: {note}", file=sys.stderr)
    print(job_id)
    if not args.follow:
        print(f"follow it with: promptfleet jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    return _exit_code(follow_logs(client, job_id), job_id)


def _list(args: argparse.Namespace) -> int:
    client = connect(args.address, args.token)
    jobs = sorted(_call(client.list_jobs), key=lambda j: j.start_time or 0)
    print(f"{'ID':<40} {'STATUS':<10} {'JOB':<20} ENTRYPOINT")
    for j in jobs:
        name = (j.metadata or {}).get("promptfleet_job", "-")
        print(f"{j.submission_id or j.job_id:<40} {j.status!s:<10} {name:<20} {j.entrypoint}")
    return 0


def _status(args: argparse.Namespace) -> int:
    info = _call(connect(args.address, args.token).get_job_info, args.job_id)
    print(f"{info.status}: {info.message or ''}".rstrip(": "))
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = connect(args.address, args.token)
    if args.follow:
        return _exit_code(follow_logs(client, args.job_id), args.job_id)
    sys.stdout.write(_call(client.get_job_logs, args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    client = connect(args.address, args.token)
    stopped = _call(client.stop_job, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    if args.wait:
        print(f"{args.job_id}: {wait_for(client, args.job_id, timeout_s=args.timeout)}")
    return 0


def _exit_code(status: str, job_id: str) -> int:
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _key_value(item: str, flag: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"{flag} {item!r} must look like KEY=VALUE")
    key, value = item.split("=", 1)
    return key, value


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help=f"Ray job server (dashboard) URL; default RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS}",
    )
    p.add_argument(
        "--token", default=None, help="Ray auth token (default: RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)"
    )


def register(subparsers) -> None:
    """Add `submit` and `jobs list|status|logs|stop` to the `promptfleet` parser."""
    p = subparsers.add_parser(
        "submit",
        help="submit a training job to a Ray cluster (Ray Jobs API)",
        description="Submit `promptfleet train CONFIG OVERRIDES` as a Ray job; the project "
        "directory is uploaded as its working_dir. Prints the job id.",
    )
    p.add_argument("config", help="job YAML, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.max_steps=20")
    _client_flags(p)
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job succeeds")
    p.add_argument(
        "--submission-id", default=None, help="job id to use (default promptfleet-<name>-<random>)"
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job"
    )
    p.add_argument(
        "--remote",
        action="store_true",
        help="the cluster is another machine although its address is local (kubectl port-forward, an SSH "
        "tunnel): map, upload or refuse this machine's paths as for any remote cluster",
    )
    p.add_argument(
        "--cluster-root",
        default=None,
        metavar="DIR",
        help="where the project lives on the cluster (e.g. /workspace/promptfleet in the image): files beside "
        "the project here (../shared/data) are read at the same place beside DIR (implies --remote)",
    )
    p.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=0.0,
        help="CPUs reserved for the driver (default 0: the workers request their own)",
    )
    p.set_defaults(func=_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="all jobs on the cluster")
    _client_flags(p)
    p.set_defaults(func=_list)
    for name, func, doc in (
        ("status", _status, "a job's status and message"),
        ("logs", _logs, "a job's driver logs"),
        ("stop", _stop, "stop a running job"),
    ):
        p = sub.add_parser(name, help=doc)
        p.add_argument("job_id", help="submission id printed by `promptfleet submit`")
        _client_flags(p)
        if name == "logs":
            p.add_argument(
                "--follow", action="store_true", help="stream until the job ends; exit 0 only on success"
            )
        if name == "stop":
            p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
            p.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits at most")
        p.set_defaults(func=func)
