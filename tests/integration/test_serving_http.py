"""The official `openai` client against a real uvicorn server: real SmolLM2, tasks from a prompt store.

The server runs `serving.api` over the real Engine on 127.0.0.1 with multi-tenant keys; adapters are
written by `tuner.export.save_adapter` (random prompts: this tests the serving path, not accuracy).
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
import yaml
from serving_helpers import TASKS, UvicornThread, server_config

from serving.api import create_app
from serving.auth import hash_key
from serving.engine import Engine, EngineConfig
from tuner.export import TaskAdapter, save_adapter
from tuner.model.model_cache import resolve_backbone

pytestmark = pytest.mark.integration
KEY, OTHER_KEY = "pf-it-acme", "pf-it-globex"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("serving_http")
    backbone_cfg = AutoConfig.from_pretrained(resolve_backbone("smollm2-135m"))
    gen = torch.Generator().manual_seed(0)
    for name, meta in TASKS.items():
        prompt = torch.randn(8, backbone_cfg.hidden_size, generator=gen) * 0.02
        save_adapter(root / "store", TaskAdapter(name, prompt, "smollm2-135m", dict(meta)), backbone_cfg)
    tenants = root / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "acme": {"key_sha256": [hash_key(KEY)], "tasks": ["sst2", "samsum"]},
                    "globex": {"key_sha256": [hash_key(OTHER_KEY)], "tasks": ["trec"]},
                }
            }
        )
    )
    engine_cfg = EngineConfig(
        backbone="smollm2-135m", prompt_store=str(root / "store"), max_batch_size=8, max_new_tokens_limit=64
    )
    cfg = server_config(engine_cfg, auth=str(tenants))
    with UvicornThread(create_app(Engine(cfg.engine), cfg)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models(client):
    assert sorted(m.id for m in client.models.list()) == ["samsum", "sst2"]
    assert client.models.retrieve("sst2").id == "sst2"


def warm(client, model):
    """A first request to a task reads its prompt in the same forward as its text and caches the prompt's
    KV; later ones start from that KV (`ModelRunner.forward_new`, `inline_misses`). The two round
    differently in the last bits (matmuls of other shapes; ~1e-6, more on AVX-512/AMX kernels), enough
    to flip a near-tie in greedy decoding, so the requests compared below both come after this one."""
    client.completions.create(model=model, prompt="hello", max_tokens=1)


def test_completion_and_its_stream_agree(client):
    warm(client, "sst2")
    whole = client.completions.create(model="sst2", prompt="a gripping, beautifully shot film", max_tokens=4)
    assert whole.object == "text_completion" and whole.model == "sst2"
    assert isinstance(whole.choices[0].text, str) and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 1 <= whole.usage.completion_tokens <= 4
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.completions.create(
            model="sst2",
            prompt="a gripping, beautifully shot film",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    )  # greedy: identical
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_and_its_stream_agree(client):
    messages = [
        {"role": "user", "content": "A: are we still on for lunch?\nB: yes, noon at the usual place."}
    ]
    warm(client, "samsum")
    whole = client.chat.completions.create(model="samsum", messages=messages, max_tokens=8)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="samsum", messages=messages, max_tokens=8, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content


def test_errors_surface_as_openai_exceptions(server, client):
    with pytest.raises(openai.NotFoundError) as forbidden:
        client.completions.create(model="trec", prompt="who?", max_tokens=1)  # globex's task
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-task", prompt="who?", max_tokens=1)
    assert forbidden.value.body["code"] == missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sst2", prompt="hi", max_tokens=65)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_classify_returns_verbaliser_probabilities(server):
    r = httpx.post(
        f"{server}/v1/classify",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
        json={"model": "sst2", "input": "a gripping, beautifully shot film"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["labels"]) == {"0", "1"} and abs(sum(body["labels"].values()) - 1) < 1e-6
    assert body["label"] == max(body["labels"], key=body["labels"].get) and body["usage"]["prompt_tokens"] > 0
