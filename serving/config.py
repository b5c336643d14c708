"""Typed serving configuration: one `ServerConfig` that a YAML file maps onto 1:1.

    engine:   the backbone, prompt store, batching and queue limits (`EngineConfig`, read by `serving.engine`)
    api:      HTTP behaviour: auth, metrics exposure, defaults for OpenAI fields
    ray:      the Ray Serve deployment (replicas, autoscaling, resources) used by `promptfleet serve --ray`

`load_server_config(path, overrides)` reads the YAML (or starts from the defaults), applies
`key=value` overrides and rejects unknown keys. A relative `api.auth` path resolves against the
config file's directory. Every section checks its values when it is built, so a bad one is a
one-line `ConfigError` naming its key at load. This module does not read the tenants file or start
anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tuner.model.backbone import DTYPES
from tuner.schema import (
    ConfigError,
    apply_overrides,
    check_choice,
    check_non_negative,
    check_positive,
    documented,
    from_dict,
    read_yaml,
)

AUTH_DISABLED = "none"


@dataclass
class EngineConfig:
    """The engine (`serving.engine.Engine`): backbone, prompt store, batching, queue and limits."""

    backbone: str = documented(
        "smollm2-135m", "Backbone: embedded name, local checkpoint dir or Hub id; adapters must name it."
    )
    prompt_store: str = documented("", "Directory with one PEFT prompt-tuning adapter directory per task.")
    dtype: str = documented(
        "auto", "auto, fp32, bf16 or fp16 (auto: fp32 on CPUs without AMX, bf16 on GPUs)."
    )
    max_batch_size: int = documented(32, "Running requests decoded together in one forward.")
    max_queue: int = documented(256, "Waiting requests before new ones get Overloaded (429).")
    max_prompt_tokens: int = documented(1024, "Longest accepted prompt, in tokens after the task template.")
    max_new_tokens_limit: int = documented(512, "Largest accepted max_tokens.")
    prefix_cache_bytes: int = documented(256 * 2**20, "LRU bound of the task prompt KV cache.")
    prefix_cache: bool = documented(True, "False: recompute each request's prompt KV (for benchmarks).")
    prompt_cache_bytes: int = documented(
        256 * 2**20,
        "LRU bound of the task prompts read into memory (fp32 bytes). The store is indexed at start, "
        "a task's prompt read on its first request and again after eviction; 256 MiB holds about "
        "7,000 SmolLM2 prompts of 16 virtual tokens. 0: none kept (every request reads its prompt).",
    )
    reload_interval_s: float = documented(
        2.0, "How often the prompt store is rescanned for new or changed tasks."
    )
    request_timeout_s: float = documented(60.0, "A request older than this ends with RequestTimeout (503).")
    max_step_tokens: int = documented(
        512,
        "Prefill + decode tokens per engine step; longer prompts are prefilled in chunks. The step in "
        "flight is a newly arrived request's first wait: 512 is about 0.7 s on a 2-core CPU (a tenant "
        "alone with nothing decoding gets alone_step_tokens instead); 4096-8192 on a GPU.",
    )
    alone_step_tokens: int = documented(
        1024,
        "A step's tokens while no row is decoding (a flood of prefills or classifications) and one "
        "tenant has had the engine to itself for 30 s; 0 or less than max_step_tokens: "
        "max_step_tokens. A matrix multiply of 512 rows costs ~13 % more per token than one of 2048 "
        "on a 2-core CPU (1024: ~3 %), so a tenant alone gets the engine's throughput; a tenant "
        "arriving after 30 s of quiet waits for that step first (about 1.3 s at 1024 there). "
        "Running streams always get max_step_tokens steps.",
    )
    shared_step_tokens: int = documented(
        128,
        "While more than one tenant has work (or had some in the last 2 s), the tenants with more "
        "prefill waiting than 4 whole steps share this many prefill tokens per step (0: no cap), so "
        "one tenant's flood of long prompts cannot make every other tenant's steps long; a tenant "
        "whose waiting prompts take fewer steps (a burst of short requests) is not capped. 128 keeps such a step within ~2x a "
        "decode step on a 2-core CPU; on a GPU, where a step's cost hardly grows with its tokens, "
        "1024-2048.",
    )
    threads: int = documented(0, "Torch intra-op threads; 0 leaves torch's default (all cores).")
    device: str = documented("cpu", "cpu or cuda (cuda:N for one GPU of several).")
    prompt_store_symlinks: bool = documented(
        False, "Serve store entries that are symlinks leading outside the store."
    )
    tensor_parallel: int = documented(
        1,
        "Ranks (processes) per replica, each holding 1/N of every layer's heads and MLP columns "
        "(serving.tensor_parallel); N must divide the backbone's attention and KV heads, and on cuda "
        "be at most the GPUs present. 1: one process, no collectives.",
    )
    collective_timeout_s: float = documented(
        30.0,
        "With tensor_parallel > 1: how long any collective (a step plan, a layer's all-reduce) waits "
        "for a rank before the replica fails its requests with 503 and exits.",
    )

    def __post_init__(self) -> None:
        """Refuse a bad value here, at load, in one line naming its key (not at the first request)."""
        if not self.backbone.strip():
            raise ConfigError(
                "engine.backbone is empty: give smollm2-135m, a Hub id or a checkpoint directory"
            )
        check_choice("engine.dtype", self.dtype, ("auto", *DTYPES))
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"engine.device={self.device!r}: expected cpu, cuda or cuda:N")
        for name in (
            "max_batch_size",
            "max_queue",
            "max_prompt_tokens",
            "max_new_tokens_limit",
            "max_step_tokens",
            "reload_interval_s",
            "request_timeout_s",
            "tensor_parallel",
            "collective_timeout_s",
        ):
            check_positive(f"engine.{name}", getattr(self, name))
        check_non_negative("engine.prefix_cache_bytes", self.prefix_cache_bytes)
        check_non_negative("engine.prompt_cache_bytes", self.prompt_cache_bytes)
        check_non_negative("engine.threads", self.threads)
        check_non_negative("engine.shared_step_tokens", self.shared_step_tokens)
        check_non_negative("engine.alone_step_tokens", self.alone_step_tokens)


@dataclass
class ApiConfig:
    host: str = documented("127.0.0.1", "Interface uvicorn binds (0.0.0.0 to listen on all interfaces).")
    port: int = documented(8000, "TCP port of the HTTP server.")
    auth: str = documented(
        "",
        "Tenants file (YAML, hashed API keys) or `none` to disable auth for local development. "
        "Empty is an error: auth is never off by accident.",
    )
    metrics_public: bool = documented(
        False,
        "Serve /metrics without a key. Off by default: then only a tenant with `metrics: true` in the "
        "tenants file may read it. When on, the public page carries no task or tenant names.",
    )
    max_body_bytes: int = documented(1 << 20, "Largest request body; larger (chunked ones too) get 413.")
    max_prompt_chars: int = documented(
        32768, "Longest prompt / input in characters, checked before anything is tokenized (400)."
    )
    timeout_keep_alive_s: float = documented(5.0, "An idle keep-alive connection is closed after this.")
    first_byte_timeout_s: float = documented(
        2.0, "A new connection that has sent nothing by then is closed (before any key is seen)."
    )
    header_timeout_s: float = documented(
        10.0, "A connection whose request headers are not complete by then is closed."
    )
    body_timeout_s: float = documented(10.0, "Longest wait for the next piece of a request body (408 after).")
    body_deadline_s: float = documented(
        30.0, "Longest time a whole request body may take after its headers, however it trickles (408)."
    )
    max_connections: int = documented(
        0,
        "Open connections the server holds; 0: as many as its file-descriptor limit allows, less a "
        "reserve. When full, the connection waiting longest without a request in progress (idle or "
        "still sending headers) is closed for a new one; 503 only if every one has a request.",
    )
    max_connections_per_client: int = documented(
        64,
        "Open connections one client address may hold; more are answered 429 and closed. 0: no cap. "
        "Behind an ingress or proxy every client has the proxy's address: set 0 there and let the "
        "proxy limit each client (k8s/README.md).",
    )
    max_requests_in_flight: int = documented(
        1024,
        "Complete requests (key checked, body received) handled at once; more get 503 + Retry-After. "
        "Open connections do not count.",
    )
    write_timeout_s: float = documented(
        30.0, "Longest wait for a slow reader to take the next streamed chunk; then the stream is ended."
    )
    limit_concurrency: int = documented(
        0,
        "Deprecated, 0 = unset: the old uvicorn limit on connections + requests, which let idle "
        "connections starve requests. A value still loads and sets max_requests_in_flight.",
    )
    default_max_tokens: int = documented(
        16, "max_tokens when a request does not set it (OpenAI's completions default)."
    )
    disconnect_poll_s: float = documented(
        0.0,
        "Deprecated and not read: a non-streaming request now awaits its client's disconnect instead "
        "of polling for it. A value still loads (older configs), and is ignored.",
    )
    log_level: str = documented("info", "uvicorn / promptfleet log level: debug, info, warning or error.")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"api.port={self.port}: must be in 1..65535")
        check_positive("api.default_max_tokens", self.default_max_tokens)
        for name in (
            "max_body_bytes",
            "max_prompt_chars",
            "timeout_keep_alive_s",
            "header_timeout_s",
            "body_timeout_s",
            "body_deadline_s",
            "first_byte_timeout_s",
            "write_timeout_s",
            "max_requests_in_flight",
        ):
            check_positive(f"api.{name}", getattr(self, name))
        for name in ("max_connections", "max_connections_per_client", "limit_concurrency"):
            check_non_negative(f"api.{name}", getattr(self, name))
        check_choice("api.log_level", self.log_level, ("debug", "info", "warning", "error"))
        if self.limit_concurrency:
            if self.max_requests_in_flight not in (1024, self.limit_concurrency):  # both set: ambiguous
                raise ConfigError(
                    "api.limit_concurrency is the deprecated name of api.max_requests_in_flight: set only the latter"
                )
            import logging  # only here: config.py logs nothing else

            logging.getLogger(__name__).warning(
                "api.limit_concurrency is deprecated: it now sets api.max_requests_in_flight=%d "
                "(open connections no longer count; see api.max_connections)",
                self.limit_concurrency,
            )
            self.max_requests_in_flight, self.limit_concurrency = self.limit_concurrency, 0  # mapped once

    @property
    def auth_disabled(self) -> bool:
        return self.auth.strip().lower() == AUTH_DISABLED


@dataclass
class RayServeConfig:
    app_name: str = documented("promptfleet", "Ray Serve application name.")
    route_prefix: str = documented("/", "HTTP route prefix of the application on the Serve proxy.")
    address: str = documented(
        "", "Ray cluster to join; empty starts an embedded local Ray (RAY_ADDRESS also works)."
    )
    min_replicas: int = documented(
        1, "Autoscaling lower bound; each replica holds one backbone and all task prompts."
    )
    max_replicas: int = documented(1, "Autoscaling upper bound.")
    target_ongoing_requests: float = documented(16.0, "Autoscaling target of in-flight requests per replica.")
    max_ongoing_requests: int = documented(
        256, "Requests the Serve proxy sends one replica at once (our scheduler batches them)."
    )
    num_cpus: float = documented(1.0, "CPUs reserved per replica.")
    num_gpus: float = documented(0.0, "GPUs reserved per replica.")

    def __post_init__(self) -> None:
        check_positive("ray.min_replicas", self.min_replicas + 1)  # 0 is allowed (scale to zero)
        check_positive("ray.max_replicas", self.max_replicas)
        if self.min_replicas > self.max_replicas:
            raise ConfigError("ray.min_replicas must be <= ray.max_replicas")
        check_positive("ray.target_ongoing_requests", self.target_ongoing_requests)
        check_positive("ray.max_ongoing_requests", self.max_ongoing_requests)
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"ray.route_prefix={self.route_prefix!r}: must start with '/'")

    def autoscaling_config(self) -> dict:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


@dataclass
class ServerConfig:
    engine: EngineConfig = documented(None, "Backbone, prompt store, batching and queue limits.")
    api: ApiConfig = documented(None, "HTTP layer: auth, metrics, OpenAI defaults.")
    ray: RayServeConfig = documented(None, "Ray Serve deployment (used with `promptfleet serve --ray`).")

    def __post_init__(self) -> None:
        for name, cls in (("engine", EngineConfig), ("api", ApiConfig), ("ray", RayServeConfig)):
            if getattr(self, name) is None:
                setattr(self, name, cls())
        if self.api.default_max_tokens > self.engine.max_new_tokens_limit:
            raise ConfigError(
                f"api.default_max_tokens={self.api.default_max_tokens} exceeds "
                f"engine.max_new_tokens_limit={self.engine.max_new_tokens_limit}"
            )


def load_server_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> ServerConfig:
    """Read a serving YAML (or the defaults when `path` is None) and apply `key=value` overrides.

    A relative `api.auth` written in the YAML resolves against the YAML's directory; one given
    as an override resolves against the working directory, like any command-line path.
    """
    data = read_yaml(path) if path else {}
    api = data.get("api")
    if isinstance(api, dict) and isinstance(api.get("auth"), str):
        auth = api["auth"].strip()
        if auth and auth.lower() != AUTH_DISABLED and not os.path.isabs(auth):
            api["auth"] = str((Path(path).resolve().parent / auth).resolve())
    return from_dict(ServerConfig, apply_overrides(data, overrides or []))
