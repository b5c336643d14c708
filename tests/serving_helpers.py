"""Shared by the API tests: a prompt store of task adapters, a tiny backbone dir, a real uvicorn server.

`tiny_backbone_dir` saves a tiny random Llama with SmolLM2's real tokenizer (vocab 49152, hidden 32,
2 layers), so the real Engine runs in milliseconds without network. `write_prompt_store` writes
adapters with `tuner.export.save_adapter`, exactly what training produces. `UvicornThread` runs an
app on 127.0.0.1 in a background thread so real HTTP clients (openai, httpx) can talk to it.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

TASKS = {
    "sst2": {
        "kind": "classification",
        "template": "Review: {sentence}\nSentiment:",
        "verbaliser": {"0": " negative", "1": " positive"},
        "max_new_tokens": 2,
    },
    "trec": {
        "kind": "classification",
        "template": "Question: {text}\nType:",
        "verbaliser": {"ABBR": " abbreviation", "DESC": " description", "LOC": " location"},
        "max_new_tokens": 2,
    },
    "samsum": {"kind": "generation", "template": "Dialogue: {dialogue}\nSummary:", "max_new_tokens": 16},
}


def tiny_backbone_dir(root: Path) -> Path:
    """A tiny random Llama + the SmolLM2 tokenizer, saved like any local checkpoint (cached per `root`)."""
    from conftest import save_tiny_backbone

    out = root / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    return save_tiny_backbone(out)


def write_prompt_store(
    root: Path, backbone_dir: Path, tasks: dict = TASKS, num_virtual_tokens: int = 4
) -> Path:
    """One PEFT prompt-tuning adapter per task (random prompts), as training writes them."""
    from transformers import AutoConfig

    from tuner.export import TaskAdapter, save_adapter

    store = root / "store"
    cfg = AutoConfig.from_pretrained(backbone_dir)
    gen = torch.Generator().manual_seed(1)
    for name, meta in tasks.items():
        prompt = torch.randn(num_virtual_tokens, cfg.hidden_size, generator=gen) * 0.05
        save_adapter(store, TaskAdapter(name, prompt, str(backbone_dir), dict(meta)), cfg)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornThread:
    """`with UvicornThread(app) as base_url:` serves `app` (lifespan included) on 127.0.0.1."""

    def __init__(self, app, startup_timeout_s: float = 120.0):
        import uvicorn

        from serving.http_server import uvicorn_config

        self.port = free_port()
        # The server `promptfleet serve` runs (timeouts, concurrency limit), on a free local port.
        self.server = uvicorn.Server(
            uvicorn_config(
                app,
                app.state.serving.config.api,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=2,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.startup_timeout_s = startup_timeout_s

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def engine_config(store: Path, backbone: Path, **overrides):
    """An EngineConfig for the tiny backbone: fp32, no hot-reload churn, small limits."""
    from serving.engine import EngineConfig

    base = dict(
        backbone=str(backbone),
        prompt_store=str(store),
        dtype="fp32",
        max_batch_size=8,
        max_queue=64,
        max_prompt_tokens=64,
        max_new_tokens_limit=256,
        reload_interval_s=60.0,
        request_timeout_s=30.0,
    )
    return EngineConfig(**{**base, **overrides})


class StepGate:
    """Holds `engine`'s steps until `expect(n)` requests are queued, so they start in one step.

    Two runs compared token for token must run the same batches: a row's numbers agree across
    batch shapes only up to float rounding (and a never-seen task's prompt KV is computed in its
    first request's own forward), which seeded sampling over a 49k vocabulary can show. Without the
    gate, which requests share a step depends on the machine's load.
    """

    def __init__(self, engine):
        from serving.scheduler import SchedulerOutput

        self.waiting_for = 0
        schedule = engine.scheduler.schedule

        def gated():
            if engine.scheduler.num_waiting < self.waiting_for:
                return SchedulerOutput()  # the engine waits for the next request's wake-up
            self.waiting_for = 0
            return schedule()

        engine.scheduler.schedule = gated

    def expect(self, n: int) -> None:
        self.waiting_for = n


def server_config(engine_cfg, **api):
    from serving.config import ApiConfig, ServerConfig

    return ServerConfig(engine=engine_cfg, api=ApiConfig(**{"auth": "none", **api}))


def assert_error(resp, status: int, code: str | None = None, param: str | None = "<any>") -> dict:
    """`resp` is the JSON error shape {"error": {message, type, param, code}} with this status."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in resp.text
    if code is not None:
        assert body["error"]["code"] == code, body
    if param != "<any>":
        assert body["error"]["param"] == param, body
    return body["error"]
