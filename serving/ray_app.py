"""The same API and engine as a Ray Serve application (`promptfleet serve --ray`).

Each replica holds one backbone (one `Engine`) and every task prompt of the store, and serves the
FastAPI app of `serving.api` through `@serve.ingress`. Requests for different tasks reach the same
replica and are batched together by our scheduler inside it; this is deliberately not Serve's model
multiplexing, which would pin tasks to replicas and never mix them in a batch. Replicas scale with
`autoscaling_config` from `ServerConfig.ray`.

With `engine.tensor_parallel: N` a replica is N ranks: the deployment asks for a placement group of
N bundles (`replica_bundles`: one GPU each on GPUs, STRICT_PACK on one node), the replica's actor
is rank 0 in bundle 0 and starts ranks 1..N-1 as `RankActor`s in bundles 1..N-1. Autoscaling counts
replicas, each of N ranks. A replica that lost a rank fails Serve's health check (`check_health`),
so Serve replaces it, ranks and all.

`app` is the application builder a Serve config names (`import_path: serving.ray_app:app`, as in
k8s/rayservice.yaml): Serve calls it with the config's `args` ({config, prompt_store, overrides}).

This module does not parse the command line (`serving.cli` does). The prompt store (and nothing
else) must be readable at the same path on every node; keys are checked on the driver and the
parsed key ring travels to the replicas, so the tenants file need not.
"""

from __future__ import annotations

import logging
import os

from ray import serve

from serving.api import create_app
from serving.auth import KeyRing
from serving.config import ServerConfig

log = logging.getLogger(__name__)


@serve.ingress()
class PromptfleetReplica:
    """One Serve replica: builds its engine and app at replica start (the app's lifespan starts the engine)."""

    def __init__(self, config: ServerConfig, keyring: KeyRing):
        self._config, self._keyring = config, keyring
        self._engine = None

    def __serve_build_asgi_app__(self):
        from serving.engine import Engine

        start = None
        if self._config.engine.tensor_parallel > 1:
            import functools

            import ray

            from serving.tp_worker import start_ranks

            start = functools.partial(
                start_ranks, launch=launch_rank_actors, host=ray.util.get_node_ip_address()
            )
        self._engine = Engine(self._config.engine, start_ranks=start)
        return create_app(self._engine, self._config, self._keyring)

    def check_health(self) -> None:
        """Serve's health check: a replica that lost a rank is replaced."""
        if self._engine is not None and self._engine.failure is not None:
            raise RuntimeError(f"tensor-parallel replica failed: {self._engine.failure}")


def replica_bundles(config: ServerConfig) -> list[dict[str, float]]:
    """The placement group of one replica: a bundle per rank (bundle 0 is the replica's own actor)."""
    bundle = {"CPU": config.ray.num_cpus}
    if config.ray.num_gpus:
        bundle["GPU"] = config.ray.num_gpus
    return [dict(bundle) for _ in range(config.engine.tensor_parallel)]


def build_application(config: ServerConfig, keyring: KeyRing) -> serve.Application:
    """The bound Serve application: one deployment, autoscaled, one backbone per replica (N ranks)."""
    options = {}
    if config.engine.tensor_parallel > 1:
        options = {
            "placement_group_bundles": replica_bundles(config),
            "placement_group_strategy": "STRICT_PACK",
        }
    deployment = serve.deployment(
        name="promptfleet",
        autoscaling_config=config.ray.autoscaling_config(),
        max_ongoing_requests=config.ray.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ray.num_cpus, "num_gpus": config.ray.num_gpus},
        **options,
    )(PromptfleetReplica)
    return deployment.bind(config, keyring)


class RankActor:
    """Rank r (> 0) of a replica, in bundle r of the replica's placement group."""

    def run(self, config, spec, rank: int) -> int:
        from serving.tp_worker import run_rank

        return run_rank(config, spec, rank)


def launch_rank_actors(config, spec):
    """`serving.tp_worker.Launcher` on Ray: ranks 1..N-1 as actors in this replica's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from serving.tp_worker import STOP_JOIN_S

    pg = ray.util.get_current_placement_group()
    if pg is None:
        raise RuntimeError("engine.tensor_parallel > 1 on Ray needs the replica's placement group")
    actor = ray.remote(RankActor)
    gpus = 1 if spec.device.startswith("cuda") else 0
    ranks, runs = [], []
    for r in range(1, spec.world):
        a = actor.options(
            num_cpus=0,  # the bundle holds the rank's CPUs for it; the actor may use them
            num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote()
        ranks.append(a)
        runs.append(a.run.remote(config, spec, r))

    def stop_ranks(failed: bool) -> None:
        if not failed:
            try:
                ray.get(runs, timeout=STOP_JOIN_S)
            except Exception:  # noqa: BLE001 - a rank that does not end in time is killed below
                pass
        for a in ranks:
            ray.kill(a)

    return stop_ranks, []


def app(args: dict) -> serve.Application:
    """The Serve application builder for a Serve config file / RayService `serveConfigV2`.

    Args:
        args: `config` (a serving YAML, optional), `prompt_store` (optional, overrides the
            config's), `overrides` (a list of `key=value`, e.g. `api.auth=/secrets/tenants.yaml`).
    """
    import dataclasses

    from serving.auth import load_keyring
    from serving.config import load_server_config
    from tuner.schema import ConfigError

    unknown = sorted(set(args) - {"config", "prompt_store", "overrides"})
    if unknown:
        raise ConfigError(f"serving.ray_app:app: unknown args {unknown} (config, prompt_store, overrides)")
    config = load_server_config(args.get("config"), list(args.get("overrides") or []))
    if args.get("prompt_store"):
        config.engine = dataclasses.replace(config.engine, prompt_store=str(args["prompt_store"]))
    return build_application(config, load_keyring(config.api.auth))


# Serve's controller gives a starting proxy 5 s to answer its readiness check and kills it after three
# misses, and `serve.start` then fails; a proxy process starting on a busy 2-core node takes longer (seen
# at load average 3: all three missed). 60 s: as long as `serve.start` itself waits for its proxies.
# tests/distributed/test_serving_ray.py starts the proxy 30 s late on purpose (tests/distributed/slow_proxy).
SERVE_CONTROLLER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def run_on_ray(config: ServerConfig, keyring: KeyRing, blocking: bool = True) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on api.host:api.port and deploy the application."""
    import ray

    # No address: a new local Ray ("local"), never Ray's default of joining whatever cluster `ray start` last
    # started on this machine (as `promptfleet train` does, `cluster.launch.init_ray`).
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, ignore_reinit_error=True)
    # Serve's own proxy (not our uvicorn) takes the connections here: give it the same keep-alive bound, and
    # an end-to-end bound a little above the engine's request timeout. Body size and write limits, and the
    # per-tenant quotas, come with the application (its middleware and engine) either way.
    serve.start(
        http_options={
            "host": config.api.host,
            "port": config.api.port,
            "keep_alive_timeout_s": max(1, int(config.api.timeout_keep_alive_s)),
            "request_timeout_s": config.engine.request_timeout_s + config.api.write_timeout_s,
        },
        controller_options={"runtime_env": {"env_vars": SERVE_CONTROLLER_ENV}},
    )
    log.info(
        "deploying %s on Ray Serve at http://%s:%d%s",
        config.ray.app_name,
        config.api.host,
        config.api.port,
        config.ray.route_prefix,
    )
    serve.run(
        build_application(config, keyring),
        name=config.ray.app_name,
        route_prefix=config.ray.route_prefix,
        blocking=blocking,
    )
