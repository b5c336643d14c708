"""Typed serving configuration: one `ServerConfig` that a YAML file maps onto 1:1.

    engine:   the backbone, prompt store, batching and queue limits (`serving.engine.EngineConfig`)
    api:      HTTP behaviour: auth, metrics exposure, defaults for OpenAI fields
    ray:      the Ray Serve deployment (replicas, autoscaling, resources) used by `promptfleet serve --ray`

`load_server_config(path, overrides)` reads the YAML (or starts from the defaults), applies
`key=value` overrides and rejects unknown keys. A relative `api.auth` path resolves against the
config file's directory. This module does not read the tenants file or start anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from serving.engine import EngineConfig
from tuner.config import ConfigError, _choice, _f, _positive, apply_overrides, from_dict, read_yaml

AUTH_DISABLED = "none"


@dataclass
class ApiConfig:
    host: str = _f("127.0.0.1", "Interface uvicorn binds (0.0.0.0 to listen on all interfaces).")
    port: int = _f(8000, "TCP port of the HTTP server.")
    auth: str = _f(
        "",
        "Tenants file (YAML, hashed API keys) or `none` to disable auth for local development. "
        "Empty is an error: auth is never off by accident.",
    )
    metrics_public: bool = _f(
        False,
        "Serve /metrics without a key. Off by default: then only a tenant with `metrics: true` in the "
        "tenants file may read it. When on, the public page carries no task or tenant names.",
    )
    max_body_bytes: int = _f(1 << 20, "Largest request body; larger (chunked ones too) get 413.")
    max_prompt_chars: int = _f(
        32768, "Longest prompt / input in characters, checked before anything is tokenized (400)."
    )
    timeout_keep_alive_s: float = _f(5.0, "An idle keep-alive connection is closed after this.")
    header_timeout_s: float = _f(
        10.0, "A connection whose request headers are not complete by then is closed."
    )
    body_timeout_s: float = _f(10.0, "Longest wait for the next piece of a request body (408 after).")
    body_deadline_s: float = _f(
        30.0, "Longest time a whole request body may take after its headers, however it trickles (408)."
    )
    max_connections_per_client: int = _f(
        64,
        "Open connections one client address may hold; more are answered 429 and closed, so one "
        "client cannot use up limit_concurrency for all. Behind a proxy every client has its address: "
        "raise it there.",
    )
    write_timeout_s: float = _f(
        30.0, "Longest wait for a slow reader to take the next streamed chunk; then the stream is ended."
    )
    limit_concurrency: int = _f(
        1024, "Open connections + in-flight requests before the server answers 503 (uvicorn)."
    )
    default_max_tokens: int = _f(
        16, "max_tokens when a request does not set it (OpenAI's completions default)."
    )
    disconnect_poll_s: float = _f(
        0.25, "How often a non-streaming request checks whether its client went away."
    )
    log_level: str = _f("info", "uvicorn / promptfleet log level: debug, info, warning or error.")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"api.port={self.port}: must be in 1..65535")
        _positive("api.default_max_tokens", self.default_max_tokens)
        _positive("api.disconnect_poll_s", self.disconnect_poll_s)
        for name in (
            "max_body_bytes",
            "max_prompt_chars",
            "timeout_keep_alive_s",
            "header_timeout_s",
            "body_timeout_s",
            "body_deadline_s",
            "max_connections_per_client",
            "write_timeout_s",
            "limit_concurrency",
        ):
            _positive(f"api.{name}", getattr(self, name))
        _choice("api.log_level", self.log_level, ("debug", "info", "warning", "error"))

    @property
    def auth_disabled(self) -> bool:
        return self.auth.strip().lower() == AUTH_DISABLED


@dataclass
class RayServeConfig:
    app_name: str = _f("promptfleet", "Ray Serve application name.")
    route_prefix: str = _f("/", "HTTP route prefix of the application on the Serve proxy.")
    address: str = _f("", "Ray cluster to join; empty starts an embedded local Ray (RAY_ADDRESS also works).")
    min_replicas: int = _f(
        1, "Autoscaling lower bound; each replica holds one backbone and all task prompts."
    )
    max_replicas: int = _f(1, "Autoscaling upper bound.")
    target_ongoing_requests: float = _f(16.0, "Autoscaling target of in-flight requests per replica.")
    max_ongoing_requests: int = _f(
        256, "Requests the Serve proxy sends one replica at once (our scheduler batches them)."
    )
    num_cpus: float = _f(1.0, "CPUs reserved per replica.")
    num_gpus: float = _f(0.0, "GPUs reserved per replica.")

    def __post_init__(self) -> None:
        _positive("ray.min_replicas", self.min_replicas + 1)  # 0 is allowed (scale to zero)
        _positive("ray.max_replicas", self.max_replicas)
        if self.min_replicas > self.max_replicas:
            raise ConfigError("ray.min_replicas must be <= ray.max_replicas")
        _positive("ray.target_ongoing_requests", self.target_ongoing_requests)
        _positive("ray.max_ongoing_requests", self.max_ongoing_requests)
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
    engine: EngineConfig = _f(None, "Backbone, prompt store, batching and queue limits.")
    api: ApiConfig = _f(None, "HTTP layer: auth, metrics, OpenAI defaults.")
    ray: RayServeConfig = _f(None, "Ray Serve deployment (used with `promptfleet serve --ray`).")

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
