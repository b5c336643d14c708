"""The serving engine on the real SmolLM2 backbone (fp32).

Oracles, strongest first: (1) a direct reference written here (the prompt's embeddings prepended to
the text's, a plain greedy loop of full forwards, no cache) that no upstream release can change;
(2) PEFT at the logits level (`PeftModel.forward` over the served sequence); (3) PEFT's own
`generate`, which depends on transformers' generation code and holds for the locked versions
(requirements.lock). A task's output in a mixed batch equals its output alone.

Adapters are written with `tuner.export.save_adapter` from vocabulary-initialised prompts (no
training needed: the equivalences hold for any prompt). Few tokens, few requests: ~1000 tokens/s here.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving.engine import Engine, EngineConfig
from serving.types import GenerationRequest, SamplingParams
from tuner.export import TaskAdapter, save_adapter
from tuner.model.backbone import load_backbone
from tuner.model.model_cache import resolve_backbone

pytestmark = pytest.mark.integration

BACKBONE = "smollm2-135m"
TASKS = {  # name -> (virtual tokens, raw prompt)
    "alpha": (8, "The capital of France is"),
    "beta": (12, "Translate to German: good morning"),
    "gamma": (20, "Once upon a time"),
}
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def engine_and_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("prompt_store")
    engine = Engine(
        EngineConfig(backbone=BACKBONE, prompt_store=str(store), dtype="fp32", reload_interval_s=0.2)
    )
    model = engine.runner.model
    embed = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    for name, (P, _) in TASKS.items():
        rows = torch.randint(100, embed.shape[0], (P,), generator=g)
        save_adapter(
            store,
            TaskAdapter(name, embed[rows].detach().clone(), BACKBONE, {"kind": "generation"}),
            model.config,
        )
    engine.registry.refresh()
    return engine, store


def serve(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Run `requests` concurrently through the engine; each request's generated token ids."""

    async def one(req):
        return req.request_id, [t async for out in engine.generate(req) for t in out.token_ids]

    async def main():
        await engine.start()
        try:
            return dict(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            await engine.stop()

    return asyncio.run(main())


def greedy(rid: str, task: str) -> GenerationRequest:
    return GenerationRequest(rid, task, TASKS[task][1], SamplingParams(max_tokens=NEW_TOKENS), raw=True)


@torch.no_grad()
def direct_greedy(model, prompt: torch.Tensor, ids: list[int], new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding by definition: [prompt embeddings][token embeddings] -> full forward -> argmax."""
    out: list[int] = []
    for _ in range(new_tokens):
        tokens = torch.tensor([ids + out])
        embeds = torch.cat([prompt[None].to(model.dtype), model.get_input_embeddings()(tokens)], dim=1)
        positions = torch.arange(embeds.shape[1])[None]
        logits = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


@pytest.fixture(scope="module")
def served_alone(engine_and_store):
    engine, _ = engine_and_store
    return serve(engine, [greedy(t, t) for t in TASKS])


def test_served_greedy_output_equals_a_direct_reference(engine_and_store, served_alone):
    from tuner.export import load_adapter

    engine, store = engine_and_store
    base = load_backbone(resolve_backbone(BACKBONE), torch.float32)
    tok = engine.tokenizer
    for task, (_, text) in TASKS.items():
        prompt = load_adapter(store / task).prompt
        ids = tok(text, add_special_tokens=False).input_ids
        want = direct_greedy(base, prompt, ids, NEW_TOKENS, tok.eos_token_id)
        assert served_alone[task] == want, f"{task}: served {served_alone[task]} != direct {want}"


def test_peft_logits_over_the_served_sequence_equal_the_direct_ones(engine_and_store, served_alone):
    from peft import PeftModel

    from tuner.export import load_adapter

    engine, store = engine_and_store
    base = load_backbone(resolve_backbone(BACKBONE), torch.float32)
    tok = engine.tokenizer
    for task, (P, text) in TASKS.items():
        seq = tok(text, add_special_tokens=False).input_ids + served_alone[task]
        prompt = load_adapter(store / task).prompt
        with torch.no_grad():
            embeds = torch.cat([prompt[None], base.get_input_embeddings()(torch.tensor([seq]))], dim=1)
            direct = base(inputs_embeds=embeds, use_cache=False).logits[0, P:]
            peft_model = PeftModel.from_pretrained(base, str(store / task)).eval()
            theirs = peft_model(input_ids=torch.tensor([seq])).logits[0, P:]
        torch.testing.assert_close(theirs, direct, rtol=1e-4, atol=1e-4)
        base = peft_model.get_base_model()  # prompt tuning leaves the backbone unchanged


def test_served_greedy_output_equals_peft_generate(engine_and_store, served_alone):
    """A second check against PEFT's `generate`: true for the locked transformers/peft versions."""
    from peft import PeftModel

    engine, store = engine_and_store
    base = load_backbone(resolve_backbone(BACKBONE), torch.float32)
    tok = engine.tokenizer
    for task, (_, text) in TASKS.items():
        peft_model = PeftModel.from_pretrained(base, str(store / task)).eval()
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        with torch.inference_mode():
            out = peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist() if out.shape[1] > NEW_TOKENS else out[0].tolist()
        want = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
        assert served_alone[task] == want, f"{task}: served {served_alone[task]} != PEFT {want}"
        base = peft_model.get_base_model()  # prompt tuning leaves the backbone unchanged


def test_output_in_a_mixed_batch_equals_output_alone(engine_and_store):
    engine, _ = engine_and_store
    mixed = serve(engine, [greedy(f"{t}-{i}", t) for i in range(2) for t in TASKS])
    for task in TASKS:
        alone = serve(engine, [greedy("solo", task)])["solo"]
        assert mixed[f"{task}-0"] == alone == mixed[f"{task}-1"]
    assert engine.stats()["prefix_cache_hits_total"] > 0
