"""`promptfleet serve`: run the OpenAI-compatible API for every task in a prompt store.

    promptfleet serve --prompt-store runs/quickstart/adapters --config configs/serving/default.yaml
    promptfleet serve --prompt-store DIR api.auth=none                 # local development, no keys
    promptfleet serve --prompt-store DIR --config CFG --ray            # the same app on Ray Serve

Standalone uvicorn by default; `--ray` deploys `serving.ray_app` (embedded local Ray unless
`ray.address` / RAY_ADDRESS names a cluster). Config problems (unknown keys, missing store or
tenants file, auth not configured) are one-line errors with exit 2, raised before any model loads.
A tensor-parallel replica (`engine.tensor_parallel`) that loses a rank answers 503 for a few seconds,
then exits 1.
This module does not define routes or load models itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import time
from pathlib import Path

from tuner.schema import ConfigError

FAILED_EXIT_GRACE_S = 5.0  # a failed replica answers 503 (and /health says why) this long, then exits


def register(subparsers) -> None:
    """Add `serve` to the `promptfleet` parser."""
    p = subparsers.add_parser(
        "serve",
        help="serve every task of a prompt store from one backbone (OpenAI-compatible HTTP API)",
        description="Serve all task prompts in a prompt store (one PEFT adapter dir per task) from one shared "
        "backbone: /v1/completions, /v1/chat/completions (model = task name), /v1/classify, "
        "/v1/models, /health, /metrics.",
    )
    p.add_argument(
        "--prompt-store",
        default=None,
        metavar="DIR",
        help="directory of per-task adapters, e.g. runs/quickstart/adapters (or engine.prompt_store in the config)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="serving YAML, e.g. configs/serving/default.yaml (default: built-in defaults)",
    )
    p.add_argument("--host", default=None, help="interface to bind (overrides api.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (overrides api.port; default 8000)")
    p.add_argument(
        "--ray", action="store_true", help="deploy on Ray Serve instead of a standalone uvicorn server"
    )
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. engine.max_batch_size=16 api.auth=none"
    )
    p.set_defaults(func=serve_command)


def resolve_config(args: argparse.Namespace):
    """The ServerConfig from --config, overrides and flags; fails (ConfigError) before anything loads."""
    from serving.config import load_server_config

    cfg = load_server_config(args.config, args.overrides)
    if args.prompt_store:
        cfg.engine = dataclasses.replace(cfg.engine, prompt_store=args.prompt_store)
    if args.host is not None or args.port is not None:
        cfg.api = dataclasses.replace(
            cfg.api, host=args.host or cfg.api.host, port=cfg.api.port if args.port is None else args.port
        )
    store = cfg.engine.prompt_store
    if not store:
        raise ConfigError("no prompt store: pass --prompt-store DIR (or set engine.prompt_store)")
    if not Path(store).is_dir():
        raise ConfigError(f"prompt store not found: {store}")
    return cfg


def serve_command(args: argparse.Namespace) -> int:
    from serving.auth import load_keyring

    cfg = resolve_config(args)
    logging.basicConfig(
        level=cfg.api.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    keyring = load_keyring(cfg.api.auth)
    if args.ray:
        from serving.ray_app import run_on_ray

        run_on_ray(cfg, keyring)
        return 0
    import uvicorn

    from serving.api import create_app
    from serving.engine import Engine
    from serving.http_server import uvicorn_config

    engine = Engine(cfg.engine)
    server = uvicorn.Server(uvicorn_config(create_app(engine, cfg, keyring), cfg.api))
    threading.Thread(target=_exit_on_failure, args=(engine, server), daemon=True).start()
    server.run()
    if engine.failure is not None:  # a rank of a tensor-parallel replica was lost
        print(f"promptfleet: error: {engine.failure}", file=sys.stderr)
        return 1
    return 0


def _exit_on_failure(engine, server) -> None:
    """A replica that lost a rank cannot serve again: once it has answered its requests (503) and
    /health has said so for `FAILED_EXIT_GRACE_S`, stop the server (the command then exits 1)."""
    engine.failed.wait()
    time.sleep(FAILED_EXIT_GRACE_S)
    server.should_exit = True
